"""LayerGraph: a model's prunable groups with per-layer FLOPs and parameters.

Groups come from Torch-Pruning's :class:`~torch_pruning.DependencyGraph`, so channels
coupled by residual adds, depthwise convolutions, concatenations and flattening are pruned
together. The classifier head (the last conv/linear executed) is never a group root: its
outputs are the classes.

FLOPs here, as in most of the pruning literature, means multiply-accumulates (MACs) of the
conv and linear layers for one input sample: ``k_h * k_w * C_in / groups * C_out * H_out * W_out``
for a convolution and ``in * out`` for a linear layer. BatchNorm, activations, pooling and
additions are not counted. Parameters are all learnable parameters (BatchNorm included).

Removable blocks (``Plan.skip``, N2N's layer removal) are the residual blocks with an identity
shortcut (:func:`is_skippable`) and, outside them, the shape-preserving layers the dependency
graph finds: a convolution with as many output as input channels, stride 1 and the same spatial
size in and out, the only layer producing its group's channels; removing it (with the BatchNorm
right after it) feeds its input straight to its consumers, which then see the input's channels.

Given a :class:`~automl_prune.types.Plan`, :meth:`LayerGraph.cost` predicts the FLOPs and
parameters of the pruned model exactly (the channel counts are integers computed the same
way :func:`automl_prune.pruning.apply` computes them), without building the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from automl_prune.errors import InvalidValueError
from automl_prune.pruning import PRUNABLE, channels_to_keep, dependency_graph
from automl_prune.types import GroupInfo, LayerInfo, Plan

logger = logging.getLogger(__name__)


class UnmappableReshapeError(ValueError):
    """Raised when pruning indices reach a reshape whose channel mapping Torch-Pruning could not infer."""


def _unmappable(idxs: Any) -> Any:
    raise UnmappableReshapeError(
        "its channels pass through a reshape the dependency graph cannot map (a channel shuffle)"
    )


def _tolerate_unmappable_reshapes() -> None:
    """Let Torch-Pruning build graphs with reshapes it cannot map; groups reaching one fail fast.

    Torch-Pruning infers how a ``view``/``reshape`` moves channels; on a channel shuffle
    (ShuffleNet's ``view -> transpose -> view``) the inference divides by zero and the whole
    graph build fails. Wrapped, every dependency through the failing node gets an index
    mapping that raises :class:`UnmappableReshapeError`, so forming a group that reaches the
    node fails at once and :class:`LayerGraph` leaves that group whole (with the reason), while
    the rest of the model stays prunable. Installed once, at import.
    """
    from torch_pruning.dependency import index_mapping

    original = getattr(index_mapping, "update_reshape_index_mapping", None)
    if original is None or getattr(original, "_automl_prune", False):  # another Torch-Pruning layout, or installed
        return

    def update(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except ArithmeticError as exc:
            logger.debug("Torch-Pruning cannot map the channels of reshape %s: %s", node, exc)
            for dep in node.dependencies:
                dep.index_mapping[0] = _unmappable
            for neighbour in [*node.inputs, *node.outputs]:
                for dep in neighbour.dependencies:
                    if dep.target is node:
                        dep.index_mapping[0] = _unmappable

    update._automl_prune = True  # type: ignore[attr-defined]
    index_mapping.update_reshape_index_mapping = update


_tolerate_unmappable_reshapes()


@dataclass(frozen=True)
class LayerShape:
    """One conv or linear layer of a pruned model: kept channels, output size and FLOPs.

    Attributes:
        name: Qualified module name in the dense model.
        kind: ``"conv"``, ``"dwconv"`` or ``"linear"``.
        kernel: Kernel size ``(kh, kw)`` (``(1, 1)`` for linear).
        in_channels: Kept input channels (features).
        out_channels: Kept output channels (features).
        out_size: Spatial output size ``(H, W)`` (``(1, 1)`` for linear).
        positions: Positions a linear layer is applied at (1 for a classifier; 1 for convs).
        flops: Multiply-accumulates for one input sample.
    """

    name: str
    kind: str
    kernel: tuple[int, int]
    in_channels: int
    out_channels: int
    out_size: tuple[int, int]
    positions: int
    flops: int


@dataclass(frozen=True)
class Cost:
    """FLOPs (MACs per sample) and parameters of a model."""

    flops: int
    params: int


@dataclass
class _Dims:
    """How one parametrised module's channel dims depend on the groups."""

    module: nn.Module
    out_total: int
    in_total: int
    out_deps: list[tuple[int, int]] = field(default_factory=list)  # (group index, channels of this module)
    in_deps: list[tuple[int, int]] = field(default_factory=list)


def _run_with_hooks(model: nn.Module, example_inputs: torch.Tensor, hook: Callable[..., None]) -> None:
    """Run ``model`` once in eval mode without grad, with ``hook`` on every conv/linear layer."""
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def is_skippable(module: nn.Module) -> bool:
    """True for a residual block whose shortcut is the identity (so ``block(x)`` can become ``x``).

    Recognises the zoo's ``BasicBlock`` and ``InvertedResidual`` and torchvision's
    ``BasicBlock``, ``Bottleneck`` and ``InvertedResidual``.
    """
    if getattr(module, "use_residual", False) or getattr(module, "use_res_connect", False):
        return True
    if isinstance(getattr(module, "shortcut", None), nn.Identity):
        return True
    return (
        type(module).__name__ in {"BasicBlock", "Bottleneck"}
        and hasattr(module, "downsample")
        and module.downsample is None
    )


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _is_grouped(module: nn.Module) -> bool:
    """True for a grouped convolution that is not depthwise (its groups must stay equal when pruned)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and not module.groups == module.in_channels == module.out_channels
    )


def _layer_flops(module: nn.Module, c_in: int, c_out: int, out_size: tuple[int, int], positions: int) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = 1 if _is_depthwise(module) else c_in // module.groups
        return kh * kw * per_out * c_out * out_size[0] * out_size[1]
    return c_in * c_out * positions


def _module_params(module: nn.Module, c_in: int, c_out: int) -> int:
    """Parameters of ``module`` with ``c_in``/``c_out`` channels kept (exact for conv/linear/BN)."""
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = 1 if _is_depthwise(module) else c_in // module.groups
        return c_out * per_out * kh * kw + (c_out if has_bias else 0)
    if isinstance(module, nn.Linear):
        return c_in * c_out + (c_out if has_bias else 0)
    total = sum(p.numel() for p in module.parameters(recurse=False))
    full = getattr(module, "num_features", None) or getattr(module, "out_channels", None)
    if full:
        return total * c_out // int(full)
    return total


class LayerGraph:
    """Prunable groups, layers, FLOPs and parameters of a model.

    Args:
        model: The dense model (not modified; it is traced once on ``example_inputs``).
        example_inputs: An input batch of the right shape (batch size 1 is enough).
        ignored_layers: Modules never used as group roots. Defaults to the last conv/linear
            layer executed (the classifier head).

    Attributes:
        groups: Prunable groups in forward order.
        layers: Conv and linear layers by name, in forward order.
        head: Name of the classifier head.
        dependency_graph: The Torch-Pruning dependency graph built on ``model``.
    """

    def __init__(
        self, model: nn.Module, example_inputs: torch.Tensor, ignored_layers: Sequence[nn.Module] | None = None
    ):
        self.model = model
        self.example_inputs = example_inputs
        self._names = {module: name for name, module in model.named_modules()}
        order, shapes = self._trace(model, example_inputs)
        if not order:
            raise InvalidValueError("the model has no Conv2d or Linear layer to prune")
        head_module = order[-1]
        ignored = list(ignored_layers) if ignored_layers is not None else [head_module]
        self.head = self._names[head_module]
        self.dependency_graph = dependency_graph(model, example_inputs)
        self.layers: dict[str, LayerInfo] = {}
        for module in order:
            self.layers[self._names[module]] = self._layer_info(module, *shapes[module])
        self._positions = {m: shapes[m][2] for m in order}
        self._out_sizes = {m: shapes[m][1] for m in order}
        self._rank = {m: i for i, m in enumerate(order)}
        self._dims: dict[nn.Module, _Dims] = {}
        for module in model.modules():
            if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
                out_total = self._channels(module, out=True)
                self._dims[module] = _Dims(module, out_total, self._channels(module, out=False))
        self.groups = self._build_groups(ignored)
        self._group_index = {g.name: g.index for g in self.groups}
        self.residual_blocks: list[str] = [name for name, m in model.named_modules() if name and is_skippable(m)]
        self._removable_layers = self._find_removable_layers()
        self.blocks: list[str] = sorted(
            [*self.residual_blocks, *self._removable_layers], key=lambda n: self._rank_of_block(n)
        )
        self._block_set = set(self.blocks)
        base = self.cost(Plan())
        self.flops = base.flops
        self.params = sum(p.numel() for p in model.parameters())
        if base.params != self.params:
            logger.debug(
                "analytic params %d differ from counted %d (unsupported layer types)", base.params, self.params
            )

    def _rank_of_block(self, name: str) -> int:
        """Forward position of a removable block: that of its first conv/linear layer."""
        inside = [m for m, n in self._names.items() if m in self._rank and (n == name or n.startswith(f"{name}."))]
        return min((self._rank[m] for m in inside), default=len(self._rank))

    def _find_removable_layers(self) -> dict[str, tuple[str, ...]]:
        """Shape-preserving layers outside residual blocks: name -> the modules removing it replaces.

        A layer qualifies when it is a plain convolution (``groups`` 1) with as many output as input
        channels, stride 1 and equal spatial size in and out; it is the only layer producing its
        group's channels, and its input channels all come from one group (or the model input), so
        that without it its consumers see exactly the channels its input had. The BatchNorm right
        after it (its only consumer in the dependency graph) goes with it.
        """
        inside_blocks = tuple(f"{b}." for b in self.residual_blocks)
        dg = self.dependency_graph
        out: dict[str, tuple[str, ...]] = {}
        for group in self.groups:
            name = group.members[0] if len(group.members) == 1 else ""
            layer = self.layers.get(name)
            if (
                layer is None
                or layer.kind != "conv"
                or layer.groups != 1
                or name.startswith(inside_blocks)
                or layer.in_channels != layer.out_channels
                or layer.stride != (1, 1)
                or layer.in_size != layer.out_size
                or group.divisor != 1
            ):
                continue
            module = self.get_module(name)
            in_deps = self._dims[module].in_deps
            if len(in_deps) > 1 or (
                in_deps and (in_deps[0][1] != layer.in_channels or self.groups[in_deps[0][0]].divisor != 1)
            ):
                continue
            node = dg.module2node.get(module)
            modules = [name]
            if node is not None and len(node.outputs) == 1 and isinstance(node.outputs[0].module, nn.BatchNorm2d):
                bn = node.outputs[0].module
                if bn.num_features == layer.out_channels and bn in self._names:
                    modules.append(self._names[bn])
            out[name] = tuple(modules)
        return out

    def block_modules(self, block: str) -> tuple[str, ...]:
        """Names of the modules removing ``block`` replaces by the identity (the block itself, or a layer and its BN)."""
        return self._removable_layers.get(block, (block,))

    def removed_modules(self, plan: Plan) -> list[str]:
        """Names of the modules ``plan`` replaces by the identity (removed blocks, removed layers and their BNs)."""
        return [m for b in self.skipped_blocks(plan) for m in self.block_modules(b)]

    def removal_filter(self, plan: Plan) -> Callable[[str], bool]:
        """Whether the module called ``name`` is gone under ``plan``: removed, or inside a removed block."""
        exact = tuple(self.removed_modules(plan))
        if not exact:
            return lambda _name: False
        prefixes = tuple(f"{m}." for m in exact)
        return lambda name: name in exact or name.startswith(prefixes)

    @staticmethod
    def _trace(model: nn.Module, example_inputs: torch.Tensor) -> tuple[list[nn.Module], dict]:
        order: list[nn.Module] = []
        shapes: dict[nn.Module, tuple[tuple[int, int], tuple[int, int], int]] = {}

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if module in shapes:
                return
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                shapes[module] = ((x.shape[-2], x.shape[-1]), (output.shape[-2], output.shape[-1]), 1)
            else:
                positions = output.numel() // (output.shape[0] * output.shape[-1])
                shapes[module] = ((1, 1), (1, 1), positions)
            order.append(module)

        _run_with_hooks(model, example_inputs, hook)
        return order, shapes

    def _channels(self, module: nn.Module, out: bool) -> int:
        if isinstance(module, nn.Conv2d):
            return module.out_channels if out else module.in_channels
        if isinstance(module, nn.Linear):
            return module.out_features if out else module.in_features
        features = getattr(module, "num_features", None)
        if features is None:
            features = next(module.parameters(recurse=False)).shape[0]
        return int(features)

    def _layer_info(
        self, module: nn.Module, in_size: tuple[int, int], out_size: tuple[int, int], positions: int
    ) -> LayerInfo:
        name = self._names[module]
        if isinstance(module, nn.Conv2d):
            kind = "dwconv" if _is_depthwise(module) else "conv"
            c_in, c_out = module.in_channels, module.out_channels
            kernel, stride, groups = _pair(module.kernel_size), _pair(module.stride), module.groups
        else:
            kind, c_in, c_out = "linear", module.in_features, module.out_features
            kernel, stride, groups = (1, 1), (1, 1), 1
        return LayerInfo(
            name=name,
            kind=kind,
            in_channels=c_in,
            out_channels=c_out,
            kernel=kernel,
            stride=stride,
            groups=groups,
            in_size=in_size,
            out_size=out_size,
            flops=_layer_flops(module, c_in, c_out, out_size, positions),
            params=_module_params(module, c_in, c_out),
        )

    def _build_groups(self, ignored: list[nn.Module]) -> list[GroupInfo]:
        dg = self.dependency_graph
        raw = []
        self._whole_groups: dict[str, str] = {}  # member layer -> why its group is left whole
        self._divided: dict[str, tuple[int, str]] = {}  # group name -> (divisor, the grouped layer)
        for group in self._all_groups(ignored):
            members, consumers, items = [], [], []
            seen = set()
            divisor, grouped, partial = 1, None, False
            channels = len(group[0].idxs)
            whole_width: set[nn.Module] = set()  # members whose every output channel is in the group
            for dep, idxs in group:
                module, handler = dep.target.module, dep.handler
                if module not in self._dims or (module, handler) in seen:
                    continue
                seen.add((module, handler))
                is_out = dg.is_out_channel_pruning_fn(handler)
                items.append((module, is_out, len(idxs)))
                if isinstance(module, PRUNABLE):
                    (members if is_out else consumers).append(module)
                    if is_out and len(idxs) == channels:
                        whole_width.add(module)
                if _is_grouped(module):
                    divisor, grouped = math.lcm(divisor, module.groups), module
                    # the group must hold all the layer's channels on that side, channel j being the layer's channel j;
                    # otherwise its equal parts are not the layer's groups
                    width = module.out_channels if is_out else module.in_channels
                    partial = partial or width != channels or [int(i) for i in idxs] != list(range(width))
            members = [m for m in members if m in self._rank and m not in ignored]
            if not members or not whole_width.intersection(members):
                continue
            root = min(whole_width.intersection(members), key=self._rank.__getitem__)
            if grouped is not None:
                where = f"{self._names[grouped]} is a grouped convolution (groups={grouped.groups})"
                if partial:
                    for module in members:
                        self._whole_groups[self._names[module]] = (
                            f"{where} and these channels are only part of its channels (a concatenation): its "
                            "groups could not be kept equal"
                        )
                    continue
                if channels % divisor or divisor >= channels:
                    for module in members:
                        self._whole_groups[self._names[module]] = (
                            f"{where}: its {channels} channels cannot lose the same number from each of "
                            f"{divisor} groups"
                        )
                    continue
                self._divided[self._names[root]] = (divisor, where)
            raw.append((root, members, consumers, items, channels, divisor))
        raw.sort(key=lambda r: self._rank[r[0]])
        groups = []
        for index, (root, members, consumers, items, channels, divisor) in enumerate(raw):
            for module, is_out, count in items:
                dims = self._dims[module]
                (dims.out_deps if is_out else dims.in_deps).append((index, count))
            touched = {m for m, _, _ in items}
            groups.append(
                GroupInfo(
                    name=self._names[root],
                    index=index,
                    root=self.layers[self._names[root]],
                    channels=channels,
                    members=tuple(self._names[m] for m in sorted(members, key=self._rank.__getitem__)),
                    consumers=tuple(self._names[m] for m in sorted(consumers, key=self._rank.__getitem__)),
                    flops=sum(self.layers[self._names[m]].flops for m in touched if m in self._rank),
                    params=sum(_module_params(m, self._dims[m].in_total, self._dims[m].out_total) for m in touched),
                    divisor=divisor,
                )
            )
        return groups

    def _all_groups(self, ignored: list[nn.Module]) -> Iterator[Any]:
        """Torch-Pruning's groups rooted at conv/linear layers (as ``get_all_groups`` finds them),
        except that a layer whose group Torch-Pruning cannot form is left whole with the reason
        instead of failing the whole model."""
        dg = self.dependency_graph
        visited: set[nn.Module] = set()
        for module in self._rank:
            if module in ignored or module in visited or module not in dg.module2node:
                continue
            pruner = dg.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            try:
                group = dg.get_pruning_group(
                    module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
                )
            except UnmappableReshapeError as exc:
                self._whole_groups[self._names[module]] = str(exc)
                continue
            except (ArithmeticError, IndexError, ValueError, RuntimeError) as exc:
                self._whole_groups[self._names[module]] = (
                    f"the dependency graph cannot follow its channels ({type(exc).__name__}: {exc})"
                )
                continue
            prunable = True
            for dep, _ in group:
                if dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(dep.target.module)
                    prunable = prunable and dep.target.module not in ignored
            if prunable:
                yield group

    def divided_groups(self) -> list[tuple[str, int, str]]:
        """Groups pruned only in multiples of a divisor: (group, divisor, why), in forward order.

        A group whose channels feed or leave a grouped convolution (``groups`` > 1, not
        depthwise) loses the same channel positions from each of that layer's groups, so its
        kept count is a multiple of the number of groups (:attr:`GroupInfo.divisor`).
        """
        return [(g.name, *self._divided[g.name]) for g in self.groups if g.name in self._divided]

    def whole_layers(self) -> list[tuple[str, str]]:
        """Conv and linear layers no plan can narrow, each with the reason (the head included).

        A layer is left whole when it is the classifier head (its outputs are the classes), when
        its output channels are tied through the dependency graph to the head's, when a grouped
        convolution splits them into parts that cannot all lose the same number of channels
        (one channel per part), or when the graph found no group that prunes its output
        channels (a custom operation or a reshape the tracer could not follow).
        """
        pruned = {m for g in self.groups for m in g.members}
        out = []
        head = self.layers[self.head]
        for name, layer in self.layers.items():
            if name in pruned:
                continue
            if name == self.head:
                out.append((name, "classifier head: its outputs are the classes"))
            elif name in self._whole_groups:
                out.append((name, self._whole_groups[name]))
            elif layer.out_channels == head.out_channels and self._tied_to_head(name):
                out.append((name, f"its output channels are tied to the classifier head ({self.head})"))
            else:
                out.append((name, "no prunable group holds its output channels (an operation the graph cannot follow)"))
        return out

    def _tied_to_head(self, name: str) -> bool:
        module = dict(self.model.named_modules())[name]
        head = dict(self.model.named_modules())[self.head]
        try:
            dg = self.dependency_graph
            fn = dg.get_pruner_of_module(module).prune_out_channels
            group = dg.get_pruning_group(module, fn, idxs=[0])
        except Exception:  # Torch-Pruning cannot form the group at all
            return False
        return any(dep.target.module is head for dep, _ in group)

    # ------------------------------------------------------------------ plans
    def group_names(self) -> list[str]:
        """Names of the prunable groups in forward order."""
        return [g.name for g in self.groups]

    def group(self, name: str) -> GroupInfo:
        """The group called ``name``."""
        self.validate(Plan({name: 1.0}))
        return self.groups[self._group_index[name]]

    def validate(self, plan: Plan) -> None:
        """Check that ``plan`` only names groups of this model.

        Raises:
            InvalidValueError: Naming the unknown groups and listing valid ones.
        """
        unknown_blocks = sorted(set(plan.skip) - self._block_set)
        if unknown_blocks:
            raise InvalidValueError(
                f"plan removes blocks this model cannot lose: {', '.join(unknown_blocks)}. "
                f"Removable blocks and layers: {', '.join(self.blocks) or 'none'}"
            )
        unknown = sorted(set(plan.keep_ratios) - set(self._group_index))
        if unknown:
            shown = ", ".join(self.group_names()[:12]) + (", ..." if len(self.groups) > 12 else "")
            raise InvalidValueError(
                f"plan names groups this model does not have: {', '.join(unknown)}. "
                f"Prunable groups are: {shown} (see `automl-prune graph --model ...`)"
            )

    def kept_channels(self, plan: Plan, round_to: int = 1) -> dict[str, int]:
        """Channels each group keeps under ``plan`` (the counts ``apply`` produces)."""
        self.validate(plan)
        return {g.name: channels_to_keep(g.channels, plan.keep_ratio(g.name), round_to, g.divisor) for g in self.groups}

    def _kept_dims(self, plan: Plan, round_to: int) -> Iterator[tuple[nn.Module, int, int]]:
        """(module, kept input channels, kept output channels) of every parametrised module ``plan`` keeps."""
        kept = self.kept_channels(plan, round_to)
        fraction = [kept[g.name] / g.channels for g in self.groups]

        def kept_in(dims: _Dims) -> int:
            return dims.in_total - round(sum(n * (1.0 - fraction[g]) for g, n in dims.in_deps))

        removed = self.removal_filter(plan)
        for block in self.skipped_blocks(plan):  # forward order: a chain of removed layers passes its input on
            if block in self._removable_layers:
                dims = self._dims[self.get_module(block)]
                fraction[self._group_index[block]] = kept_in(dims) / dims.in_total
        for module, dims in self._dims.items():
            if removed(self._names[module]):
                continue
            c_out = dims.out_total - round(sum(n * (1.0 - fraction[g]) for g, n in dims.out_deps))
            c_in = kept_in(dims)
            if _is_depthwise(module):
                c_in = c_out
            yield module, c_in, c_out

    def cost(self, plan: Plan, round_to: int = 1) -> Cost:
        """Exact FLOPs and parameters of the model ``apply(model, plan, round_to=...)`` builds."""
        flops = params = 0
        for module, c_in, c_out in self._kept_dims(plan, round_to):
            params += _module_params(module, c_in, c_out)
            if module in self._positions:
                flops += _layer_flops(module, c_in, c_out, self._out_sizes[module], self._positions[module])
        return Cost(flops=flops, params=params)

    def layer_shapes(self, plan: Plan, round_to: int = 1) -> list[LayerShape]:
        """The conv and linear layers of ``plan``'s pruned model with their kept channels, in forward order.

        Skipped blocks' layers are left out. This is what latency models are fitted on
        (:mod:`automl_prune.measure.latency_model`): exact, and computed without building the model.
        """
        shapes = []
        for module, c_in, c_out in self._kept_dims(plan, round_to):
            if module not in self._positions:
                continue
            info = self.layers[self._names[module]]
            size = self._out_sizes[module]
            shapes.append(
                LayerShape(
                    name=info.name,
                    kind=info.kind,
                    kernel=info.kernel,
                    in_channels=c_in,
                    out_channels=c_out,
                    out_size=size,
                    positions=self._positions[module],
                    flops=_layer_flops(module, c_in, c_out, size, self._positions[module]),
                )
            )
        return sorted(shapes, key=lambda s: self._rank[self.get_module(s.name)])

    def get_module(self, name: str) -> nn.Module:
        """The model's submodule called ``name``."""
        return self.model.get_submodule(name)

    def fingerprint(self) -> str:
        """A short hash of the architecture (layers, groups, input shape), equal for equal architectures."""
        import hashlib

        parts = [str(tuple(self.example_inputs.shape[1:]))]
        parts += [repr(info) for info in self.layers.values()]
        parts += [
            f"{g.name}:{g.channels}:{g.members}" + (f":/{g.divisor}" if g.divisor > 1 else "") for g in self.groups
        ]
        parts += self.blocks
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]

    def skipped_blocks(self, plan: Plan) -> list[str]:
        """Names of the blocks ``plan`` removes, in model order."""
        return [b for b in self.blocks if plan.skip.get(b, False)]

    def flops_ratio(self, plan: Plan, round_to: int = 1) -> float:
        """FLOPs of the pruned model as a fraction of the dense model's."""
        return self.cost(plan, round_to).flops / self.flops

    def uniform_plan(self, flops_ratio: float, round_to: int = 1, tolerance: float = 1e-4) -> Plan:
        """The uniform keep ratio whose pruned model has FLOPs closest to ``flops_ratio``.

        Solved by bisection on the exact cost (monotone in the keep ratio), then the closer
        of the two bracketing integer channel configurations is taken.

        Args:
            flops_ratio: Target FLOPs as a fraction of the dense model, in (0, 1].
            round_to: Round kept channel counts to a multiple of this.
            tolerance: Bisection stops when the bracket is narrower than this.

        Raises:
            InvalidValueError: For a target outside (0, 1].
        """
        if not 0.0 < flops_ratio <= 1.0:
            raise InvalidValueError(f"FLOPs target must be a fraction in (0, 1], got {flops_ratio}")
        names = self.group_names()
        if flops_ratio >= 1.0:
            return Plan()
        lo, hi = 1e-3, 1.0
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            if self.flops_ratio(Plan.uniform(names, mid), round_to) > flops_ratio:
                hi = mid
            else:
                lo = mid
        candidates = [Plan.uniform(names, lo), Plan.uniform(names, hi)]
        return min(candidates, key=lambda p: abs(self.flops_ratio(p, round_to) - flops_ratio))

    def summary_rows(self) -> list[dict[str, object]]:
        """One row per group for tables: name, type, channels, kernel, stride, output size, FLOPs, params."""
        return [
            {
                "group": g.name,
                "type": g.root.kind,
                "in": g.root.in_channels,
                "out": g.channels,
                "kernel": f"{g.root.kernel[0]}x{g.root.kernel[1]}",
                "stride": g.root.stride[0],
                "out_size": f"{g.root.out_size[0]}x{g.root.out_size[1]}",
                "coupled": len(g.members),
                "flops": g.flops,
                "params": g.params,
            }
            for g in self.groups
        ]


