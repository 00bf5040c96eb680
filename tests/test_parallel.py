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
    assert {worker for worker, _ in pool.placements} == {0, 1}


def test_killed_worker_loses_at_most_one_evaluation(digits_problem, pool) -> None:
    _, evaluator, space = digits_problem
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    result = get_strategy("random", batch_size=4).search(evaluator, space, 8, seed=3, evaluate_many=pool.evaluate_many)
    assert result.evaluations == 8
    assert pool.retries >= 1
    assert sum(not e.feasible for _, e in result.history) <= 1
    assert victim not in pool.worker_pids()  # the worker was restarted


@pytest.mark.slow
def test_two_node_cluster_on_loopback_runs_evaluations_on_both_nodes(digits_problem, pool) -> None:
    """A real two-node Ray cluster (one CPU each) on 127.0.0.1: each worker lands on its own node."""
    from ray.cluster_utils import Cluster

    from automl_prune.parallel import RayEvaluatorPool, spec_for

    pool.close()  # the local pool's Ray instance must be down before joining a cluster
    spec, evaluator, space = digits_problem
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with RayEvaluatorPool(spec_for(evaluator, spec, "digits"), workers=2, address=cluster.address) as remote:
            result = get_strategy("random", batch_size=2).search(
                evaluator, space, 4, seed=4, evaluate_many=remote.evaluate_many
            )
            nodes = {node for _, node in remote.placements}
        assert result.evaluations == 4 and all(e.feasible for _, e in result.history)
        assert len(nodes) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_cli_search_on_a_cluster_records_the_node_of_each_evaluation(tmp_path) -> None:
    """`search --ray-address` on a two-node loopback cluster: the run log names both nodes; refinement runs there too."""
    import json
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        args = ["search", "--search.strategy", "random", *DIGITS_QUICK]
        args += [
            "--search.evaluations",
            "6",
            "--search.only",
            "--search.refine_top",
            "3",
            "--search.refine_steps",
            "5,10",
        ]
        args += ["--parallel.workers", "2", "--parallel.ray_address", cluster.address]
        proc = subprocess.run(
            [sys.executable, "-m", "automl_prune.cli", *args, "--out", str(out)],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
        assert [r["index"] for r in records] == list(range(1, 7))
        fresh = [r for r in records if r["node"] != "cache"]
        assert len({r["node"] for r in fresh}) == 2 and {r["worker"] for r in fresh} == {0, 1}
        # the refinement ran as Tune trials on the same cluster, both rungs
        refinement = json.loads((out / "refine.json").read_text())
        assert refinement["rungs_done"] == 2 and len(refinement["candidates"]) >= 2
    finally:
        cluster.shutdown()


def test_unreachable_cluster_is_a_clear_error_within_seconds(tmp_path) -> None:
    """`--ray-address` at a loopback port where nothing listens: one-line error, exit 2, nothing left running."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    args = ["search", "--search.strategy", "random", *DIGITS_QUICK, "--search.evaluations", "2"]
    args += ["--parallel.ray_address", f"127.0.0.1:{port}", "--out", str(tmp_path / "r")]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "automl_prune.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in proc.stderr
    assert time.perf_counter() - start < 60
