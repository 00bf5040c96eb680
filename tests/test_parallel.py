"""Parallel evaluation on Ray workers: same results as serial, survives a killed worker."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from cli_helpers import DIGITS_QUICK

from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.models import ModelSpec, build_model
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import get_strategy
from automl_prune.training import TrainConfig, train
from automl_prune.types import Budget

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def digits_problem():
    """fashion_cnn trained briefly on the real digits set, loadable by name in every worker."""
    from automl_prune.data import load_dataset

    data = load_dataset("digits")
    spec = ModelSpec("fashion_cnn", 1, 10)
    model = train(build_model(spec), data, TrainConfig(epochs=6, batch_size=32, seed=0)).model
    evaluator = Evaluator(model, data, Budget(flops=0.5), EvaluatorConfig(eval_size=300, recalibration_batches=2))
    return spec, evaluator, SearchSpace(evaluator)


@pytest.fixture(scope="module")
def pool(digits_problem):
    from automl_prune.parallel import RayEvaluatorPool, spec_for

    spec, evaluator, _ = digits_problem
    threads = torch.get_num_threads()
    with RayEvaluatorPool(spec_for(evaluator, spec, "digits"), workers=2) as pool:
        yield pool
    torch.set_num_threads(threads)
    assert not ray.is_initialized()


def test_parallel_search_equals_serial(digits_problem, pool) -> None:
    _, evaluator, space = digits_problem
    serial = get_strategy("random", batch_size=4).search(evaluator, space, 8, seed=2)
    parallel = get_strategy("random", batch_size=4).search(
        evaluator, space, 8, seed=2, evaluate_many=pool.evaluate_many
    )
    assert [p for p, _ in parallel.history] == [p for p, _ in serial.history]
    assert [e.accuracy for _, e in parallel.history] == [e.accuracy for _, e in serial.history]
    assert serial.best_evaluation.accuracy > 0.5  # a trained model, not chance
    assert {p.worker for p in pool.placements} == {0, 1}
    assert pool.peak_running == 2  # both workers scored at once, not in turn
    # the workers compete for the CPU as this process does (Ray's default niceness of 15 starves them under load)
    assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.worker_pids()} == {os.getpriority(os.PRIO_PROCESS, 0)}


@pytest.mark.parametrize(
    ("name", "options"),
    [("reinforce", {"episodes_per_update": 4}), ("ppo", {"episodes_per_rollout": 4})],
    ids=["reinforce-update", "ppo-rollout"],
)
def test_an_agents_batch_of_episodes_is_scored_on_the_workers(digits_problem, pool, name, options) -> None:
    """REINFORCE's update and PPO's rollout are scored together on the Ray workers, with the same plans as alone."""
    _, evaluator, space = digits_problem
    before = len(pool.placements)
    serial = get_strategy(name, **options).search(evaluator, space, 8, seed=1)
    parallel = get_strategy(name, **options).search(evaluator, space, 8, seed=1, evaluate_many=pool.evaluate_many)
    assert [p for p, _ in parallel.history] == [p for p, _ in serial.history]
    assert [e.accuracy for _, e in parallel.history] == [e.accuracy for _, e in serial.history]
    assert {p.worker for p in pool.placements[before:]} == {0, 1}


def test_killed_worker_loses_at_most_one_evaluation(digits_problem, pool) -> None:
    _, evaluator, space = digits_problem
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    result = get_strategy("random", batch_size=4).search(evaluator, space, 8, seed=3, evaluate_many=pool.evaluate_many)
    assert result.evaluations == 8
    assert pool.stats.resubmitted >= 1  # the killed worker's plan went to the next free worker
    assert sum(not e.feasible for _, e in result.history) <= 1
    assert max(p.attempts for p in pool.placements) == 2
    assert victim not in pool.worker_pids()  # the worker was restarted


def test_no_worker_left_is_a_clear_error_not_a_hang(digits_problem, pool) -> None:
    """Workers that can never be placed (a GPU this machine lacks): one clear error after worker_timeout."""
    import time

    from automl_prune.parallel import NoWorkerLeftError, RayEvaluatorPool, spec_for

    spec, evaluator, space = digits_problem
    stranded = RayEvaluatorPool(spec_for(evaluator, spec, "digits"), workers=1, gpus_per_worker=1, start_timeout=3)
    start = time.perf_counter()
    with pytest.raises(NoWorkerLeftError, match=r"none of the 1 evaluation workers started within .*gpus_per_worker"):
        stranded.evaluate_many([space.plan_from_keeps(space.min_keep)])
    assert time.perf_counter() - start < 30
    stranded.close()
    assert ray.is_initialized()  # the pool joined the running Ray instance and leaves it running


def test_every_worker_lost_for_good_is_a_clear_error(digits_problem, pool) -> None:
    """A worker that was up and is gone with no restart left: the search stops at once, saying so."""
    from automl_prune.parallel import NoWorkerLeftError, RayEvaluatorPool, spec_for

    pool.close()  # its workers hold this machine's CPUs; the tests after this one start their own Ray
    spec, evaluator, space = digits_problem
    with RayEvaluatorPool(spec_for(evaluator, spec, "digits"), workers=1, max_restarts=0, start_timeout=600) as alone:
        assert len(alone.worker_pids()) == 1
        ray.kill(alone._actors[0], no_restart=True)
        with pytest.raises(NoWorkerLeftError, match=r"no evaluation worker is left: 1 of 1 lost for good.*--resume"):
            alone.evaluate_many([space.plan_from_keeps(space.min_keep)])
        assert alone.stats.resubmitted == 1  # the plan went back to the queue before the worker was found gone
    assert not ray.is_initialized()


@pytest.mark.slow
def test_two_node_cluster_on_loopback_runs_evaluations_on_both_nodes(
    digits_problem, pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real two-node Ray cluster (one CPU each) on 127.0.0.1: each worker lands on its own node.

    The head node is started with Ray's default worker niceness (15), the second as the README
    says (0): the pool warns about the head node's workers only.
    """
    import logging

    from ray.cluster_utils import Cluster

    from automl_prune.parallel import RayEvaluatorPool, spec_for

    pool.close()  # the local pool's Ray instance must be down before joining a cluster
    spec, evaluator, space = digits_problem
    monkeypatch.setenv("RAY_worker_niceness", "15")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        monkeypatch.setenv("RAY_worker_niceness", "0")
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        caplog.set_level(logging.WARNING, logger="automl_prune.parallel")
        with RayEvaluatorPool(spec_for(evaluator, spec, "digits"), workers=2, address=cluster.address) as remote:
            assert len(remote.worker_pids()) == 2  # both up before the search, so both get plans
            assert len(set(remote.worker_nodes())) == 2  # one CPU per node: each worker on its own node
            niced = [r.getMessage() for r in caplog.records if "niceness" in r.getMessage()]
            assert len(niced) == 1 and "niceness 15" in niced[0]
            assert cluster.head_node.node_id[:8] in niced[0]
            result = get_strategy("random", batch_size=2).search(
                evaluator, space, 4, seed=4, evaluate_many=remote.evaluate_many
            )
        assert result.evaluations == 4 and all(e.feasible for _, e in result.history)
        assert {p.node for p in remote.placements} <= set(remote.worker_nodes())
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_cli_search_on_a_cluster_survives_losing_a_node(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`search --parallel.ray_address` on a two-node loopback cluster; the second node is killed mid-search.

    The run log names both nodes; the lost node's plan is resubmitted to the live worker, the search
    finishes every evaluation without hanging, the faults are counted in result.json and report.md,
    and the refinement runs on what is left of the cluster.
    """
    import json
    import subprocess
    import sys
    import time

    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_worker_niceness", "0")  # nodes started as the README says
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    proc = None
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        args = ["search", "--search.strategy", "random", *DIGITS_QUICK, "--search.evaluations", "30"]
        args += [
            "--prune.round_to",
            "1",
            "--search.refine_top",
            "2",
            "--search.refine_steps",
            "5",
            "--finetune.epochs",
            "0",
        ]
        args += [
            "--parallel.workers",
            "2",
            "--parallel.ray_address",
            cluster.address,
            "--parallel.worker_timeout",
            "600",  # two workers start slowly on a loaded machine; losing one of them waits for no timeout
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "automl_prune.cli", *args, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        log = out / "evaluations.jsonl"

        def logged() -> list[dict]:
            lines = log.read_text().splitlines() if log.is_file() else []
            return [json.loads(line) for line in lines if line.endswith("}")]  # not a line being written

        # Kill the second node once both have scored plans: on a loaded machine the workers start minutes
        # apart, so a count of lines would not do. Bounds are generous (a search that hangs never ends; at
        # a load average of 4 every stage here runs 5-10 times slower than on an idle machine).
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            if len({r["node"] for r in logged()} - {"cache"}) == 2:
                break
            time.sleep(0.1)
        if proc.poll() is not None:
            _, stderr = proc.communicate()
            pytest.fail(f"the search ended (exit {proc.returncode}) before the node could be killed:\n{stderr[-3000:]}")
        killed_at = time.time()
        cluster.remove_node(second, allow_graceful=False)  # its raylet and worker processes are killed
        _, stderr = proc.communicate(timeout=900)  # no hang
        assert proc.returncode == 0, stderr
        records = logged()
        assert [r["index"] for r in records] == list(range(1, 31))
        assert all(not r["evaluation"]["reason"].startswith("failed") for r in records)
        fresh = [r for r in records if r["node"] != "cache"]
        assert len({r["node"] for r in fresh if r["time"] < killed_at}) == 2  # both nodes worked before the loss
        assert len({r["node"] for r in fresh[-5:]}) == 1  # one after it
        assert any(r["attempts"] == 2 for r in records)  # the lost node's plan went to the live worker
        faults = json.loads((out / "result.json").read_text())["worker_faults"]
        assert faults["resubmitted"] >= 1 and faults["failed"] == 0 and faults["lost"] == 1
        assert "plan(s) resubmitted to another worker" in (out / "report.md").read_text()
        assert json.loads((out / "refine.json").read_text())["rungs_done"] == 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()


def test_unreachable_cluster_is_a_clear_error_before_any_work(tmp_path) -> None:
    """`--ray-address` at a loopback port where nothing listens: one-line error, exit 2, nothing left running."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    args = ["search", "--search.strategy", "random", *DIGITS_QUICK, "--search.evaluations", "2"]
    args += ["--parallel.ray_address", f"127.0.0.1:{port}", "--out", str(tmp_path / "r")]
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "automl_prune.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "AUTOML_PRUNE_CACHE": str(cache)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in proc.stderr
    # refused before any stage: no data loaded, no baseline trained into the (empty) cache, nothing written
    assert "[1/" not in proc.stdout + proc.stderr and not cache.exists()
    assert not (tmp_path / "r").exists()
