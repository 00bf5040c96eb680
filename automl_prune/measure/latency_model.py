"""Predicted latency of a pruned model on its deployment runtime, fitted on measured plans.

Summing per-layer latencies measured in isolation predicted onnxruntime poorly here (median
errors of 10-25%, BENCHMARKS.md "Latency prediction"): a runtime fuses layers, keeps a
blocked memory layout across them and picks kernels by channel count, none of which a layer
timed alone shows. So the prediction is fitted on whole plans measured on the runtime:

1. **Measured plans** (:class:`LatencyTable`): a few pruned versions of the dense model
   (the min-keep plan, uniform plans, random plans) are built, converted to the runtime and
   timed *interleaved with the dense model*; each entry stores the plan's latency as a
   ratio to the dense model's, which the machine's drift cancels out of. Tables are cached
   per runtime, device, hardware, threads, batch size and architecture; measurements that
   stayed noisy are used in the run that made them but never cached; plans measured later
   (a search's finalists) are added.
2. **Model** (:class:`LatencyModel`): latency ratio = intercept + a non-negative weighted
   sum of layer features computed exactly from the plan's kept channel counts
   (:meth:`~automl_prune.graph.LayerGraph.layer_shapes`), so predicting a plan costs no model
   building. Three feature sets are fitted (total FLOPs; FLOPs and output activations per
   output resolution; FLOPs per layer kind and resolution plus activations per resolution)
   and the simplest whose leave-one-out error on the measured plans is within
   :data:`OCCAM` of the lowest is kept; that error is reported.
3. **Scale**: predicted ms = predicted ratio x the dense model's latency measured at
   calibration time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_prune.errors import InvalidValueError
from automl_prune.graph import LayerGraph, LayerShape
from automl_prune.io import write_json
from automl_prune.measure.latency import (
    SESSIONS,
    LatencyStats,
    default_cache_dir,
    hardware_slug,
    measure_interleaved,
    round_ratio,
    slug,
)
from automl_prune.progress import track
from automl_prune.pruning import rebuild_structure
from automl_prune.runtimes import Runner, get_runtime, resolve_device
from automl_prune.types import Plan

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_SETS",
    "LatencyCheck",
    "LatencyModel",
    "LatencyTable",
    "Measured",
    "calibrate",
    "calibration_plans",
    "check_latency",
]

_FORMAT = "automl-prune-latency-table"
_VERSION = 2
DRIFT = 0.25
"""Relative change of the dense model's latency since a table was built that is worth a warning."""
OUTLIER = 3.0
"""A calibration plan whose leave-one-out error exceeds this many times the median one (and 10%) is measured again."""
OCCAM = 0.15
"""A richer feature set is chosen only when its leave-one-out error is this much (relative) below a simpler one's."""


# --------------------------------------------------------------------------- features
def _flops_features(shapes: Sequence[LayerShape]) -> dict[str, float]:
    return {"flops": float(sum(s.flops for s in shapes))}


def _resolution_features(shapes: Sequence[LayerShape]) -> dict[str, float]:
    """FLOPs and output activations per output size."""
    out: dict[str, float] = {}
    for s in shapes:
        where = f"{s.out_size[0]}x{s.out_size[1]}"
        out[f"flops@{where}"] = out.get(f"flops@{where}", 0.0) + s.flops
        act = f"activations@{where}"
        out[act] = out.get(act, 0.0) + s.out_channels * s.out_size[0] * s.out_size[1] * s.positions
    return out


def _layer_features(shapes: Sequence[LayerShape]) -> dict[str, float]:
    """FLOPs per (layer kind, kernel, output size) and output activations per output size."""
    out: dict[str, float] = {}
    for s in shapes:
        where = f"{s.out_size[0]}x{s.out_size[1]}"
        kind = f"{s.kind}{s.kernel[0]}x{s.kernel[1]}@{where}"
        out[kind] = out.get(kind, 0.0) + s.flops
        act = f"activations@{where}"
        out[act] = out.get(act, 0.0) + s.out_channels * s.out_size[0] * s.out_size[1] * s.positions
    return out