def count_cost(model: nn.Module, example_inputs: torch.Tensor) -> Cost:
    """Count FLOPs (conv/linear MACs per sample) and parameters of ``model`` by running it.

    Independent of :class:`LayerGraph`'s prediction: used to check it and to measure
    models loaded from files.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        batch = output.shape[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += kh * kw * (module.in_channels // module.groups) * output.numel() // batch
        else:
            total += module.in_features * output.numel() // batch

    _run_with_hooks(model, example_inputs, hook)
    return Cost(flops=int(total), params=sum(p.numel() for p in model.parameters()))


def _by_reason(items: Sequence[tuple[str, str]], shown: int) -> str:
    reasons: dict[str, list[str]] = {}
    for name, why in items:
        reasons.setdefault(why, []).append(name)
    parts = []
    for why, names in reasons.items():
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        parts.append(f"{listed}: {why}")
    return "; ".join(parts)


def structure_notes(graph: LayerGraph, shown: int = 4) -> list[str]:
    """One line each for the layers left whole (besides the head) and the groups pruned in multiples.

    Empty for models where every group prunes freely (the zoo's). Printed by the search and by
    ``automl-prune graph``.
    """
    lines = []
    whole = [(n, why) for n, why in graph.whole_layers() if n != graph.head]
    if whole:
        lines.append(f"{len(whole)} layer(s) besides the head are left whole: {_by_reason(whole, shown)}")
    divided = graph.divided_groups()
    if divided:
        items = [(name, f"kept in multiples of {d}, as {why}") for name, d, why in divided]
        lines.append(f"{len(divided)} group(s) are pruned in multiples: {_by_reason(items, shown)}")
    return lines


def removal_note(graph: LayerGraph, shown: int = 6) -> str:
    """One line naming what ``search.skip_gates`` may remove: residual blocks and plain layers (``automl-prune graph``)."""
    layers = [b for b in graph.blocks if b not in graph.residual_blocks]
    if not graph.blocks:
        return "removable blocks (search.skip_gates): none"

    def names(items: list[str]) -> str:
        return ", ".join(items[:shown]) + (f", ... ({len(items)})" if len(items) > shown else "")

    parts = (
        [f"{len(graph.residual_blocks)} residual block(s) {names(graph.residual_blocks)}"]
        if graph.residual_blocks
        else []
    )
    parts += [f"{len(layers)} shape-preserving layer(s) {names(layers)}"] if layers else []
    return "removable blocks (search.skip_gates): " + "; ".join(parts)


def group_table(graph: LayerGraph, plan: Plan | None = None, round_to: int = 1) -> list[dict[str, object]]:
    """Per-group rows with kept channels under ``plan`` (for reports and the CLI)."""
    kept: Mapping[str, int] = graph.kept_channels(plan or Plan(), round_to)
    rows = graph.summary_rows()
    for row in rows:
        row["kept"] = kept[str(row["group"])]
    return rows
