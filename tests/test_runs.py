"""Run directories: append-only log, interrupt and resume without repeating evaluations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cli_helpers import DIGITS_QUICK, command

from automl_prune.errors import InvalidValueError
from automl_prune.runs import RunDirectory

SEARCH = ["search", "--search.strategy", "random", *DIGITS_QUICK, "--search.only", "--search.refine_top", "0"]
"""A search alone (refinement's own resume is tested in test_refine.py)."""


def _log(directory: Path) -> list[dict]:
    path = directory / "evaluations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.mark.slow
def test_interrupted_search_resumes_without_repeating(tmp_path: Path) -> None:
    total = 30
    # the reference: the same search, uninterrupted (also trains and caches the baseline)
    subprocess.run(
        command(*SEARCH, "--search.evaluations", str(total), "--out", str(tmp_path / "ref")),
        check=True,
        capture_output=True,
    )
    reference = [r["plan"] for r in _log(tmp_path / "ref")]

    run = tmp_path / "run"
    # started as by a launcher that leaves SIGINT and SIGTERM blocked: the command unblocks them itself
    proc = subprocess.Popen(
        command(*SEARCH, "--search.evaluations", str(total), "--out", str(run)),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_block_stop_signals,
    )
    deadline = time.time() + 300
    while len(_log(run)) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    seen = len(_log(run))
    assert proc.poll() is None, f"the search ended (exit {proc.returncode}) before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    done = _log(run)
    assert proc.returncode == 130, f"interrupted after {seen} evaluations, the search went on to {len(done)}: {stderr}"
    assert 5 <= len(done) < total
    assert f"automl-prune search --resume {run}" in stderr

    # SIGTERM (a scheduler stopping the job) behaves like Ctrl-C: the work is kept, a resume suggested, exit 143
    proc = subprocess.Popen(
        command("search", "--resume", str(run)), stderr=subprocess.PIPE, text=True, preexec_fn=_block_stop_signals
    )
    deadline = time.time() + 120
    while len(_log(run)) < len(done) + 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated;" in stderr and f"automl-prune search --resume {run}" in stderr
    assert len(done) + 5 <= len(_log(run)) < total

    # the last resume changes where it computes (a longer worker timeout): stored, and the results the same
    resume = command("search", "--resume", str(run), "--parallel.worker_timeout", "300")
    subprocess.run(resume, check=True, capture_output=True, env=os.environ.copy())
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["parallel"]["worker_timeout"] == 300 and stored["search"]["evaluations"] == total
    log = _log(run)
    assert [r["index"] for r in log] == list(range(1, total + 1))  # nothing repeated, nothing missing
    assert log[: len(done)] == done  # the finished evaluations were not rewritten
    assert [r["plan"] for r in log] == reference  # the resumed search continued the same trajectory
    result = json.loads((run / "result.json").read_text())
    assert result["evaluations"] == total
    assert all(h["evaluation"]["cached"] for h in result["history"][: len(done)])  # served from the log


def test_run_directory_refuses_to_mix_runs(tmp_path: Path) -> None:
    RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 0})
    # a run that ended before its first evaluation (a typo in a flag) holds nothing: replaced without --overwrite
    RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 7})
    RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 0})
    # nor does one that stopped after copying the baseline and fitting the latency model (an unreachable budget)
    (tmp_path / "r" / "baseline.pt").write_bytes(b"a copy of the cached baseline")
    (tmp_path / "r" / "latency_model.json").write_text("{}")
    RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 3})
    assert not (tmp_path / "r" / "baseline.pt").exists()  # replaced: the next run copies its own
    RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 0})
    (tmp_path / "r" / "plan.json").write_text("{}")  # now it holds a result
    RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 0})  # same run: fine
    with pytest.raises(InvalidValueError, match="options differ: seed"):
        RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 1})
    (tmp_path / "r" / "policy.pt").write_bytes(b"the old run's policy")
    RunDirectory(tmp_path / "r", {"strategy": "ddpg", "seed": 1}, overwrite=True)
    assert not (tmp_path / "r" / "policy.pt").exists() and not (tmp_path / "r" / "plan.json").exists()
    with pytest.raises(InvalidValueError, match="not a run directory"):
        RunDirectory(tmp_path / "empty", resume=True)


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "r", {"a": 1})
    record = {
        "index": 1,
        "plan": {"keep_ratios": {"g": 0.5}, "skip": {}},
        "evaluation": {
            "accuracy": 0.5,
            "flops": 1,
            "params": 1,
            "latency_ms": None,
            "measured_latency_ms": None,
            "flops_ratio": 0.5,
            "reward": -0.5,
            "feasible": True,
            "reason": "",
            "seconds": 0.1,
            "cached": False,
        },
    }
    log = tmp_path / "r" / "evaluations.jsonl"
    log.write_text(json.dumps(record) + "\n" + '{"index": 2, "pla')
    resumed = RunDirectory(run.path, resume=True)
    assert len(resumed.logged()) == 1
    # the torn line is cut off, so what the resumed run appends starts on a line of its own
    assert log.read_text() == json.dumps(record) + "\n"

    class Session:
        used = 2

    from automl_prune.types import Evaluation, Plan

    append = resumed.callback("random")
    append(Session(), Plan({"g": 0.25}), Evaluation(**{**record["evaluation"], "accuracy": 0.4}))
    append.close()
    assert [r["index"] for r in (json.loads(line) for line in log.read_text().splitlines())] == [1, 2]
    assert len(RunDirectory(run.path, resume=True).logged()) == 2


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from automl_prune.errors import InvalidValueError
    from automl_prune.runs import RunDirectory

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from automl_prune.runs import lock_run_dir; from pathlib import Path; "
            f"lock_run_dir(Path({str(run)!r})); print('locked', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InvalidValueError, match=rf"in use by another automl-prune process \(pid {holder.pid} on "):
            RunDirectory(run, {"seed": 0})
        assert not (run / "config.yaml").exists()  # nothing written by the refused run
    finally:
        holder.kill()  # a dead holder leaves a stale .lock file behind: not in the way
        holder.wait()
        holder.stdout.close()
    time.sleep(0.1)
    assert RunDirectory(run, {"seed": 0}).config == {"seed": 0}
    assert RunDirectory(run, resume=True).config == {"seed": 0}  # re-entrant within one process


@pytest.fixture(scope="module")
def digits_resnet():
    """resnet20 (skippable residual blocks, 12 groups) trained briefly on the real digits set."""
    from automl_prune.data import load_dataset
    from automl_prune.evaluator import EvaluatorConfig
    from automl_prune.models import ModelSpec, build_model
    from automl_prune.training import TrainConfig, train

    data = load_dataset("digits")
    model = train(build_model(ModelSpec("resnet20", 1, 10)), data, TrainConfig(epochs=4, batch_size=32, seed=0)).model
    return model, data, EvaluatorConfig(eval_size=200, recalibration_batches=1, round_to=1)


def _fresh(digits_resnet):
    from automl_prune.evaluator import Evaluator
    from automl_prune.search_spaces import SearchSpace
    from automl_prune.types import Budget

    model, data, config = digits_resnet
    evaluator = Evaluator(model, data, Budget(flops=0.5), config)
    return evaluator, SearchSpace(evaluator, skip_gates=True)


class _Stop(KeyboardInterrupt):
    """Raised by a callback to interrupt a search (as Ctrl-C would)."""


@pytest.mark.parametrize(
    "name", ["uniform", "global", "random", "abc", "optuna", "ddpg", "ppo", "reinforce", "static_skip"]
)
def test_every_strategy_resumes_its_own_trajectory(digits_resnet, name: str) -> None:
    """Interrupted after 5 of 12 evaluations (the only one, for one-plan strategies) and resumed from the logged ones (as `--resume` does), every
    strategy makes the plans the uninterrupted search makes, and scores none of the logged ones again."""
    from automl_prune.strategy import get_strategy

    total = 12
    evaluator, space = _fresh(digits_resnet)
    reference = get_strategy(name).search(evaluator, space, total, seed=3)
    cut = min(5, reference.evaluations)  # uniform and global make one evaluation

    logged = []

    def log_then_stop(session, plan, evaluation) -> None:
        logged.append((plan, evaluation))
        if len(logged) == cut:
            raise _Stop

    evaluator, space = _fresh(digits_resnet)
    with pytest.raises(_Stop):
        get_strategy(name).search(evaluator, space, total, seed=3, callbacks=[log_then_stop])
    evaluator, space = _fresh(digits_resnet)
    for plan, evaluation in logged:
        evaluator.preload(plan, evaluation)
    resumed = get_strategy(name).search(evaluator, space, total, seed=3)
    assert [p for p, _ in resumed.history] == [p for p, _ in reference.history]
    assert [e.accuracy for _, e in resumed.history] == [e.accuracy for _, e in reference.history]
    fresh = sum(not e.cached for _, e in resumed.history)
    assert fresh == sum(not e.cached for _, e in reference.history[cut:])  # the logged ones came from the log
