"""Shared machinery of the importance criteria.

:class:`Criterion` is the base class every criterion derives from. The helpers here map a
Torch-Pruning group (scored on the copy :func:`automl_prune.pruning.apply` prunes) back to
names and index lists of the *dense* model, where data-driven criteria collected their
statistics, and combine per-layer scores over a coupled group.

Index spaces: a group of ``C`` channels has, for each layer it touches, an index list that
maps group channel ``j`` to the layer's own channel (for most layers the identity). Every
:class:`GroupLayout` holds these lists as measured on the dense model, so statistics
collected by :meth:`Criterion.prepare` can be reordered into group order no matter which
groups were pruned before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from automl_prune.errors import InvalidValueError

if TYPE_CHECKING:
    from automl_prune.graph import LayerGraph

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor | None]
"""One batch as criteria use it: images and (possibly missing) labels."""


class Criterion:
    """Base class: scores the channels of a pruning group.

    A criterion is called with a Torch-Pruning group covering all ``C`` channels of one
    prunable group and returns ``C`` scores; :func:`automl_prune.pruning.apply` removes
    the lowest-scoring channels. The life cycle within one ``apply`` call is::

        prepare(dense_model, graph, data)   # collect statistics on the dense model
        __call__(group)                     # once per group that loses channels
        after_prune(pruned_model)           # e.g. write reconstructed weights
        release()                           # free what prepare() collected

    Attributes:
        name: Registry name.
        needs_data: True when :meth:`prepare` must be given batches.
        needs_grad: True when it back-propagates through the model.
        reference: The paper it implements.
    """

    name: str = ""
    needs_data: bool = False
    needs_grad: bool = False
    reference: str = ""

    def prepare(self, model: nn.Module, graph: Any, data: Any = None) -> None:  # noqa: B027 - optional hook
        """Collect what scoring needs (activations, gradients) from ``model`` on ``data``.

        Args:
            model: The dense model (must be left unchanged).
            graph: Its :class:`~automl_prune.graph.LayerGraph`.
            data: An iterable of ``(images, labels)`` batches, or None.
        """

    def after_prune(self, pruned: nn.Module) -> None:  # noqa: B027 - optional hook
        """Adjust the pruned model once all groups are pruned (default: nothing).

        Reconstruction-based criteria write least-squares weights of the layers that
        consume pruned channels here.

        Args:
            pruned: The pruned model (modified in place).
        """

    def release(self) -> None:  # noqa: B027 - optional hook
        """Free what :meth:`prepare` collected."""

    def __call__(self, group: Any) -> torch.Tensor:
        """One score per channel of ``group`` (higher = more important)."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------- groups
def _positions(item: Any) -> torch.Tensor:
    """The group channel each of a group item's indices belongs to (its Torch-Pruning root indices)."""
    root = getattr(item, "root_idxs", None)
    if root is not None and len(root) == len(item.idxs):
        return torch.as_tensor([int(r) for r in root], dtype=torch.long)
    return torch.arange(len(item.idxs))


def member_weights(group: Any) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """(module, out-channel-major weight rows, group positions) for each conv/linear whose outputs ``group`` prunes.

    Row ``k`` belongs to the group's channel ``positions[k]``. A layer covers every channel of
    the group, except a branch that reaches the group through a concatenation, which covers
    its part only; :func:`combine` averages over the layers that cover each channel.
    """
    rows = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if dep.handler.__name__ != "prune_out_channels":
            continue
        index = torch.as_tensor(list(idxs), dtype=torch.long)
        rows.append((module, module.weight.detach().flatten(1)[index], _positions(item)))
    return rows


