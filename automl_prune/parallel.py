"""Parallel evaluation on Ray: a pool of evaluation workers (plain Ray actors).

Each worker is a Ray actor that builds its own :class:`~automl_prune.evaluator.Evaluator`
once from an :class:`EvaluatorSpec` (the dense weights, the dataset arguments, the budget
and the scoring options), so the model and the search-val data are held once per worker,
not shipped per candidate. :meth:`RayEvaluatorPool.evaluate_many` spreads a batch of plans
over the workers and returns the evaluations in order, together with which worker and
which Ray node scored each; it plugs into ``Strategy.search(..., evaluate_many=...)``.

A worker that dies (killed process, exception in the actor) loses at most the plan it
was scoring: the worker is restarted and the plan retried once; if it fails again the plan
is recorded as an infeasible evaluation with the reason, and the search goes on.

Evaluations are deterministic given the plan (fixed BN-calibration batches, fixed
search-val subset, and the driver's latency model shared with every worker), so a
parallel search gives the same results as a serial one with the same seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from automl_prune.errors import AutomlPruneError, InvalidValueError
from automl_prune.evaluator import FAILED_REWARD, Evaluator, EvaluatorConfig
from automl_prune.measure.latency_model import LatencyModel
from automl_prune.models import ModelSpec, build_model
from automl_prune.types import Budget, Evaluation, Plan

logger = logging.getLogger(__name__)


@dataclass
class EvaluatorSpec:
    """Everything a worker needs to build the same evaluator as the driver.

    Attributes:
        model_spec: The dense model's spec.
        state_dict: Its trained weights.
        dataset: Dataset name.
        data_dir: Dataset directory (None for the default locations).
        val_size: Search-val size.
        data_seed: Seed of the splits.
        image_size: Image size override.
        budget: The budget.
        config: Scoring options.
        latency_model: The driver's fitted latency model (shared so that all workers
            predict the same latency and none measures the runtime again).
    """

    model_spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    dataset: str
    budget: Budget
    config: EvaluatorConfig
    data_dir: str | None = None
    val_size: int | None = None
    data_seed: int = 0
    image_size: int | None = None
    latency_model: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Evaluator:
        """Build the evaluator (loads the data and the model)."""
        from automl_prune.data import load_dataset

        data = load_dataset(
            self.dataset, self.data_dir, val_size=self.val_size, seed=self.data_seed, image_size=self.image_size
        )
        model = build_model(self.model_spec)
        model.load_state_dict(self.state_dict)
        latency = LatencyModel.from_dict(self.latency_model) if self.latency_model is not None else None
        evaluator = Evaluator(model.eval(), data, self.budget, self.config, latency_model=latency)
        return evaluator


def _failed(evaluator_like: dict[str, Any], reason: str) -> Evaluation:
    return Evaluation(
        accuracy=float("nan"),
        flops=evaluator_like.get("flops", 0),
        params=evaluator_like.get("params", 0),
        latency_ms=None,
        measured_latency_ms=None,
        flops_ratio=evaluator_like.get("flops_ratio", 0.0),
        reward=FAILED_REWARD,
        feasible=False,
        reason=reason,
    )


class _Worker:
    """Ray actor body: one evaluator, many plans."""

    def __init__(self, spec: EvaluatorSpec, index: int, threads: int):
        torch.set_num_threads(threads)
        import ray

        self.index = index
        self.node = ray.get_runtime_context().get_node_id()
        self.evaluator = spec.build()

    def evaluate(self, plan: dict[str, Any]) -> tuple[dict[str, Any], int, str]:
        evaluation = self.evaluator.evaluate(Plan.from_dict(plan))
        return evaluation.to_dict(), self.index, self.node

    def pid(self) -> int:
        return os.getpid()


def connect_ray(address: str, timeout: float = 15.0) -> None:
    """Join the Ray cluster at ``address``, or fail within ``timeout`` seconds with one clear error."""
    import ray

    errors: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or errors:
        try:
            ray.shutdown()
        finally:
            reason = f"{type(errors[0]).__name__}: {errors[0]}" if errors else f"no answer within {timeout:.0f} s"
        raise AutomlPruneError(f"cannot reach the Ray cluster at '{address}' ({reason}); check --parallel.ray_address")


def start_local_ray(workers: int, cpus_per_worker: int = 1) -> int:
    """Start Ray on this machine (loopback only) sized for ``workers`` x ``cpus_per_worker`` CPUs.

    Returns:
        The number of workers that fit: ``workers``, capped to the CPUs this machine has.
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind 127.0.0.1, not the public interface
    # a private instance on loopback, started and shut down by this process: no token to hand out
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    available = os.cpu_count() or 1
    if workers * cpus_per_worker > available:
        capped = max(1, available // cpus_per_worker)
        logger.warning(
            "%d workers x %d CPUs exceed the %d CPUs here; using %d workers",
            workers,
            cpus_per_worker,
            available,
            capped,
        )
        workers = capped
    ray.init(
        num_cpus=workers * cpus_per_worker, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    return workers


class RayEvaluatorPool:
    """Evaluation workers on Ray (local by default, or an existing cluster).

    Args:
        spec: How workers build their evaluator.
        workers: Number of worker actors.
        address: Ray cluster address (``"auto"`` or ``"HOST:PORT"``); None starts Ray locally.
        cpus_per_worker: CPUs reserved per worker (also its torch thread count).
        gpus_per_worker: GPU fraction per worker.
        connect_timeout: Seconds to wait for a cluster before giving up.

    Raises:
        AutomlPruneError: The cluster cannot be reached (nothing is left running).
    """

    def __init__(
        self,
        spec: EvaluatorSpec,
        workers: int = 2,
        address: str | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: float = 0.0,
        connect_timeout: float = 15.0,
    ):
        import ray

        if workers < 1:
            raise InvalidValueError(f"workers must be >= 1, got {workers}")
        self._started_ray = False
        if not ray.is_initialized():
            if address is None:
                workers = start_local_ray(workers, cpus_per_worker)
            else:
                connect_ray(address, connect_timeout)
            self._started_ray = True
        self.spec = spec
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        spec_ref = ray.put(spec)
        self._spec_ref = spec_ref
        self._actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        self._actors = [self._start(i) for i in range(workers)]
        self.placements: list[tuple[int, str]] = []
        self.retries = 0
        self.failures = 0

    def _start(self, index: int) -> Any:
        return self._actor_cls.remote(self._spec_ref, index, self.cpus_per_worker)

    def evaluate_many(self, plans: list[Plan]) -> list[Evaluation]:
        """Evaluate ``plans`` on the workers; results in the order of ``plans``."""
        import ray

        pending = {}
        for i, plan in enumerate(plans):
            pending[i] = (self._actors[i % self.workers].evaluate.remote(plan.to_dict()), i % self.workers, 0)
        results: dict[int, Evaluation] = {}
        where: dict[int, tuple[int, str]] = {}
        while pending:
            i, (ref, worker, attempt) = next(iter(pending.items()))
            del pending[i]
            try:
                data, index, node = ray.get(ref)
                results[i] = Evaluation(**data)
                where[i] = (index, node)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError, ray.exceptions.RayTaskError) as exc:
                logger.warning("worker %d failed on a plan (%s)", worker, type(exc).__name__)
                if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError)):
                    self._actors[worker] = self._start(worker)
                if attempt == 0:
                    self.retries += 1
                    pending[i] = (self._actors[worker].evaluate.remote(plans[i].to_dict()), worker, 1)
                else:
                    self.failures += 1
                    results[i] = _failed({}, f"worker failed twice: {type(exc).__name__}")
                    where[i] = (worker, "")
        self.placements.extend(where[i] for i in range(len(plans)))
        return [results[i] for i in range(len(plans))]

    def evaluate_many_cached(self, evaluator: Evaluator) -> Any:
        """A batch evaluator that serves ``evaluator``'s cache on the driver and sends only misses to workers.

        Fresh results go into the driver's cache too, so identical plans are never scored twice
        (and a resumed run's logged plans are not re-scored on workers). The returned function
        has a ``placements`` list: ``(worker, node)`` per evaluation in the order made, with
        ``(None, "cache")`` for cache hits.
        """
        placements: list[tuple[int | None, str]] = []

        def evaluate_many(plans: list[Plan]) -> list[Evaluation]:
            hits = [evaluator.cached(p) for p in plans]
            misses = [p for p, h in zip(plans, hits) if h is None]
            start = len(self.placements)
            fresh = iter(self.evaluate_many(misses) if misses else [])
            placed = iter(self.placements[start:])
            out = []
            for plan, hit in zip(plans, hits):
                if hit is not None:
                    out.append(hit)
                    placements.append((None, "cache"))
                else:
                    evaluation = next(fresh)
                    evaluator.preload(plan, evaluation)
                    out.append(evaluation)
                    placements.append(next(placed))
            return out

        evaluate_many.placements = placements  # type: ignore[attr-defined]
        return evaluate_many

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (for tests that kill one)."""
        import ray

        return ray.get([a.pid.remote() for a in self._actors])

    def close(self) -> None:
        """Stop the workers, and Ray itself if this pool started it."""
        import ray

        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> RayEvaluatorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spec_for(
    evaluator: Evaluator, model_spec: ModelSpec, dataset: str, device: str | None = None, **data_kwargs: Any
) -> EvaluatorSpec:
    """The spec that rebuilds ``evaluator`` in a worker (scoring on ``device``, default the evaluator's)."""
    return EvaluatorSpec(
        model_spec=model_spec,
        state_dict={k: v.detach().cpu() for k, v in evaluator.model.state_dict().items()},
        dataset=dataset,
        budget=evaluator.budget,
        config=evaluator.config if device is None else dataclasses.replace(evaluator.config, device=device),
        latency_model=evaluator.latency_model.to_dict() if evaluator.latency_model is not None else None,
        **data_kwargs,
    )