FEATURE_SETS: dict[str, Callable[[Sequence[LayerShape]], dict[str, float]]] = {
    "flops": _flops_features,
    "resolutions": _resolution_features,
    "layers": _layer_features,
}
"""Feature sets a latency model may be fitted on, simplest first (see :meth:`LatencyModel.fit`)."""


def _design(rows: Sequence[Mapping[str, float]], columns: Sequence[str], scale: Sequence[float]) -> np.ndarray:
    x = np.array([[row.get(c, 0.0) / s for c, s in zip(columns, scale)] for row in rows], dtype=np.float64)
    return np.hstack([x, np.ones((len(rows), 1))])


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of relative errors: rows weighted by 1/y."""
    from scipy.optimize import nnls

    w = 1.0 / y
    coef, _ = nnls(a * w[:, None], y * w)
    return coef


# --------------------------------------------------------------------------- model
@dataclasses.dataclass
class LatencyModel:
    """Latency of any plan of one dense architecture on one runtime, device, thread count and batch size.

    Attributes:
        features: Name of the feature set (a key of :data:`FEATURE_SETS`).
        columns: Feature names, in coefficient order.
        scale: The dense model's value of each feature (features are divided by it).
        coef: Non-negative weights of the scaled features, then the intercept.
        dense_ms: The dense model's latency when the model was fitted.
        runtime: Runtime name.
        device: Device name.
        threads: Intra-op threads.
        batch_size: Batch size.
        plans: Measured plans it was fitted on (the dense model included).
        noisy_plans: How many of them stayed noisy (used, not cached).
        loo_median: Median leave-one-out relative error on the measured plans.
        loo_p90: 90th percentile of that error.
        loo_within_10: Share of measured plans predicted within 10% when left out.
        loo_errors: The leave-one-out relative error of each measured plan, in the order fitted.
    """

    features: str
    columns: list[str]
    scale: list[float]
    coef: list[float]
    dense_ms: float
    runtime: str
    device: str
    threads: int
    batch_size: int
    plans: int
    noisy_plans: int = 0
    loo_median: float = math.nan
    loo_p90: float = math.nan
    loo_within_10: float = math.nan
    loo_errors: list[float] = dataclasses.field(default_factory=list)

    def predict_ratio(self, shapes: Sequence[LayerShape]) -> float:
        """Predicted latency of the pruned model with these layers, relative to the dense model."""
        row = _design([FEATURE_SETS[self.features](shapes)], self.columns, self.scale)[0]
        return float(row @ np.asarray(self.coef))

    def predict_ms(self, shapes: Sequence[LayerShape]) -> float:
        """Predicted latency in ms (the ratio times the dense model's measured latency)."""
        return self.predict_ratio(shapes) * self.dense_ms

    def describe(self) -> str:
        """One line: what it was fitted on and how well it predicts plans it did not see."""
        return (
            f"{self.runtime} latency model fitted on {self.plans} measured plans ({self.features} features); "
            f"leave-one-out error median {self.loo_median:.1%}, p90 {self.loo_p90:.1%}, "
            f"{self.loo_within_10:.0%} within 10%"
            + (f"; {self.noisy_plans} noisy measurement(s)" if self.noisy_plans else "")
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyModel:
        """Rebuild a model saved with :meth:`to_dict`.

        Raises:
            InvalidValueError: When ``data`` is not one.
        """
        try:
            model = cls(**dict(data))
        except TypeError as exc:
            raise InvalidValueError(f"not a latency model ({exc})") from None
        if model.features not in FEATURE_SETS or len(model.coef) != len(model.columns) + 1:
            raise InvalidValueError("not a latency model (unknown features or coefficient count)")
        return model

    @classmethod
    def fit(
        cls,
        shapes: Sequence[Sequence[LayerShape]],
        ratios: Sequence[float],
        dense_ms: float,
        meta: Mapping[str, Any],
        noisy_plans: int = 0,
        feature_sets: Sequence[str] | None = None,
    ) -> LatencyModel:
        """Fit every feature set on measured plans and keep the simplest with about the lowest leave-one-out error.

        Args:
            shapes: Layer shapes of each measured plan; the first must be the dense model's.
            ratios: Measured latency of each plan over the dense model's (1.0 for the dense model).
            dense_ms: The dense model's measured latency.
            meta: ``runtime``, ``device``, ``threads`` and ``batch_size``.
            noisy_plans: How many measurements stayed noisy.
            feature_sets: Restrict the choice to these keys of :data:`FEATURE_SETS` (default: all).
        """
        y = np.asarray(ratios, dtype=np.float64)
        if len(y) < 3 or np.any(~np.isfinite(y)) or np.any(y <= 0):
            raise InvalidValueError("a latency model needs at least 3 measured plans with positive latencies")
        fitted: list[tuple[float, LatencyModel]] = []
        for name, make in FEATURE_SETS.items():  # from the simplest feature set to the richest
            if feature_sets is not None and name not in feature_sets:
                continue
            rows = [make(s) for s in shapes]
            columns = sorted({c for row in rows for c in row if rows[0].get(c, 0.0) > 0})
            if len(columns) + 2 > len(y):  # too few plans to fit this many weights
                continue
            scale = [rows[0][c] for c in columns]
            a = _design(rows, columns, scale)
            errors = []
            for i in range(len(y)):
                keep = np.arange(len(y)) != i
                pred = float(a[i] @ _nnls(a[keep], y[keep]))
                errors.append(abs(pred / y[i] - 1.0) if pred > 0 else 1.0)
            model = cls(
                features=name,
                columns=columns,
                scale=scale,
                coef=[float(c) for c in _nnls(a, y)],
                dense_ms=float(dense_ms),
                runtime=str(meta["runtime"]),
                device=str(meta["device"]),
                threads=int(meta["threads"]),
                batch_size=int(meta["batch_size"]),
                plans=len(y),
                noisy_plans=noisy_plans,
                loo_median=float(np.median(errors)),
                loo_p90=float(np.percentile(errors, 90)),
                loo_within_10=float(np.mean(np.asarray(errors) <= 0.10)),
                loo_errors=[float(e) for e in errors],
            )
            fitted.append((float(np.mean(np.log1p(errors))), model))
        best = None
        if fitted:
            # the simplest feature set whose leave-one-out error is within OCCAM of the lowest: more
            # weights fitted on the same few measured plans must earn their place
            lowest = min(error for error, _ in fitted)
            best = next(model for error, model in fitted if error <= lowest * (1.0 + OCCAM))
        if best is None:
            raise InvalidValueError(f"too few measured plans ({len(y)}) to fit the feature sets {feature_sets}")
        return best


# --------------------------------------------------------------------------- table
@dataclasses.dataclass(frozen=True)
class Measured:
    """One plan measured on the runtime, interleaved with the dense model.

    Attributes:
        plan: The plan (keep ratios are exact kept/total channel fractions).
        ratio: Its latency over the dense model's (median over interleaved rounds).
        stats: Its latency statistics.
        dense: The dense model's statistics from the same rounds.
    """

    plan: Plan
    ratio: float
    stats: LatencyStats
    dense: LatencyStats

    @property
    def noisy(self) -> bool:
        """True when either side stayed noisy."""
        return self.stats.noisy or self.dense.noisy


class LatencyTable:
    """Measured plans of one dense architecture on one runtime, device, thread count and batch size.

    The cache file is ``<cache>/latency/<runtime>-<device>-<hardware>-t<threads>-b<batch>/<arch>.json``
    (``<arch>`` is :meth:`LayerGraph.fingerprint`), written atomically; a damaged or foreign
    file is reported with a warning and rebuilt.

    Args:
        graph: The dense model's graph.
        runtime: Runtime name.
        device: ``"cpu"`` or ``"cuda[:index]"``.
        threads: Intra-op threads (>= 1).
        batch_size: Batch size (>= 1).
        cache_dir: Cache root (default :func:`~automl_prune.measure.latency.default_cache_dir`).

    Attributes:
        dense_ms: The dense model's latency when the table was last calibrated (None when new).
        path: The cache file.
    """

    def __init__(
        self,
        graph: LayerGraph,
        runtime: str,
        device: str = "cpu",
        threads: int = 1,
        batch_size: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        get_runtime(runtime)
        dev = resolve_device(device)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidValueError(f"threads must be an integer >= 1, got {threads!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.graph = graph
        self.runtime = runtime
        self.device = str(dev)
        self.threads = threads
        self.batch_size = batch_size
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        folder = f"{runtime}-{slug(self.device)}-{hardware_slug(dev)}-t{threads}-b{batch_size}"
        self.path = root / "latency" / folder / f"{graph.fingerprint()}.json"
        self.dense_ms: float | None = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._noisy: set[str] = set()
        self._read()

    # ------------------------------------------------------------------ keys and access
    @property
    def meta(self) -> dict[str, Any]:
        """What the table is for."""
        return {"runtime": self.runtime, "device": self.device, "threads": self.threads, "batch_size": self.batch_size}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Input shape the plans are measured at."""
        return (self.batch_size, *self.graph.example_inputs.shape[1:])

    def key(self, plan: Plan, round_to: int = 1) -> str:
        """Entry key: the kept channel counts in group order and the skipped blocks."""
        kept = self.graph.kept_channels(plan, round_to)
        return (
            ",".join(str(kept[g]) for g in self.graph.group_names()) + "|" + ",".join(self.graph.skipped_blocks(plan))
        )

    def exact_plan(self, plan: Plan, round_to: int = 1) -> Plan:
        """``plan`` with keep ratios equal to its kept/total channel fractions (no rounding needed)."""
        kept = self.graph.kept_channels(plan, round_to)
        return Plan({g.name: kept[g.name] / g.channels for g in self.graph.groups}, plan.skip)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def noisy_count(self) -> int:
        """Entries measured in this process that stayed noisy (not cached)."""
        return len(self._noisy)

    # ------------------------------------------------------------------ persistence
    def _read(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
                raise ValueError("not a latency table of this format version")
            if data.get("meta") != self.meta:
                raise ValueError(f"made for {data.get('meta')}, not {self.meta}")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise TypeError("'entries' is not an object")
            for key, entry in entries.items():
                ratio = entry["ratio"]
                if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
                    raise ValueError(f"entry {key!r} has ratio {ratio!r}")
                Plan.from_dict(entry["plan"])
            dense = data.get("dense_ms")
            self.dense_ms = float(dense) if isinstance(dense, (int, float)) and dense > 0 else None
            self._entries = dict(entries)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unusable latency table %s (%s); it will be rebuilt", self.path, exc)
            self._entries, self.dense_ms = {}, None

    def save(self) -> Path:
        """Write the entries that are not noisy to the cache file, atomically."""
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "meta": self.meta,
            "hardware": hardware_slug(self.device),
            "torch": torch.__version__,
            "dense_ms": self.dense_ms,
            "entries": {k: v for k, v in sorted(self._entries.items()) if k not in self._noisy},
        }
        write_json(self.path, payload)
        return self.path

    def rebuild(self) -> None:
        """Forget every entry (and delete the cache file); the next calibration measures afresh."""
        self._entries.clear()
        self._noisy.clear()
        self.dense_ms = None
        if self.path.exists():
            self.path.unlink()

    # ------------------------------------------------------------------ entries
    def add(self, measured: Measured, round_to: int = 1) -> None:
        """Record a measured plan (noisy ones stay in memory only)."""
        key = self.key(measured.plan, round_to)
        self._entries[key] = {
            "plan": self.exact_plan(measured.plan, round_to).to_dict(),
            "ratio": measured.ratio,
            "ms": measured.stats.median_ms,
            "dense_ms": measured.dense.median_ms,
            "spread": measured.stats.spread,
        }
        if measured.noisy:
            self._noisy.add(key)
        else:
            self._noisy.discard(key)

    def measured(self) -> list[tuple[Plan, float]]:
        """(plan, latency over the dense model's) of every entry, in the order measured; the dense model first."""
        dense = self.key(Plan())
        return [(Plan(), 1.0)] + [
            (Plan.from_dict(e["plan"]), float(e["ratio"])) for k, e in self._entries.items() if k != dense
        ]

    def fit(self, dense_ms: float) -> LatencyModel:
        """A :class:`LatencyModel` fitted on every entry (plus the dense model at ratio 1)."""
        plans, ratios = zip(*self.measured())
        shapes = [self.graph.layer_shapes(p) for p in plans]
        return LatencyModel.fit(shapes, ratios, dense_ms, self.meta, noisy_plans=len(self._noisy))


# --------------------------------------------------------------------------- measuring plans
def measure_plans(
    model: nn.Module,
    graph: LayerGraph,
    plans: Sequence[Plan],
    table: LatencyTable,
    round_to: int = 1,
    dense: Runner | None = None,
    rounds: int = 5,
    progress: str | None = None,
    sessions: int = SESSIONS,
) -> list[Measured]:
    """Measure each plan on the table's runtime, interleaved with the dense model, and add it to the table.

    Each plan's rounds are shared out among ``sessions`` fresh pairs of sessions (the dense
    model's included), so a plan's figure does not hang on one session's speed.

    Args:
        model: The dense model.
        graph: Its graph.
        plans: Plans to measure.
        table: Where the results go (saved afterwards).
        round_to: Channel rounding of the plans.
        dense: A runner of the dense model on the table's runtime (built when omitted).
        rounds: Interleaved rounds per plan.
        progress: Progress bar description (None: no bar).
        sessions: Pairs of sessions the rounds are shared out among.

    Returns:
        One :class:`Measured` per plan, in order.
    """
    runtime = get_runtime(table.runtime)
    own = dense is None
    if dense is None:
        dense = runtime.compile(model, table.input_shape, table.device, table.threads)
    out = []
    try:
        todo: Any = plans
        if progress is not None:
            todo = track(plans, progress, "plan")
        for plan in todo:
            structure = rebuild_structure(model, graph, plan, round_to)
            with runtime.compile(structure, table.input_shape, table.device, table.threads) as runner:
                stats = measure_interleaved(
                    {"dense": dense, "plan": runner}, rounds=rounds, reference="dense", sessions=sessions
                )
            ratio = round_ratio(stats["plan"], stats["dense"])
            measured = Measured(table.exact_plan(plan, round_to), ratio, stats["plan"], stats["dense"])
            table.add(measured)
            out.append(measured)
    finally:
        if own:
            dense.close()
    table.save()
    return out


def calibration_plans(
    graph: LayerGraph, count: int, min_keep: float = 0.2, round_to: int = 1, skip_gates: bool = False, seed: int = 0
) -> list[Plan]:
    """The plans a latency model is fitted on: min-keep, uniform and random plans, distinct and not dense.

    Args:
        graph: The dense model's graph.
        count: How many plans (>= 3).
        min_keep: Smallest keep ratio.
        round_to: Channel rounding (plans are returned with their exact kept fractions).
        skip_gates: Also skip random residual blocks in half of the random plans.
        seed: Seed of the random plans.
    """
    if count < 3:
        raise InvalidValueError(f"a latency model needs at least 3 calibration plans, got {count}")
    names = graph.group_names()
    rng = np.random.default_rng(seed)
    seen = {_structure(graph, Plan(), round_to)}
    out: list[Plan] = []

    def add(plan: Plan) -> None:
        key = _structure(graph, plan, round_to)
        if key not in seen:
            seen.add(key)
            kept = graph.kept_channels(plan, round_to)
            out.append(Plan({g.name: kept[g.name] / g.channels for g in graph.groups}, plan.skip))

    for keep in (min_keep, 0.4, 0.6, 0.8):
        add(Plan.uniform(names, keep))
    spread = 0.25 * (1.0 - min_keep)
    for attempt in range(50 * count):  # a small model may have fewer distinct structures than asked for
        if len(out) >= count:
            break
        if attempt % 2 == 0:
            # a size drawn for the whole plan, then a per-group scatter around it: independent draws per
            # group would give plans of nearly one total size on a model with many groups
            level = rng.uniform(min_keep, 1.0)
            keeps = {n: float(np.clip(level + rng.normal(0.0, spread), min_keep, 1.0)) for n in names}
        else:
            # groups at either extreme, as budget-bound searches leave them (AMC's bounds push the
            # groups decided last to min_keep or keep them whole)
            whole = rng.uniform(0.1, 0.9)
            keeps = {n: 1.0 if rng.random() < whole else float(rng.uniform(min_keep, min_keep + spread)) for n in names}
        skip = {}
        if skip_gates and graph.blocks and attempt % 3 == 1:
            skip = {b: bool(rng.random() < 0.3) for b in graph.blocks}
        add(Plan(keeps, skip))
    return out[:count]


def _structure(graph: LayerGraph, plan: Plan, round_to: int) -> tuple:
    kept = graph.kept_channels(plan, round_to)
    return tuple(kept.values()), tuple(graph.skipped_blocks(plan))


def calibrate(
    model: nn.Module,
    graph: LayerGraph,
    table: LatencyTable,
    *,
    plans: int = 24,
    min_keep: float = 0.2,
    round_to: int = 1,
    skip_gates: bool = False,
    progress: bool = True,
) -> LatencyModel:
    """Measure what the table lacks of the calibration plans, then fit a :class:`LatencyModel`.

    The dense model's latency is measured now (interleaved with the plans measured, or on its
    own when the table already has them all); a change of more than :data:`DRIFT` since the
    table was built is logged as a warning (the fitted ratios hold; the ms scale is today's).

    Args:
        model: The dense model.
        graph: Its graph.
        table: The table of measured plans (cached; extended and saved here).
        plans: Calibration plans (see :func:`calibration_plans`).
        min_keep: Smallest keep ratio of the calibration plans.
        round_to: Channel rounding of the search.
        skip_gates: Calibrate skipped residual blocks too.
        progress: Show a progress bar while measuring.
    """
    runtime = get_runtime(table.runtime)
    wanted = calibration_plans(graph, plans, min_keep, round_to, skip_gates)
    missing = [p for p in wanted if table.key(p) not in table]
    with runtime.compile(model, table.input_shape, table.device, table.threads) as dense:
        if missing:
            logger.info("measuring %d plans on %s to fit the latency model", len(missing), table.runtime)
            measured = measure_plans(
                model, graph, missing, table, dense=dense, progress="latency model" if progress else None
            )
            dense_ms = statistics.median(m.dense.median_ms for m in measured)
        else:
            dense_ms = measure_interleaved({"dense": dense})["dense"].median_ms
        fitted = table.fit(dense_ms)
        # a plan the fit cannot explain when left out is most often a measurement the machine
        # disturbed: measure it once more (its entry is replaced) and fit again
        typical = float(np.median(fitted.loo_errors[1:])) if len(fitted.loo_errors) > 1 else 0.0
        threshold = max(OUTLIER * typical, 0.10)
        suspects = [p for (p, _), e in zip(table.measured()[1:], fitted.loo_errors[1:]) if e > threshold]
        if suspects:
            logger.info(
                "measuring %d plan(s) again: the latency model misses them by more than %.0f%% when they are left out",
                len(suspects),
                100 * threshold,
            )
            measure_plans(model, graph, suspects, table, dense=dense)
            fitted = table.fit(dense_ms)
    if table.dense_ms is not None and abs(dense_ms / table.dense_ms - 1.0) > DRIFT:
        logger.warning(
            "the dense model measures %.4g ms now against %.4g ms when the latency table %s was built: "
            "the machine's speed changed; predictions use today's figure (`automl-prune latency --rebuild` "
            "measures the table again)",
            dense_ms,
            table.dense_ms,
            table.path,
        )
    if table.dense_ms is None or missing:
        table.dense_ms = dense_ms
        table.save()
    logger.info("%s", fitted.describe())
    return fitted


@dataclasses.dataclass
class LatencyCheck:
    """What :func:`check_latency` measured (and predicted).

    Attributes:
        runtime: Runtime name.
        threads: Intra-op threads.
        measured: The model's latency.
        dense: Its dense architecture's latency, measured interleaved (pruned checkpoints only).
        predicted_ms: The latency model's prediction (None without a latency table here).
        note: The fitted model's description, or how to measure a table; None for a bare artifact.
    """

    runtime: str
    threads: int
    measured: Any
    dense: Any = None
    predicted_ms: float | None = None
    note: str | None = None


def _onnx_input_shape(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """(C, H, W) of an ONNX model's input, when its non-batch dimensions are fixed."""
    from automl_prune.runtimes import onnx_session

    dims = onnx_session(path).get_inputs()[0].shape[1:]
    return tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None


def check_latency(
    *,
    model: nn.Module | None = None,
    example: torch.Tensor | None = None,
    info: Any = None,
    artifact: str | os.PathLike[str] | None = None,
    runtime: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    batch_size: int = 1,
    rounds: int = 5,
    rebuild: bool = False,
    plans: int = 24,
    sample_shape: tuple[int, ...] = (3, 32, 32),
) -> LatencyCheck:
    """``automl-prune latency``: measure a model (or an exported file) on a runtime, and predict it.

    A pruned checkpoint (``info`` with a plan) is measured interleaved with its dense
    architecture (the speed-up); a model with a latency table for its architecture on this
    machine also gets the latency model's prediction (``rebuild`` measures the table again).

    Args:
        model: The model (with ``example`` inputs); or give ``artifact``.
        example: An input batch for ``model``.
        info: ``model``'s checkpoint info, if it came from one.
        artifact: An exported file, measured as is in the runtime its suffix names.
        runtime: Runtime name (default onnxruntime; for an artifact, must match its suffix).
        device: Device to run on.
        threads: Intra-op threads (default torch's setting).
        batch_size: Batch size.
        rounds: Interleaved measurement rounds.
        rebuild: Measure the architecture's latency table again and fit on it.
        plans: Plans measured to calibrate when rebuilding.
        sample_shape: (C, H, W) of an artifact whose input shape is not fixed in the file.

    Raises:
        InvalidValueError: Conflicting inputs, or a runtime that does not match the artifact.
    """
    from automl_prune.measure.latency import measure_interleaved
    from automl_prune.models import build_model
    from automl_prune.runtimes import check_runtime, runtime_for_file

    threads = threads or torch.get_num_threads()
    if artifact is not None:
        if model is not None or rebuild:
            raise InvalidValueError(
                "--artifact measures an exported file as is; give no --checkpoint, --model or --rebuild"
            )
        rt = runtime_for_file(artifact)
        if runtime and runtime != rt.name:
            raise InvalidValueError(f"'{artifact}' runs in {rt.name}, not {runtime}; drop --runtime")
        rt.check(device)
        sample = (_onnx_input_shape(artifact) if rt.name == "onnxruntime" else None) or sample_shape
        shape = (batch_size, *sample)
        runners = {"model": rt.open(artifact, shape, device, threads)}
        dense = None
    else:
        if model is None or example is None:
            raise InvalidValueError("give --checkpoint FILE or --model NAME (or --artifact FILE)")
        rt = check_runtime(runtime or "onnxruntime", device)
        shape = (batch_size, *example.shape[1:])
        runners = {"model": rt.compile(model, shape, device, threads)}
        dense = build_model(info.spec).eval() if info is not None else model
        if info is not None and info.plan is not None and (info.plan.keep_ratios or info.plan.skip):
            runners["dense"] = rt.compile(dense, shape, device, threads)
    try:
        stats = measure_interleaved(
            runners, rounds=rounds, reference="dense" if "dense" in runners else None, sessions=SESSIONS
        )
    finally:
        for runner in runners.values():
            runner.close()
    check = LatencyCheck(rt.name, threads, stats["model"], stats.get("dense"))
    if dense is None:
        return check
    graph = LayerGraph(dense, example[:1])
    table = LatencyTable(graph, rt.name, device, threads, batch_size)
    plan = info.plan if info is not None and info.plan is not None else None
    round_to = info.round_to if info is not None else 1
    fitted = None
    if rebuild:
        table.rebuild()
        fitted = calibrate(dense, graph, table, plans=plans, round_to=round_to)
    elif len(table) >= 2 and table.dense_ms is not None:
        measured_dense = check.dense.median_ms if check.dense is not None else None
        reference = measured_dense or (check.measured.median_ms if plan is None else None)
        fitted = table.fit(reference or table.dense_ms)
    if fitted is None:
        check.note = f"no latency table for this architecture on {rt.name} here; --rebuild measures one ({table.path})"
        return check
    check.predicted_ms = fitted.predict_ms(graph.layer_shapes(plan or Plan(), round_to))
    check.note = f"{fitted.describe()}; table {table.path}"
    return check
