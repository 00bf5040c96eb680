"""Measured inference latency, robust to a shared machine.

Every figure is measured on a :class:`~automl_prune.runtimes.Runner`, i.e. on the form of
the model that ships (onnxruntime session, frozen TorchScript or eager torch):

* :func:`time_runner` times one runner (garbage collector paused, threads pinned);
* :func:`measure_latency` converts a model to a runtime and times it once;
* :func:`measure_interleaved` times several runners in interleaved rounds (a, b, a, b, ...),
  so that a slowdown of the machine lands on all of them alike; it reports the median of
  the round medians with the p10/p90 of all runs, repeats a measurement whose rounds
  disagree or whose runs spread too widely, and flags it as noisy if it stays so;
* :func:`round_ratio` turns two interleaved measurements into a ratio (e.g. a pruned
  model's latency over the dense model's), which the machine's drift cancels out of.

Timings on this project's shared 2-core machine drift by 10-50% over minutes (BENCHMARKS.md);
ratios measured in interleaved rounds moved by a few percent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_prune.errors import InvalidValueError
from automl_prune.runtimes import Runner, get_runtime, resolve_device
from automl_prune.threads import check_threads, num_threads

logger = logging.getLogger(__name__)

__all__ = [
    "LatencyStats",
    "NOISE_ROUNDS",
    "NOISE_SPREAD",
    "SESSIONS",
    "cpu_model_name",
    "default_cache_dir",
    "hardware_slug",
    "measure_interleaved",
    "measure_latency",
    "num_threads",
    "round_ratio",
    "time_runner",
]

CACHE_ENV_VAR = "AUTOML_PRUNE_CACHE"
NOISE_ROUNDS = 0.25
"""A measurement whose round medians differ by more than this (max/min - 1) is noisy."""
NOISE_SPREAD = 1.0
"""A measurement whose p10-p90 range exceeds this fraction of its median is noisy."""
ROUND_MS = 50.0
"""Timed milliseconds per runner and round that :func:`measure_interleaved` aims for."""
MIN_RUNS_PER_ROUND = 5
MAX_RUNS_PER_ROUND = 500
SESSIONS = 3
"""Sessions a measurement that decides something is shared out among: the speed-up of one pruned
fashion_cnn file over its dense file measured x1.52-1.66 over eight fresh pairs of onnxruntime
sessions here, but x1.61-1.64 over three measurements of one pair (a session keeps its speed)."""


# --------------------------------------------------------------------------- helpers
def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive integers.

    Raises:
        InvalidValueError: When it is not one.
    """
    try:
        shape = tuple(input_shape)
    except TypeError as exc:
        raise InvalidValueError(f"input_shape must be a sequence of positive integers, got {input_shape!r}") from exc
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise InvalidValueError(f"input_shape must be a non-empty sequence of positive integers, got {input_shape!r}")
    return shape


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Disable the garbage collector inside the block so collections do not land in timed runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile (``q`` in [0, 100]) of already sorted values."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def time_runner(runner: Runner, warmup: int, runs: int) -> list[float]:
    """Call ``runner`` ``warmup`` times untimed, then ``runs`` times timed; return the run times in ms."""
    _check_count("warmup", warmup, 0)
    _check_count("runs", runs, 1)
    with runner.pinned():
        for _ in range(warmup):
            runner()
        times: list[float] = []
        with _gc_paused():
            for _ in range(runs):
                start = time.perf_counter()
                runner()
                times.append((time.perf_counter() - start) * 1000.0)
    return times