def norm_scales(group: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(``|gamma|``, group positions) of every affine BatchNorm whose channels ``group`` prunes."""
    out = []
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, _BatchNorm) or item.dep.handler.__name__ != "prune_out_channels":
            continue
        if module.weight is None:
            continue
        index = torch.as_tensor(list(item.idxs), dtype=torch.long)
        out.append((module.weight.detach().abs()[index], _positions(item)))
    return out


def group_channels(group: Any) -> int:
    """Number of channels of a Torch-Pruning group (the length of its root's index list)."""
    return len(group[0].idxs)


def group_name(group: Any) -> str:
    """Qualified name of the root module of a Torch-Pruning group (the group's name in plans).

    Raises:
        RuntimeError: When Torch-Pruning did not record the name.
    """
    name = getattr(group[0].dep.target, "_name", None)
    if not name:
        raise RuntimeError("cannot tell which group is scored: its root node has no module name")
    return str(name)


@dataclass
class LayerSlice:
    """A layer a group touches, with the group-to-layer index map on the dense model.

    Attributes:
        name: Qualified module name.
        module: The module in the dense model.
        index: ``C x q`` long tensor: row ``j`` lists the layer's channels (out channels for
            members, input features for consumers) that belong to group channel ``j``.
            ``q`` is 1 except for a linear layer fed by a flattened feature map.
    """

    name: str
    module: nn.Module
    index: torch.Tensor


@dataclass
class GroupLayout:
    """The layers one prunable group touches, in dense-model index space.

    Attributes:
        name: Group name (its root layer).
        channels: Channels in the group.
        members: Conv/linear layers whose outputs the group prunes (forward order).
        norms: BatchNorm layers whose channels the group prunes.
        consumers: Conv/linear layers whose inputs the group prunes (depthwise convs,
            whose in and out channels are one, count as members only).
    """

    name: str
    channels: int
    members: list[LayerSlice] = field(default_factory=list)
    norms: list[LayerSlice] = field(default_factory=list)
    consumers: list[LayerSlice] = field(default_factory=list)


def _index_map(idxs: Sequence[Any], root_idxs: Sequence[Any] | None, channels: int) -> torch.Tensor | None:
    """``C x q`` index map from a group item's indices, or None when it is not regular."""
    idx = [int(i) for i in idxs]
    if len(idx) == channels:
        return torch.as_tensor(idx, dtype=torch.long).view(channels, 1)
    if root_idxs is None or len(root_idxs) != len(idx) or len(idx) % channels:
        return None
    rows: list[list[int]] = [[] for _ in range(channels)]
    for i, r in zip(idx, root_idxs, strict=True):
        if not 0 <= int(r) < channels:
            return None
        rows[int(r)].append(i)
    if len({len(r) for r in rows}) != 1:
        return None
    return torch.as_tensor(rows, dtype=torch.long)


def is_depthwise(module: nn.Module) -> bool:
    """True for a depthwise convolution (one filter per input channel)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def build_layouts(model: nn.Module, graph: LayerGraph) -> dict[str, GroupLayout]:
    """The :class:`GroupLayout` of every group of ``graph``, with modules of ``model``.

    ``model`` must have the architecture ``graph`` was built on (usually it is the same object).
    """
    dg = graph.dependency_graph
    graph_names = {module: name for name, module in graph.model.named_modules()}
    graph_modules = dict(graph.model.named_modules())
    modules = dict(model.named_modules())
    rank = {name: i for i, name in enumerate(graph.layers)}
    layouts: dict[str, GroupLayout] = {}
    for info in graph.groups:
        root = graph_modules[info.name]
        prune_fn = dg.get_pruner_of_module(root).prune_out_channels
        tp_group = dg.get_pruning_group(root, prune_fn, list(range(info.channels)))
        layout = GroupLayout(info.name, info.channels)
        seen: set[tuple[str, bool]] = set()
        for item in tp_group:
            dep, idxs = item.dep, item.idxs
            name = graph_names.get(dep.target.module)
            if name is None or name not in modules:
                continue
            module = modules[name]
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            if (name, is_out) in seen:
                continue
            seen.add((name, is_out))
            index = _index_map(idxs, getattr(item, "root_idxs", None), info.channels)
            if index is None:
                logger.debug("group %s: irregular index map for %s, ignored", info.name, name)
                continue
            if isinstance(module, _BatchNorm) and is_out:
                layout.norms.append(LayerSlice(name, module, index))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                if is_out:
                    layout.members.append(LayerSlice(name, module, index))
                elif not is_depthwise(module):
                    layout.consumers.append(LayerSlice(name, module, index))
        layout.members.sort(key=lambda s: rank.get(s.name, len(rank)))
        layout.consumers.sort(key=lambda s: rank.get(s.name, len(rank)))
        layouts[info.name] = layout
    return layouts


def following_norm(graph: LayerGraph, name: str) -> str | None:
    """Name of the BatchNorm that directly consumes layer ``name``'s output, if there is one."""
    modules = dict(graph.model.named_modules())
    names = {module: n for n, module in modules.items()}
    node = graph.dependency_graph.module2node.get(modules.get(name))
    if node is None:
        return None
    norms = [out.module for out in node.outputs if isinstance(out.module, _BatchNorm)]
    if len(norms) != 1:
        return None
    return names.get(norms[0])


# --------------------------------------------------------------------------- scores
def normalise(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale one layer's scores so that layers of different magnitude can be averaged.

    Args:
        scores: One score per channel.
        mode: ``"none"``, ``"mean"`` (divide by the mean absolute value), ``"sum"`` (divide by
            the sum of absolute values), ``"l2"`` (divide by the L2 norm) or ``"max"`` (divide by
            the largest absolute value).
    """
    if mode == "none":
        return scores
    if mode == "mean":
        scale = scores.abs().mean()
    elif mode == "sum":
        scale = scores.abs().sum()
    elif mode == "l2":
        scale = scores.norm()
    elif mode == "max":
        scale = scores.abs().max()
    else:
        raise ValueError(f"unknown normalisation '{mode}'")
    return scores / scale if float(scale) > 0 else scores


def combine(
    per_layer: Sequence[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], mode: str = "none", channels: int = 0
) -> torch.Tensor:
    """Mean over layers of their (normalised) per-channel scores, in group order.

    Args:
        per_layer: Per layer, either scores of every group channel in group order, or
            ``(scores, positions)`` for a layer covering only the group channels ``positions``
            (a branch of a concatenation).
        mode: Normalisation of each layer's scores (see :func:`normalise`).
        channels: Channels in the group (needed when a layer gives positions).

    Raises:
        RuntimeError: No layer at all, or a channel no layer covers.
    """
    if not per_layer:
        raise RuntimeError("no layer scores to combine")
    full = []
    for item in per_layer:
        scores, positions = item if isinstance(item, tuple) else (item, None)
        scores = normalise(scores.double(), mode)
        if positions is None:
            full.append(scores)
            continue
        placed = torch.full((max(channels, int(positions.max()) + 1),), float("nan"), dtype=torch.float64)
        placed[positions] = scores
        full.append(placed)
    mean = torch.nanmean(torch.stack(full), 0)
    if bool(mean.isnan().any()):
        raise RuntimeError(f"{int(mean.isnan().sum())} channel(s) of the group have no score from any layer")
    return mean


def to_ranks(scores: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Distinct scores ``0..C-1`` in the order of ``scores`` (then ``tie_break``) — ties impossible.

    Criteria that must know later which channels :func:`~automl_prune.pruning.apply`
    removed return ranks: with distinct scores any sort gives the same selection.
    """
    scores = scores.double().flatten()
    order = torch.arange(scores.numel())
    if tie_break is not None:
        order = torch.argsort(tie_break.double().flatten(), stable=True)
    order = order[torch.argsort(scores[order], stable=True)]
    ranks = torch.empty(scores.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(scores.numel(), dtype=torch.float64)
    return ranks


# --------------------------------------------------------------------------- data
def data_help(name: str) -> str:
    """How to pass batches to a data-driven criterion (for error messages)."""
    return (
        f"criterion '{name}' is data-driven and needs batches of (images, labels): pass "
        f"data=list(splits.search_val.batches(64))[:8] to automl_prune.pruning.apply(), or give "
        f"--data.dataset on the command line (--prune.criterion_batches sets how many); data-free criteria "
        f"are l1, l2, fpgm, slimming and random"
    )


def require_batches(name: str, data: Any, need_labels: bool = False) -> list[Batch]:
    """Materialise ``data`` as a list of ``(images, labels)`` batches.

    Args:
        name: Criterion name (for the error message).
        data: Iterable of ``(x, y)`` pairs or of bare image tensors.
        need_labels: Require labels in every batch.

    Raises:
        InvalidValueError: No data, an empty iterable, or missing labels.
    """
    if data is None:
        raise InvalidValueError(data_help(name))
    if isinstance(data, torch.Tensor):
        data = [data]
    if not isinstance(data, Iterable):
        raise InvalidValueError(f"criterion '{name}': data must be an iterable of (images, labels) batches")
    batches: list[Batch] = []
    for batch in data:
        if isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, Sequence) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
            x = batch[0]
            y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        else:
            raise InvalidValueError(
                f"criterion '{name}': each batch must be (images, labels), got {type(batch).__name__}"
            )
        if need_labels and y is None:
            raise InvalidValueError(
                f"criterion '{name}' back-propagates a cross-entropy loss and needs labels in every batch"
            )
        batches.append((x, y))
    if not batches:
        raise InvalidValueError(data_help(name) + " (the data given holds no batch)")
    return batches


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class EvalMode:
    """Context manager: ``model.eval()`` inside, the previous train/eval flags restored after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, flag in self.flags:
            module.training = flag
