"""Shared types: one place for the values that flow between modules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from automl_prune.errors import InvalidValueError


@dataclass(frozen=True)
class LayerInfo:
    """A conv or linear layer as seen by the layer graph.

    Attributes:
        name: Qualified module name in the model.
        kind: ``"conv"``, ``"dwconv"`` (depthwise) or ``"linear"``.
        in_channels: Input channels (features for linear).
        out_channels: Output channels (features for linear).
        kernel: Kernel size ``(kh, kw)``; ``(1, 1)`` for linear.
        stride: Stride ``(sh, sw)``; ``(1, 1)`` for linear.
        groups: Convolution groups (1 for linear).
        in_size: Spatial input size ``(H, W)``; ``(1, 1)`` for linear.
        out_size: Spatial output size ``(H, W)``; ``(1, 1)`` for linear.
        flops: Multiply-accumulates for one input sample.
        params: Parameters (weight and bias).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    flops: int
    params: int


@dataclass(frozen=True)
class GroupInfo:
    """A prunable group: channels that must be removed together.

    Coupled layers (a residual add, a depthwise conv and its producer) share one group;
    its ``root`` is the first conv/linear (in forward order) whose output it prunes.

    Attributes:
        name: The group's name (the root layer's qualified name), used as key in plans.
        index: Position in forward order.
        root: The root layer.
        channels: Number of channels in the group.
        members: Names of the conv/linear layers whose outputs the group prunes.
        consumers: Names of the conv/linear layers whose inputs the group prunes.
        flops: Multiply-accumulates of all conv/linear layers the group touches.
        params: Parameters of all layers (BN included) the group touches.
        divisor: Equal parts a grouped convolution (``groups`` > 1, not depthwise) splits the
            group's channels into; every part keeps as many channels as the others, so the
            kept count is a multiple of it (the lcm when several grouped layers share the group;
            1 when none does).
    """

    name: str
    index: int
    root: LayerInfo
    channels: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    flops: int
    params: int
    divisor: int = 1


def check_keep_ratio(name: str, keep_ratio: float) -> float:
    """Validate one keep ratio: a finite number in (0, 1].

    Raises:
        InvalidValueError: When it is not.
    """
    if isinstance(keep_ratio, bool):
        raise InvalidValueError(f"keep ratio of '{name}' must be a number in (0, 1], got {keep_ratio!r}")
    try:
        value = float(keep_ratio)
    except (TypeError, ValueError):
        raise InvalidValueError(f"keep ratio of '{name}' must be a number in (0, 1], got {keep_ratio!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise InvalidValueError(
            f"keep ratio of '{name}' must be in (0, 1] (the fraction of channels kept), got {keep_ratio!r}"
        )
    return value


@dataclass(frozen=True)
class Plan:
    """How much of each prunable group to keep (and, for residual blocks, whether to skip it).

    A plan only speaks of *keep* ratios: 1.0 keeps the whole group, 0.25 keeps a quarter of
    its channels. Groups not named are kept whole. Converting to Torch-Pruning's *pruning*
    ratio happens in :mod:`automl_prune.pruning` only.

    Attributes:
        keep_ratios: Group name -> fraction of channels kept, in (0, 1].
        skip: Block name -> True to remove the residual block (its shortcut stays).
    """

    keep_ratios: Mapping[str, float] = field(default_factory=dict)
    skip: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked = {str(k): check_keep_ratio(str(k), v) for k, v in dict(self.keep_ratios).items()}
        object.__setattr__(self, "keep_ratios", checked)
        object.__setattr__(self, "skip", {str(k): bool(v) for k, v in dict(self.skip).items()})

    def keep_ratio(self, group: str) -> float:
        """The keep ratio of ``group`` (1.0 when the plan does not name it)."""
        return self.keep_ratios.get(group, 1.0)

    @classmethod
    def uniform(cls, groups: list[str], keep_ratio: float) -> Plan:
        """The same keep ratio for every group."""
        return cls({g: keep_ratio for g in groups})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (round-trips through :meth:`from_dict`)."""
        return {"keep_ratios": dict(self.keep_ratios), "skip": dict(self.skip)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Build a plan from :meth:`to_dict` output.

        Raises:
            InvalidValueError: When ``data`` is not a plan.
        """
        if not isinstance(data, Mapping) or "keep_ratios" not in data:
            raise InvalidValueError("a plan must be a mapping with a 'keep_ratios' entry (group name -> keep ratio)")
        extra = set(data) - {"keep_ratios", "skip"}
        if extra:
            raise InvalidValueError(f"unknown plan keys {sorted(extra)}; a plan has 'keep_ratios' and 'skip'")
        keep = data["keep_ratios"]
        if not isinstance(keep, Mapping):
            raise InvalidValueError("plan 'keep_ratios' must map group names to keep ratios")
        return cls(dict(keep), dict(data.get("skip") or {}))


