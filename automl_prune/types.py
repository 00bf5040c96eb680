"""Shared types: one place for the values that flow between modules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    """

    name: str
    index: int
    root: LayerInfo
    channels: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    flops: int
    params: int


def check_keep_ratio(name: str, keep_ratio: float) -> float:
    """Validate one keep ratio: a finite number in (0, 1].

    Raises:
        InvalidValueError: When it is not.
    """
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
