"""Apply a :class:`~automl_prune.types.Plan`: build a physically smaller model.

This module is the only place where a *keep ratio* (what plans and searches speak of) is
turned into channel counts and into what Torch-Pruning removes. For every group the
criterion scores its channels; the lowest-scoring ones are removed through the
dependency graph, so coupled layers (residual adds, depthwise convs, BN) stay consistent.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from automl_prune.errors import InvalidValueError
from automl_prune.types import Plan

if TYPE_CHECKING:
    from automl_prune.criteria import Criterion
    from automl_prune.graph import LayerGraph

logger = logging.getLogger(__name__)


def channel_multiple(channels: int, round_to: int) -> int:
    """The multiple a group of ``channels`` is rounded to: ``round_to``, halved until it is below ``channels``.

    A group no larger than ``round_to`` (16 channels rounded to 16) would otherwise be
    all-or-nothing; halving keeps it prunable in widths the kernels still like (8 of 16).
    """
    if round_to < 1:
        raise InvalidValueError(f"round_to must be a positive integer, got {round_to}")
    multiple = round_to
    while multiple > 1 and channels <= multiple:
        multiple //= 2
    return multiple


def channels_to_keep(channels: int, keep_ratio: float, round_to: int = 1) -> int:
    """Channels a group of ``channels`` keeps at ``keep_ratio``.

    The count is ``round(keep_ratio * channels)``, rounded to the nearest multiple of the
    group's :func:`channel_multiple` (never below one multiple, never above ``channels``),
    and at least 1; a keep ratio of 1 keeps the whole group whatever ``round_to``.

    Args:
        channels: Channels in the group.
        keep_ratio: Fraction to keep, in (0, 1].
        round_to: Multiple to round to (1 = no rounding). Channel counts that are multiples
            of 8 or 16 run faster on CPUs and GPUs (BENCHMARKS.md, "Channel widths").
    """
    multiple = channel_multiple(channels, round_to)
    if keep_ratio >= 1.0:
        return channels
    keep = max(1, int(math.floor(keep_ratio * channels + 0.5)))
    if multiple > 1:
        keep = max(multiple, int(math.floor(keep / multiple + 0.5)) * multiple)
    return min(channels, keep)


def prune_ratio(channels: int, keep_ratio: float, round_to: int = 1) -> float:
    """The fraction of a group's channels removed (Torch-Pruning's pruning ratio)."""
    return 1.0 - channels_to_keep(channels, keep_ratio, round_to) / channels


Selector = Callable[[Any, int, int], list[int]]
"""(Torch-Pruning group, channels, channels to remove) -> indices to remove."""


def _prune_groups(model: nn.Module, graph: LayerGraph, plan: Plan, round_to: int, select: Selector) -> nn.Module:
    """Prune a deep copy of ``model`` group by group, choosing channels with ``select``."""
    graph.validate(plan)
    pruned = copy.deepcopy(model)
    for block in graph.skipped_blocks(plan):
        parent_name, _, child = block.rpartition(".")
        setattr(pruned.get_submodule(parent_name) if parent_name else pruned, child, nn.Identity())
    dg = tp.DependencyGraph().build_dependency(pruned, graph.example_inputs, verbose=False)
    modules = dict(pruned.named_modules())
    for group in graph.groups:
        n_keep = channels_to_keep(group.channels, plan.keep_ratio(group.name), round_to)
        n_remove = group.channels - n_keep
        alive = [name for name in group.members if name in modules]
        if n_remove == 0 or not alive:  # nothing to remove, or the group lived in skipped blocks only
            continue
        root = modules[alive[0]]
        prune_fn = dg.get_pruner_of_module(root).prune_out_channels
        full = dg.get_pruning_group(root, prune_fn, list(range(group.channels)))
        idxs = sorted(int(i) for i in select(full, group.channels, n_remove))
        if len(idxs) != n_remove or len(set(idxs)) != n_remove:
            raise RuntimeError(
                f"selector returned {len(set(idxs))} indices for group {group.name}, expected {n_remove}"
            )
        dg.get_pruning_group(root, prune_fn, idxs).prune()
    return pruned


def apply(
    model: nn.Module,
    plan: Plan,
    criterion: str | Criterion = "l1",
    *,
    graph: LayerGraph | None = None,
    example_inputs: torch.Tensor | None = None,
    round_to: int = 1,
    data: Any = None,
) -> nn.Module:
    """Return a physically smaller copy of ``model`` pruned as ``plan`` says.

    Args:
        model: The dense model (left unchanged).
        plan: Keep ratio per group (groups not named are kept whole).
        criterion: Importance criterion name or instance; decides *which* channels go.
        graph: The model's :class:`LayerGraph` (built from ``example_inputs`` when omitted).
        example_inputs: An input batch, needed only when ``graph`` is omitted.
        round_to: Round kept channel counts to a multiple of this.
        data: Batches for data-driven criteria (see :mod:`automl_prune.criteria`).

    Returns:
        The pruned model, in eval mode, on the same device.

    Raises:
        InvalidValueError: A plan naming unknown groups or invalid keep ratios.
        UnknownNameError: An unknown criterion name.
    """
    from automl_prune.criteria import get_criterion
    from automl_prune.graph import LayerGraph

    if graph is None:
        if example_inputs is None:
            raise InvalidValueError("apply() needs either a LayerGraph or example_inputs")
        graph = LayerGraph(model, example_inputs)
    crit = get_criterion(criterion) if isinstance(criterion, str) else criterion
    graph.validate(plan)
    crit.prepare(model, graph, data)
    try:

        def select(group: Any, channels: int, n_remove: int) -> list[int]:
            scores = crit(group).detach().flatten().cpu().double()
            if scores.numel() != channels:
                raise RuntimeError(f"criterion {crit.name} returned {scores.numel()} scores for {channels} channels")
            order = torch.argsort(scores, stable=True)
            return order[:n_remove].tolist()

        pruned = _prune_groups(model, graph, plan, round_to, select)
        crit.after_prune(pruned)  # e.g. reconstruction criteria refit the consumers' weights
    finally:
        crit.release()
    return pruned.eval()


def rebuild_structure(model: nn.Module, graph: LayerGraph, plan: Plan, round_to: int = 1) -> nn.Module:
    """The pruned architecture of ``plan`` without scoring (weights to be loaded afterwards).

    Shapes depend only on the kept channel counts, so any selection gives the same
    architecture; this one drops each group's last channels.
    """
    return _prune_groups(model, graph, plan, round_to, lambda _g, c, n: list(range(c - n, c))).eval()