@dataclass(frozen=True)
class Budget:
    """A deployment budget: any combination of FLOPs, parameters and latency.

    Latency is measured on ``runtime`` (the form the model ships in) on ``device`` with
    ``threads`` intra-op threads at ``batch_size``; it is predicted during the search by a
    latency model fitted on measured plans, and measured end to end at the end.

    Attributes:
        flops: FLOPs (MACs per sample) limit; a value <= 1 is a fraction of the dense
            model's, a larger value an absolute count.
        params: Parameter limit, fraction (<= 1) or absolute like ``flops``.
        latency_ms: Latency limit in milliseconds.
        speedup: Minimum speed-up over the dense model on the same runtime (>= 1), a
            latency limit that holds on any machine.
        runtime: ``"onnxruntime"``, ``"torchscript"`` or ``"torch"``.
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: Batch size latency is measured at.
        threads: Intra-op threads latency is measured with (None = torch's current setting).
    """

    flops: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    runtime: str = "onnxruntime"
    device: str = "cpu"
    batch_size: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("flops", "params", "latency_ms", "speedup"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            ):
                raise InvalidValueError(f"budget {name} must be a positive number, got {value!r}")
        if self.speedup is not None and self.speedup < 1.0:
            raise InvalidValueError(
                f"budget speedup must be >= 1 (times faster than the dense model), got {self.speedup}"
            )
        if self.flops is None and self.params is None and not self.has_latency:
            raise InvalidValueError("a budget needs at least one of flops, params, latency_ms or speedup")
        if self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise InvalidValueError("budget batch_size and threads must be >= 1")

    @property
    def has_latency(self) -> bool:
        """True when the budget limits latency (in ms or as a speed-up)."""
        return self.latency_ms is not None or self.speedup is not None

    @staticmethod
    def absolute(limit: float | None, dense: int) -> float | None:
        """``limit`` as an absolute count (fractions <= 1 are relative to ``dense``)."""
        if limit is None:
            return None
        return limit * dense if limit <= 1.0 else float(limit)

    def latency_limit(self, dense_ms: float) -> float | None:
        """The latency limit in ms given the dense model's latency (the tighter of both terms)."""
        limits = [v for v in (self.latency_ms, dense_ms / self.speedup if self.speedup else None) if v is not None]
        return min(limits) if limits else None

    def where(self) -> str:
        """Where latency is measured, e.g. ``onnxruntime, cpu, 2 threads, b=1``."""
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return f"{self.runtime}, {self.device}{threads}, b={self.batch_size}"

    def describe(self) -> str:
        """Short human-readable form, e.g. ``flops<=50%, latency<=3ms (onnxruntime, cpu, b=1)``."""
        parts = []
        for name, value in (("flops", self.flops), ("params", self.params)):
            if value is not None:
                parts.append(f"{name}<={value:.0%}" if value <= 1 else f"{name}<={value:,.0f}")
        latency = []
        if self.latency_ms is not None:
            latency.append(f"latency<={self.latency_ms:g}ms")
        if self.speedup is not None:
            latency.append(f"speed-up>={self.speedup:g}x")
        if latency:
            parts.append(", ".join(latency) + f" ({self.where()})")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Evaluation:
    """The score of one plan (no fine-tuning).

    Attributes:
        accuracy: Top-1 accuracy on the search-val subset (NaN when it failed).
        flops: FLOPs (MACs per sample) of the pruned model.
        params: Parameters of the pruned model.
        latency_ms: Predicted latency (the fitted latency model), when the budget has a latency term.
        measured_latency_ms: End-to-end measured latency on the budget's runtime, when measured
            (the finalists of a latency-budget search).
        flops_ratio: ``flops`` over the dense model's.
        reward: The reward the strategies maximise.
        feasible: True when the plan meets every term of the budget and evaluated cleanly.
        reason: Why it is infeasible ("" when feasible).
        seconds: Wall time of the evaluation.
        cached: True when it was served from the evaluator's cache.
    """

    accuracy: float
    flops: int
    params: int
    latency_ms: float | None
    measured_latency_ms: float | None
    flops_ratio: float
    reward: float
    feasible: bool
    reason: str = ""
    seconds: float = 0.0
    cached: bool = False

    @property
    def failed(self) -> bool:
        """Whether scoring the plan raised (its reason says how); a failure is never a candidate."""
        return self.reason.startswith(FAILED_PREFIX) or not math.isfinite(self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


FAILED_PREFIX = "evaluation failed"
"""How the reason of a failed evaluation starts."""


@dataclass
class SearchResult:
    """What a strategy returns.

    Attributes:
        strategy: Registry name of the strategy.
        best_plan: The best feasible plan found (by reward).
        best_evaluation: Its evaluation.
        history: Every (plan, evaluation) in the order made.
        wall_time: Seconds the search took.
        evaluations: Evaluations used (cache hits included: they count against the budget).
        seed: The seed it ran with.
    """

    strategy: str
    best_plan: Plan
    best_evaluation: Evaluation
    history: list[tuple[Plan, Evaluation]]
    wall_time: float
    evaluations: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (:meth:`from_dict` reads it back)."""
        return {
            "strategy": self.strategy,
            "best_plan": self.best_plan.to_dict(),
            "best_evaluation": self.best_evaluation.to_dict(),
            "history": [{"plan": p.to_dict(), "evaluation": e.to_dict()} for p, e in self.history],
            "wall_time": self.wall_time,
            "evaluations": self.evaluations,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchResult:
        """The result :meth:`to_dict` wrote."""
        return cls(
            strategy=data["strategy"],
            best_plan=Plan.from_dict(data["best_plan"]),
            best_evaluation=Evaluation(**data["best_evaluation"]),
            history=[(Plan.from_dict(h["plan"]), Evaluation(**h["evaluation"])) for h in data["history"]],
            wall_time=float(data["wall_time"]),
            evaluations=int(data["evaluations"]),
            seed=int(data["seed"]),
        )
