"""Parallel evaluation on Ray: a pool of evaluation workers (plain Ray actors).

Each worker is a Ray actor that builds its own :class:`~automl_prune.evaluator.Evaluator`
once from an :class:`EvaluatorSpec` (the dense weights, the dataset arguments, the budget
and the scoring options), so the model and the search-val data are held once per worker,
not shipped per candidate. :meth:`RayEvaluatorPool.evaluate_many` hands each plan of a batch
to the next free worker and returns the evaluations in the order of the plans, together with
which worker and which Ray node scored each and in how many attempts; it plugs into
``Strategy.search(..., evaluate_many=...)``.

Faults never hang a search; every wait is bounded:

- A worker that dies (killed process, lost node) loses at most the plan it was scoring. Ray
  restarts the actor (``max_restarts``), wherever the cluster has room; the plan is resubmitted
  at once to the next live worker (Ray's own task retry would wait for the same actor, which
  on a lost node may never come back). A plan that fails twice is recorded as a failed
  evaluation with the reason, and the search goes on.
- An evaluation running longer than ``task_timeout`` seconds is abandoned the same way (its
  worker is killed and restarted by Ray, the plan resubmitted).
- When no worker has been alive for ``start_timeout`` seconds (every one lost, or restarts
  waiting for resources a lost node took with it), the search stops with one clear error; the
  evaluations made so far are in the run's log, and ``--resume`` goes on from there.

Every resubmission, restart and failure is counted (:class:`PoolStats`, written to the run's
``result.json`` and report), and each evaluation's attempts are in ``evaluations.jsonl``.

Evaluations are deterministic given the plan (fixed BN-calibration batches, fixed
search-val subset, and the driver's latency model shared with every worker), so a
parallel search gives the same results as a serial one with the same seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
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

    def ready(self) -> tuple[str, int, int]:
        """(node id, process id, niceness): answered once the evaluator is built."""
        return self.node, os.getpid(), os.getpriority(os.PRIO_PROCESS, 0)

    def evaluate(self, plan: dict[str, Any]) -> tuple[dict[str, Any], int, str]:
        evaluation = self.evaluator.evaluate(Plan.from_dict(plan))
        return evaluation.to_dict(), self.index, self.node


@dataclass(frozen=True)
class Placement:
    """Where one evaluation was made.

    Attributes:
        worker: Worker index (None for a cache hit).
        node: Ray node id (``"cache"`` for a cache hit, ``""`` when every attempt failed).
        attempts: Submissions it took (2 when a lost worker's plan was resubmitted).
    """

    worker: int | None
    node: str
    attempts: int = 1


@dataclass
class PoolStats:
    """Faults a pool met, counted.

    Attributes:
        resubmitted: Plans sent again to another worker after their worker died or timed out.
        restarts: Workers Ray restarted after they died.
        timeouts: Evaluations abandoned after ``task_timeout`` seconds.
        failed: Plans recorded as failed evaluations after their last attempt.
        lost: Workers dead for good (no restart left) or still waiting for resources at the end.
    """

    resubmitted: int = 0
    restarts: int = 0
    timeouts: int = 0
    failed: int = 0
    lost: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def probe_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail at once when nothing listens at ``address`` (``HOST:PORT``; ``auto`` and ``ray://`` are left to Ray).

    Run before any data is loaded or any model trained, so a mistyped address costs seconds.

    Raises:
        AutomlPruneError: The port refuses the connection or does not answer within ``timeout``.
    """
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise AutomlPruneError(
            f"cannot reach the Ray cluster at '{address}' ({reason}); check --parallel.ray_address"
        ) from None


def connect_ray(address: str, timeout: float = 15.0) -> None:
    """Join the Ray cluster at ``address``, or fail within ``timeout`` seconds with one clear error."""
    import ray

    probe_ray_address(address)

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
    # Ray starts workers at niceness 15 by default. The workers are this search's compute (the driver
    # mostly waits): at that niceness any other busy process on the machine starves them (measured:
    # evaluations 60x slower than serial at a load average of 4). Workers compete as the serial search does.
    os.environ.setdefault("RAY_worker_niceness", "0")
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
        address="local",  # a private instance even where `ray start` left a cluster for ray.init() to find
        num_cpus=workers * cpus_per_worker,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return workers


def fit_tuner(tuner: Any) -> Any:
    """Run ``tuner.fit()`` and stop as any Ctrl-C does when Tune was stopped by a signal.

    On Ctrl-C during ``fit`` Tune saves its experiment state and returns early, with the
    unfinished trials holding neither a result checkpoint nor an error; its SIGINT handler stays
    installed after ``fit`` returns and would swallow the next Ctrl-C. This puts back the
    handlers that were in place and raises :class:`KeyboardInterrupt` when Tune stopped early, so
    the caller keeps what finished and suggests a resume.

    Returns:
        Tune's ``ResultGrid``.

    Raises:
        KeyboardInterrupt: Tune stopped on a signal before every trial ended.
    """
    import signal

    caught = [signal.SIGINT, signal.SIGUSR1] if threading.current_thread() is threading.main_thread() else []
    saved = {number: signal.getsignal(number) for number in caught}
    try:
        grid = tuner.fit()
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
    if any(result.error is None and result.checkpoint is None for result in grid):
        raise KeyboardInterrupt
    return grid


class NoWorkerLeftError(AutomlPruneError):
    """No evaluation worker has been alive for the pool's ``start_timeout``."""


_STARTING, _IDLE, _BUSY, _DEAD = "starting", "idle", "busy", "dead"


class RayEvaluatorPool:
    """Evaluation workers on Ray (local by default, or an existing cluster).

    Args:
        spec: How workers build their evaluator.
        workers: Number of worker actors.
        address: Ray cluster address (``"auto"`` or ``"HOST:PORT"``); None starts Ray locally.
        cpus_per_worker: CPUs reserved per worker (also its torch thread count).
        gpus_per_worker: GPU fraction per worker.
        connect_timeout: Seconds to wait for a cluster before giving up.
        task_timeout: Seconds one evaluation may run before it is abandoned and resubmitted.
        start_timeout: Seconds without any live worker before :class:`NoWorkerLeftError`.
        max_restarts: Restarts Ray makes of each worker actor.

    Attributes:
        placements: Where each evaluation was made, in the order made.
        stats: The faults met, counted.
        peak_running: The most plans out on workers at once (``workers`` once a batch at least
            that large met every worker idle).

    Raises:
        AutomlPruneError: The cluster cannot be reached (nothing is left running).
    """

    MAX_ATTEMPTS = 2
    POLL_SECONDS = 1.0

    def __init__(
        self,
        spec: EvaluatorSpec,
        workers: int = 2,
        address: str | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: float = 0.0,
        connect_timeout: float = 15.0,
        task_timeout: float = 600.0,
        start_timeout: float = 120.0,
        max_restarts: int = 3,
    ):
        import ray

        if workers < 1:
            raise InvalidValueError(f"workers must be >= 1, got {workers}")
        if task_timeout <= 0 or start_timeout <= 0:
            raise InvalidValueError("task_timeout and start_timeout must be positive numbers of seconds")
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
        self.task_timeout = task_timeout
        self.start_timeout = start_timeout
        self._spec_ref = ray.put(spec)
        self._actor_cls = ray.remote(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=max_restarts, max_task_retries=0
        )(_Worker)
        self._actors = [self._actor_cls.remote(self._spec_ref, i, cpus_per_worker) for i in range(workers)]
        self._state = [_STARTING] * workers
        self._nodes = [""] * workers
        self._pids = [0] * workers
        self._deaths = [0] * workers
        self._pings: dict[Any, int] = {}  # a ready() call out to a worker -> the worker
        self._repings: dict[int, float] = {}  # worker -> when to ask again whether it is back
        for worker in range(workers):
            self._ping(worker)
        self._last_alive = time.monotonic()
        self._niced_nodes: set[str] = set()  # nodes whose workers run below this process's priority (warned)
        self._next = 0  # where the search for a free worker starts (spreads single plans over the workers)
        self.placements: list[Placement] = []
        self.stats = PoolStats()
        self.peak_running = 0  # most plans out on workers at once

    # ------------------------------------------------------------------ workers
    def _ping(self, worker: int) -> None:
        """Ask ``worker`` whether it is up (again); it takes plans once it answers."""
        self._state[worker] = _STARTING
        self._pings[self._actors[worker].ready.remote()] = worker

    def _died(self, worker: int, why: str) -> None:
        logger.warning("evaluation worker %d is down (%s); Ray restarts it where there is room", worker, why)
        self._deaths[worker] += 1
        self._ping(worker)

    def _answered(self, ref: Any) -> None:
        import ray

        worker = self._pings.pop(ref)
        if self._state[worker] != _STARTING:  # an older ping, answered after the worker was up again
            return
        try:
            self._nodes[worker], self._pids[worker], niceness = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if any(w == worker for w in self._pings.values()):
                return  # a newer ping is still out
            if isinstance(exc, ray.exceptions.ActorDiedError):  # no restart left (or its node will not return)
                logger.warning("evaluation worker %d is lost for good (%s)", worker, exc.__class__.__name__)
                self._state[worker] = _DEAD
            else:  # restarting (ActorUnavailableError) or not placed yet: ask again shortly
                self._repings[worker] = time.monotonic() + self.POLL_SECONDS
            return
        if niceness > os.getpriority(os.PRIO_PROCESS, 0) and self._nodes[worker] not in self._niced_nodes:
            self._niced_nodes.add(self._nodes[worker])
            logger.warning(
                "evaluation workers on node %s run at niceness %d (Ray's default is 15): any other busy process "
                "there slows them down many times over; start that node as `RAY_worker_niceness=0 ray start ...`",
                self._nodes[worker][:8],
                niceness,
            )
        if self._deaths[worker]:
            self.stats.restarts += 1
            logger.info("evaluation worker %d is back on node %s", worker, self._nodes[worker][:8])
        self._state[worker] = _IDLE

    def _wait(self, refs: list[Any]) -> list[Any]:
        """Refs among ``refs`` (and the pings) that are done within one poll; pings handled, re-pings sent."""
        import ray

        now = time.monotonic()
        for worker, due in list(self._repings.items()):
            if due <= now:
                del self._repings[worker]
                if self._state[worker] == _STARTING:
                    self._ping(worker)
        waitable = [*refs, *self._pings]
        if not waitable:
            time.sleep(self.POLL_SECONDS)
            return []
        done, _ = ray.wait(waitable, num_returns=1, timeout=self.POLL_SECONDS)
        out = []
        for ref in done:
            if ref in self._pings:
                self._answered(ref)
            else:
                out.append(ref)
        return out

    def _check_alive(self, now: float) -> None:
        if any(state in (_IDLE, _BUSY) for state in self._state):
            self._last_alive = now
            return
        waited = now - self._last_alive
        if all(state == _DEAD for state in self._state) or waited > self.start_timeout:
            down = sum(state == _DEAD for state in self._state)
            if not any(self._pids) and not down:  # no worker has ever answered
                raise NoWorkerLeftError(
                    f"none of the {self.workers} evaluation workers started within {waited:.0f} s: Ray could not "
                    f"place them (the cluster lacks the {self.cpus_per_worker} CPU(s) and {self.gpus_per_worker:g} "
                    "GPU(s) each asks for) or they are still starting on a loaded machine; resume with a lower "
                    "--parallel.cpus_per_worker or --parallel.gpus_per_worker or a larger --parallel.worker_timeout "
                    "(e.g. `automl-prune search --resume DIR --parallel.gpus_per_worker 0`)"
                )
            raise NoWorkerLeftError(
                f"no evaluation worker is left: {down} of {self.workers} lost for good, the others waiting "
                f"{waited:.0f} s for resources (a node was lost, or the cluster is full); the evaluations made so far "
                "are in the run's log: add resources, then --resume (which also takes --parallel.ray_address, "
                "--parallel.cpus_per_worker, --parallel.gpus_per_worker and the timeouts)"
            )

    # ------------------------------------------------------------------ evaluation
    def evaluate_many(self, plans: list[Plan]) -> list[Evaluation]:
        """Evaluate ``plans`` on the workers, each plan going to the next free worker.

        Returns:
            The evaluations in the order of ``plans``; :attr:`placements` gets one
            :class:`Placement` per plan, in the same order.

        Raises:
            NoWorkerLeftError: No worker alive for ``start_timeout`` seconds.
        """
        import ray

        queue = deque(range(len(plans)))
        attempts = [0] * len(plans)
        results: dict[int, Evaluation] = {}
        where: dict[int, Placement] = {}
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (plan, worker, started)

        def give_up_or_resubmit(i: int, worker: int, why: str) -> None:
            if attempts[i] < self.MAX_ATTEMPTS:
                self.stats.resubmitted += 1
                queue.appendleft(i)
            else:
                self.stats.failed += 1
                results[i] = _failed({}, f"worker failed {attempts[i]} times: {why}")
                where[i] = Placement(worker, "", attempts[i])

        while queue or running:
            start = self._next
            for k in range(self.workers):  # free workers in turn, starting after the last one given a plan
                worker = (start + k) % self.workers
                if self._state[worker] == _IDLE and queue:
                    i = queue.popleft()
                    attempts[i] += 1
                    ref = self._actors[worker].evaluate.remote(plans[i].to_dict())
                    running[ref] = (i, worker, time.monotonic())
                    self._state[worker] = _BUSY
                    self._next = worker + 1
            self.peak_running = max(self.peak_running, len(running))
            for ref in self._wait(list(running)):
                i, worker, _ = running.pop(ref)
                try:
                    data, index, node = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    why = type(exc).__name__
                    self._died(worker, why)
                    give_up_or_resubmit(i, worker, why)
                    continue
                self._state[worker] = _IDLE
                results[i] = Evaluation(**data)
                where[i] = Placement(index, node, attempts[i])
            now = time.monotonic()
            for ref, (i, worker, started) in list(running.items()):
                if now - started > self.task_timeout:
                    del running[ref]
                    self.stats.timeouts += 1
                    ray.kill(self._actors[worker], no_restart=False)  # Ray restarts it
                    self._died(worker, f"no result after {self.task_timeout:.0f} s")
                    give_up_or_resubmit(i, worker, f"timed out after {self.task_timeout:.0f} s")
            self._check_alive(now)
        self.placements.extend(where[i] for i in range(len(plans)))
        return [results[i] for i in range(len(plans))]

    def evaluate_many_cached(self, evaluator: Evaluator) -> Any:
        """A batch evaluator that serves ``evaluator``'s cache on the driver and sends only misses to workers.

        Fresh results go into the driver's cache too, so identical plans are never scored twice
        (and a resumed run's logged plans are not re-scored on workers). The returned function
        has a ``placements`` list: a :class:`Placement` per evaluation in the order made, with
        ``Placement(None, "cache", 0)`` for cache hits.
        """
        placements: list[Placement] = []

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
                    placements.append(Placement(None, "cache", 0))
                else:
                    evaluation = next(fresh)
                    evaluator.preload(plan, evaluation)
                    out.append(evaluation)
                    placements.append(next(placed))
            return out

        evaluate_many.placements = placements  # type: ignore[attr-defined]
        return evaluate_many

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests that kill one), waiting up to ``start_timeout`` for starting ones."""
        deadline = time.monotonic() + self.start_timeout
        while _STARTING in self._state and time.monotonic() < deadline:
            self._wait([])
        return [self._pids[i] for i, state in enumerate(self._state) if state in (_IDLE, _BUSY)]

    def worker_nodes(self) -> list[str]:
        """Ray node id of each worker as last seen (``""`` before it first answered)."""
        return list(self._nodes)

    def close(self) -> None:
        """Stop the workers (no restart, nothing orphaned), and Ray itself if this pool started it."""
        import ray

        self.stats.lost = sum(
            state in (_DEAD, _STARTING) and self._deaths[i] > 0 for i, state in enumerate(self._state)
        )
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        self._pings = {}
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
