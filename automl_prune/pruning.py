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


def channel_multiple(channels: int, round_to: int, divisor: int = 1) -> int:
    """The multiple a group of ``channels`` is kept in: ``round_to`` (halved until it is below
    ``channels``), made a multiple of the group's ``divisor``.

    A group no larger than ``round_to`` (16 channels rounded to 16) would otherwise be
    all-or-nothing; halving keeps it prunable in widths the kernels still like (8 of 16).
    ``divisor`` is the number of equal parts a grouped convolution splits the group into
    (:attr:`~automl_prune.types.GroupInfo.divisor`): every part must keep as many channels as
    the others, so the kept count is a multiple of it whatever ``round_to`` says.
    """
    if round_to < 1:
        raise InvalidValueError(f"round_to must be a positive integer, got {round_to}")
    multiple = round_to
    while multiple > 1 and channels <= math.lcm(multiple, divisor):
        multiple //= 2
    return math.lcm(multiple, divisor)


def channels_to_keep(channels: int, keep_ratio: float, round_to: int = 1, divisor: int = 1) -> int:
    """Channels a group of ``channels`` keeps at ``keep_ratio``.

    The count is ``round(keep_ratio * channels)``, rounded to the nearest multiple of the
    group's :func:`channel_multiple` (never below one multiple, never above ``channels``),
    and at least 1; a keep ratio of 1 keeps the whole group whatever ``round_to``.

    Args:
        channels: Channels in the group.
        keep_ratio: Fraction to keep, in (0, 1].
        round_to: Multiple to round to (1 = no rounding). Channel counts that are multiples
            of 8 or 16 run faster on CPUs and GPUs (BENCHMARKS.md, "Channel widths").
        divisor: Equal parts the group is split into by grouped convolutions (1 = none).
    """
    multiple = channel_multiple(channels, round_to, divisor)
    if keep_ratio >= 1.0:
        return channels
    keep = max(1, int(math.floor(keep_ratio * channels + 0.5)))
    if multiple > 1:
        keep = max(multiple, int(math.floor(keep / multiple + 0.5)) * multiple)
    return min(channels, keep)


def prune_ratio(channels: int, keep_ratio: float, round_to: int = 1, divisor: int = 1) -> float:
    """The fraction of a group's channels removed (Torch-Pruning's pruning ratio)."""
    return 1.0 - channels_to_keep(channels, keep_ratio, round_to, divisor) / channels


Scorer = Callable[[Any, int], torch.Tensor]
"""(Torch-Pruning group, channels) -> one score per channel; the lowest-scoring channels go."""


def select_channels(scores: torch.Tensor, n_remove: int, divisor: int = 1) -> list[int]:
    """Indices of the ``n_remove`` channels to remove: the lowest ``scores``.

    With ``divisor`` > 1 the channels form ``divisor`` equal consecutive parts (the groups of a
    grouped convolution) that must stay equal: a channel position's score is its mean over
    the parts, and the same positions are removed from every part (as Torch-Pruning's own
    pruners do for grouped layers).

    Raises:
        InvalidValueError: When ``n_remove`` or the channel count is not a multiple of ``divisor``.
    """
    scores = scores.detach().flatten().cpu().double()
    channels = scores.numel()
    if channels % divisor or n_remove % divisor:
        raise InvalidValueError(
            f"cannot remove {n_remove} of {channels} channels in {divisor} equal parts: both must be multiples of "
            f"{divisor}"
        )
    if divisor == 1:
        return sorted(torch.argsort(scores, stable=True)[:n_remove].tolist())
    per_part = channels // divisor
    positions = torch.argsort(scores.view(divisor, per_part).mean(0), stable=True)[: n_remove // divisor].tolist()
    return sorted(part * per_part + p for part in range(divisor) for p in positions)


PRUNABLE = (nn.Conv2d, nn.Linear)
"""Layers whose output channels a group prunes."""


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced by one forward pass on ``example_inputs``.

    The forward is given explicitly: left to itself, Torch-Pruning first tries
    ``model(*example_inputs)`` inside a bare ``except:`` and retries with the batch whole, so a
    Ctrl-C (or SIGTERM) landing during that first pass was swallowed and the run ignored it.
    """
    return tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=_forward, verbose=False)


def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs)


def _out_width(module: nn.Module) -> int:
    """Output channels (features) of a conv or linear layer."""
    return int(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)


def _prune_groups(model: nn.Module, graph: LayerGraph, plan: Plan, round_to: int, score: Scorer) -> nn.Module:
    """Prune a deep copy of ``model`` group by group, removing the channels ``score`` ranks lowest."""
    graph.validate(plan)
    pruned = copy.deepcopy(model)
    for name in graph.removed_modules(plan):
        parent_name, _, child = name.rpartition(".")
        setattr(pruned.get_submodule(parent_name) if parent_name else pruned, child, nn.Identity())
    dg = dependency_graph(pruned, graph.example_inputs)
    modules = dict(pruned.named_modules())
    for group in graph.groups:
        n_keep = channels_to_keep(group.channels, plan.keep_ratio(group.name), round_to, group.divisor)
        n_remove = group.channels - n_keep
        alive = [
            modules[n]
            for n in (group.name, *group.members)
            if n in modules and isinstance(modules[n], PRUNABLE) and _out_width(modules[n]) == group.channels
        ]
        if n_remove == 0 or not alive:  # nothing to remove, or the group lived in removed blocks or layers only
            continue
        root = alive[0]
        prune_fn = dg.get_pruner_of_module(root).prune_out_channels
        full = dg.get_pruning_group(root, prune_fn, list(range(group.channels)))
        scores = score(full, group.channels)
        if scores.numel() != group.channels:
            raise RuntimeError(f"{scores.numel()} scores for the {group.channels} channels of group {group.name}")
        idxs = select_channels(scores, n_remove, group.divisor)
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
        pruned = _prune_groups(model, graph, plan, round_to, lambda group, _channels: crit(group))
        crit.after_prune(pruned)  # e.g. reconstruction criteria refit the consumers' weights
    finally:
        crit.release()
    return pruned.eval()


def rebuild_structure(model: nn.Module, graph: LayerGraph, plan: Plan, round_to: int = 1) -> nn.Module:
    """The pruned architecture of ``plan`` without scoring (weights to be loaded afterwards).

    Shapes depend only on the kept channel counts, so any selection gives the same
    architecture; this one drops each group's last channels (of each part, in grouped layers).
    """
    return _prune_groups(model, graph, plan, round_to, lambda _g, c: -torch.arange(c, dtype=torch.float64)).eval()
