"""automl-prune compare on real (digits) data: on a cluster by address, resume and retry.

The README's own comparison (ten entries, two seeds, two workers) is checked output by output in test_readme.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import DIGITS_QUICK

from automl_prune.report import pareto_front


@pytest.mark.slow
def test_compare_runs_on_an_existing_cluster_by_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real two-node Ray cluster on 127.0.0.1: the comparison joins it and its trials run on its nodes.

    The entries are a channel search and a depth search (static_skip): the latter's trial searches removable
    blocks though search.skip_gates is off, the former's does not.
    """
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_worker_niceness", "0")  # nodes started as the README says
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        out = tmp_path / "cmp"
        args = ["compare", "--compare.strategies", "random,static_skip", "--compare.seeds", "0", *DIGITS_QUICK]
        args += ["--model.name", "resnet20", "--train.epochs", "2", "--search.evaluations", "6"]
        args += ["--parallel.ray_address", cluster.address, "--out", str(out)]
        proc = subprocess.run(
            [sys.executable, "-m", "automl_prune.cli", *args], capture_output=True, text=True, env=os.environ.copy()
        )
        assert proc.returncode == 0, proc.stderr
        ran_on, plans = set(), {}
        for label in ("random", "static_skip"):
            trial = out / "trials" / "compare" / f"{label}_seed0"
            ran_on.add(json.loads((trial / "result.json").read_text().splitlines()[-1])["node"])
            (checkpoint,) = trial.glob("checkpoint_*")
            plans[label] = _plans(json.loads((checkpoint / "search.json").read_text()))
        assert ran_on <= nodes  # the cluster's own nodes, not a Ray instance the comparison started itself
        assert len(plans["static_skip"]) == len(plans["random"]) == 6
        assert not any(any(plan["skip"].values()) for plan in plans["random"])
        assert any(any(plan["skip"].values()) for plan in plans["static_skip"])  # it removed blocks
        rows = {row["strategy"]: row for row in csv.DictReader((out / "comparison.csv").open())}
        assert set(rows) == {"random", "static_skip"}
    finally:
        cluster.shutdown()


def _plans(search: dict) -> list[dict]:
    return [entry["plan"] for entry in search["history"]]


def test_pareto_front() -> None:
    points = [(0.5, 0.8), (0.4, 0.7), (0.45, 0.9), (0.3, 0.6), (0.3, 0.5), (0.6, 0.85)]
    assert pareto_front(points) == [(0.3, 0.6), (0.4, 0.7), (0.45, 0.9)]


def _recorded_finished(experiment: Path) -> bool:
    """True once Tune's saved experiment state records a trial as finished (what a resume goes by).

    A trial's final checkpoint is written before Tune records the trial as finished; a Ctrl-C in
    between leaves it unfinished, and the resume runs it again.
    """
    for state in sorted(experiment.glob("experiment_state-*.json"))[-1:]:
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):  # being written
            return False
        return any(json.loads(trial)["status"] == "TERMINATED" for trial, _ in trials)
    return False


def _trial_workers(driver: int) -> list[int]:
    """PIDs of the Ray Tune trial processes of the Ray instance ``driver`` started (its raylet's children)."""

    def children(pid: int) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    raylets = [p for p in children(driver) if "raylet" in cmdline(p)]
    return [w for r in raylets for w in children(r) if cmdline(w).startswith("ray::ImplicitFunc")]


def _num_failures(experiment: Path) -> list[int]:
    """How often each trial failed, from Tune's saved experiment state."""
    state = json.loads(sorted(experiment.glob("experiment_state-*.json"))[-1].read_text())
    return [json.loads(runtime)["num_failures"] for _, runtime in state["trial_data"]]


@pytest.mark.slow
def test_a_killed_trial_is_retried_and_an_interrupted_comparison_resumes(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--compare.strategies", "random", "--compare.seeds", "0,1", *DIGITS_QUICK]
    args += ["--search.evaluations", "150", "--out", str(out)]
    # Tune saves its experiment state (what says a trial finished) at most every 10 s by default, and a
    # trial of 150 evaluations takes about 3 s on a fast machine: the other trial would finish before the
    # first is recorded, and the Ctrl-C would find nothing left to interrupt. Saved every half second here.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "automl_prune.cli", *args], stderr=subprocess.PIPE, text=True, env=env
    )
    trials = out / "trials" / "compare"
    killed = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if not killed:
            workers = _trial_workers(proc.pid)
            if workers:  # the first trial is running: its worker dies, Tune retries the trial
                os.kill(workers[0], signal.SIGKILL)
                killed = True
        elif _recorded_finished(trials):  # one trial finished: Ctrl-C
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.1)
    _, stderr = proc.communicate(timeout=120)
    assert killed and proc.returncode == 130, stderr[-2000:]
    assert f"automl-prune compare --resume {out}" in stderr
    (finished,) = [p.parent for p in trials.glob("*/checkpoint_000000")]
    kept = (finished / "progress.csv").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "automl_prune.cli", "compare", "--resume", str(out)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in trials.iterdir() if p.is_dir()) == ["random_seed0", "random_seed1"]
    assert (finished / "progress.csv").read_bytes() == kept  # the finished trial was not run again
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 1 and int(rows[0]["seeds"]) == 2 and int(rows[0]["evaluations"]) == 150
    assert sorted(_num_failures(trials)) == [0, 1]  # the killed trial was retried once, then finished