# --------------------------------------------------------------------------- statistics
@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated latency measurements of one model, input shape and runtime.

    Attributes:
        median_ms: Median run time in ms (for interleaved measurements: the median of the
            round medians), the headline figure.
        mean_ms: Mean run time in ms.
        p10_ms: 10th percentile run time in ms.
        p90_ms: 90th percentile run time in ms.
        std_ms: Sample standard deviation of the run times in ms (0 for one run).
        runs: Timed runs (all rounds together).
        warmup: Untimed warm-up runs before them.
        batch_size: Leading dimension of the input shape.
        threads: Intra-op threads during the measurement.
        device: Device the model ran on, e.g. ``"cpu"`` or ``"cuda:0"``.
        runtime: Runtime it ran in.
        rounds: Median of each interleaved round (one entry for a plain measurement).
        noisy: True when the rounds disagreed or the runs spread too widely even after
            repeating; the figure is then not to be taken as fact.
        note: Why it is noisy ("" otherwise).
    """

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    std_ms: float
    runs: int
    warmup: int
    batch_size: int
    threads: int
    device: str
    runtime: str = "torch"
    rounds: tuple[float, ...] = ()
    noisy: bool = False
    note: str = ""

    @classmethod
    def from_times(
        cls,
        times_ms: Sequence[float],
        *,
        warmup: int,
        batch_size: int,
        threads: int,
        device: str,
        runtime: str = "torch",
        rounds: Sequence[Sequence[float]] | None = None,
    ) -> LatencyStats:
        """Summarise run times (pooled over ``rounds`` when given).

        Raises:
            InvalidValueError: For an empty list.
        """
        if rounds is not None:
            times_ms = [t for r in rounds for t in r]
        if not times_ms:
            raise InvalidValueError("cannot summarise an empty list of run times")
        ordered = sorted(float(t) for t in times_ms)
        medians = tuple(float(statistics.median(r)) for r in rounds) if rounds else (float(statistics.median(ordered)),)
        return cls(
            median_ms=float(statistics.median(medians)),
            mean_ms=float(statistics.fmean(ordered)),
            p10_ms=_percentile(ordered, 10),
            p90_ms=_percentile(ordered, 90),
            std_ms=float(statistics.stdev(ordered)) if len(ordered) > 1 else 0.0,
            runs=len(ordered),
            warmup=warmup,
            batch_size=batch_size,
            threads=threads,
            device=device,
            runtime=runtime,
            rounds=medians,
        )

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the run times."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else math.inf

    @property
    def round_disagreement(self) -> float:
        """max / min of the round medians, minus one (0 for one round)."""
        return _disagreement(self.rounds)

    def describe(self) -> str:
        """``0.123 ms (p10-p90 0.110-0.140)``, with a noise flag when noisy."""
        text = f"{self.median_ms:.4g} ms (p10-p90 {self.p10_ms:.4g}-{self.p90_ms:.4g})"
        return text + (f" [NOISY: {self.note}]" if self.noisy else "")

    def to_dict(self) -> dict[str, Any]:
        """Return the statistics as a JSON-serialisable dict."""
        out = dataclasses.asdict(self)
        out["rounds"] = list(self.rounds)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyStats:
        """The statistics :meth:`to_dict` wrote."""
        return cls(**{**data, "rounds": tuple(data.get("rounds", ()))})


def round_ratio(numerator: LatencyStats, denominator: LatencyStats) -> float:
    """Median over rounds of ``numerator``'s round median over ``denominator``'s.

    For two runners measured in the same interleaved rounds this ratio cancels a machine
    that slowed down or sped up during the measurement.
    """
    pairs = list(zip(numerator.rounds, denominator.rounds))
    if not pairs:
        return numerator.median_ms / denominator.median_ms
    return float(statistics.median(a / b for a, b in pairs if b > 0))


# --------------------------------------------------------------------------- measuring
def _stats(
    runner: Runner, rounds: Sequence[Sequence[float]], warmup: int, noisy: bool = False, note: str = ""
) -> LatencyStats:
    stats = LatencyStats.from_times(
        [],
        warmup=warmup,
        batch_size=runner.input_shape[0],
        threads=runner.threads,
        device=str(runner.device),
        runtime=runner.runtime,
        rounds=rounds,
    )
    return dataclasses.replace(stats, noisy=noisy, note=note)


def measure_runner(runner: Runner, warmup: int = 10, runs: int = 30) -> LatencyStats:
    """One plain measurement of ``runner``: ``warmup`` untimed, then ``runs`` timed calls."""
    return _stats(runner, [time_runner(runner, warmup, runs)], warmup)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 30,
    runtime: str = "torch",
) -> LatencyStats:
    """Measure ``model`` converted to ``runtime`` (as it would be exported) on a random input.

    The caller's model is not modified (the runtime converts a copy).

    Args:
        model: The network to time.
        input_shape: Full input shape including the batch dimension, e.g. ``(1, 3, 32, 32)``.
        device: ``"cpu"`` or ``"cuda[:index]"``.
        threads: Intra-op threads (``None``: torch's current setting, recorded either way).
        warmup: Untimed runs before timing (>= 0).
        runs: Timed runs (>= 1).
        runtime: ``"torch"``, ``"torchscript"`` or ``"onnxruntime"``.

    Returns:
        The run-time statistics.

    Raises:
        InvalidValueError: For an unknown or unavailable device or runtime, ``threads < 1``,
            a bad shape, ``warmup < 0`` or ``runs < 1``.
        UnknownNameError: For an unknown runtime name.
    """
    resolve_device(device)
    check_threads(threads, allow_none=True)
    _check_count("warmup", warmup, 0)
    _check_count("runs", runs, 1)
    shape = check_shape(input_shape)
    with get_runtime(runtime).compile(model, shape, device, threads) as runner:
        stats = measure_runner(runner, warmup, runs)
    logger.debug("measured %s on %s in %s: %s", type(model).__name__, shape, runtime, stats.describe())
    return stats


def _runs_for(runner: Runner, runs: int | None) -> int:
    """Timed runs per round: ``runs``, or enough for about :data:`ROUND_MS` (within the min and max per round)."""
    if runs is not None:
        return runs
    probe = statistics.median(time_runner(runner, 0, 3))
    return max(MIN_RUNS_PER_ROUND, min(MAX_RUNS_PER_ROUND, math.ceil(ROUND_MS / max(probe, 1e-3))))


def _disagreement(rounds: Sequence[float]) -> float:
    """max / min of per-round figures, minus one (0 for one round)."""
    return max(rounds) / min(rounds) - 1.0 if len(rounds) > 1 and min(rounds) > 0 else 0.0


def _noise(stats: Mapping[str, LatencyStats], label: str, reference: str | None) -> str:
    """Why ``stats[label]`` is too noisy to trust ("" when it is not).

    Measured against a ``reference``, what must hold still is the per-round ratio to it
    (a machine that slows down for a round slows both alike); alone, the round medians.
    """
    s = stats[label]
    reasons = []
    if reference is None:
        disagreement = s.round_disagreement
    elif label == reference:
        disagreement = 0.0
    else:
        ref = stats[reference]
        disagreement = _disagreement([a / b for a, b in zip(s.rounds, ref.rounds) if b > 0])
    if disagreement > NOISE_ROUNDS:
        what = f"its ratio to {reference} varies" if reference and label != reference else "rounds disagree"
        reasons.append(f"{what} by {disagreement:.0%} between rounds")
    if s.spread > NOISE_SPREAD:
        reasons.append(f"p10-p90 spread {s.spread:.0%} of the median")
    return ", ".join(reasons)


def measure_interleaved(
    runners: Mapping[str, Runner],
    *,
    rounds: int = 5,
    runs: int | None = None,
    warmup: int = 5,
    retries: int = 2,
    reference: str | None = None,
    sessions: int = 1,
) -> dict[str, LatencyStats]:
    """Time ``runners`` in interleaved rounds; repeat a noisy measurement, then flag it.

    Each round times every runner in turn (``runs`` calls each, or enough for about
    :data:`ROUND_MS`). With ``sessions`` > 1 the rounds are shared out among that many sets
    of runners: the given ones, then fresh ones (:meth:`Runner.reopen`, warmed up like the
    first) for the later shares, so that a figure holds for the model and not for one
    session that happened to run fast or slow (see :data:`SESSIONS`). A runner is noisy
    when its round medians (or, with a ``reference``, its per-round ratios to the
    reference) disagree by more than :data:`NOISE_ROUNDS`, or
    its p10-p90 range exceeds :data:`NOISE_SPREAD` of its median. While any runner is noisy
    the whole measurement is repeated (up to ``retries`` times); the least noisy attempt is
    returned, its still-noisy runners flagged (``noisy`` and ``note``) and logged as a warning.

    Args:
        runners: Label -> runner (e.g. ``{"dense": ..., "pruned": ...}``).
        rounds: Interleaved rounds (>= 1).
        runs: Timed calls per runner and round (None: adapted to the runner's speed).
        warmup: Untimed calls per runner before the first round.
        retries: Repeats of a noisy measurement.
        reference: Label of the runner the others are compared with (their ratios to it
            must hold still, not their absolute times).
        sessions: Sets of runners the rounds are shared out among (>= 1; at most ``rounds``
            are used).

    Returns:
        Label -> statistics, in the order given.
    """
    _check_count("rounds", rounds, 1)
    _check_count("retries", retries, 0)
    _check_count("sessions", sessions, 1)
    sessions = min(sessions, rounds)
    if runs is not None:
        _check_count("runs", runs, 1)
    if reference is not None and reference not in runners:
        raise InvalidValueError(f"reference {reference!r} is not one of the runners {sorted(runners)}")
    _warm_up(runners, warmup)
    counts = {label: _runs_for(r, runs) for label, r in runners.items()}
    shares = [rounds // sessions + (1 if i < rounds % sessions else 0) for i in range(sessions)]
    best: dict[str, LatencyStats] | None = None
    best_notes: dict[str, str] = {}
    for attempt in range(retries + 1):
        times: dict[str, list[list[float]]] = {label: [] for label in runners}
        for index, share in enumerate(shares):
            current = _fresh(runners, warmup) if index else runners
            try:
                for _ in range(share):
                    for label, runner in current.items():
                        times[label].append(time_runner(runner, 0, counts[label]))
            finally:
                if index:
                    for runner in current.values():
                        runner.close()
        stats = {label: _stats(runners[label], times[label], warmup) for label in runners}
        notes = {label: _noise(stats, label, reference) for label in runners}
        if best is None or sum(map(bool, notes.values())) < sum(map(bool, best_notes.values())):
            best, best_notes = stats, notes
        if not any(notes.values()):
            break
        if attempt < retries:
            text = "; ".join(f"{k}: {v}" for k, v in notes.items() if v)
            logger.info("latency measurement %d was noisy (%s); measuring again", attempt + 1, text)
    assert best is not None
    out = {}
    for label, s in best.items():
        note = best_notes[label]
        if note:
            note += _load_note()
            logger.warning("latency of %s is noisy: %s (%s)", label, s.describe(), note)
        out[label] = dataclasses.replace(s, noisy=bool(note), note=note)
    return out


def _warm_up(runners: Mapping[str, Runner], warmup: int) -> None:
    """``warmup`` untimed calls of each runner."""
    for runner in runners.values():
        with runner.pinned():
            for _ in range(warmup):
                runner()


def _fresh(runners: Mapping[str, Runner], warmup: int) -> dict[str, Runner]:
    """A fresh, warmed-up set of ``runners`` (:meth:`Runner.reopen`), for the caller to close."""
    fresh = {label: runner.reopen() for label, runner in runners.items()}
    _warm_up(fresh, warmup)
    return fresh


def _load_note() -> str:
    """``; load average 3.1 on 2 cores`` when the machine is busier than its cores, else ""."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    return f"; load average {load:.1f} on {cores} cores" if load > cores else ""


# --------------------------------------------------------------------------- machine
def default_cache_dir() -> Path:
    """Cache root: ``$AUTOML_PRUNE_CACHE`` if set, else ``~/.cache/automl-prune``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "automl-prune"


def slug(text: str, max_len: int = 60) -> str:
    """Lower-case, filename-safe form of ``text``."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return out[:max_len].rstrip("-") or "unknown"


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where available)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def hardware_slug(device: str | torch.device) -> str:
    """Filename-safe name of the hardware behind ``device``: the CPU model or the GPU name.

    Args:
        device: ``"cpu"`` or ``"cuda[:index]"``.

    Returns:
        A lower-case slug such as ``"amd-epyc"`` or ``"nvidia-h100-80gb-hbm3"``.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return slug(torch.cuda.get_device_name(dev))
    return slug(cpu_model_name())
