"""LayerGraph: groups, analytic FLOPs/params and exact plan cost prediction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automl_prune.errors import InvalidValueError
from automl_prune.graph import LayerGraph, count_cost, removal_note
from automl_prune.models import ModelSpec, build_model
from automl_prune.pruning import apply, dependency_graph
from automl_prune.types import Plan

ZOO = ["fashion_cnn", "resnet20", "resnet56", "vgg16_bn", "mobilenetv2"]
SHAPES = [(1, 28), (3, 32)]


def _graph(name: str, channels: int, size: int) -> tuple[nn.Module, torch.Tensor, LayerGraph]:
    model = build_model(ModelSpec(name, channels, 10)).eval()
    x = torch.zeros(1, channels, size, size)
    return model, x, LayerGraph(model, x)


def _formula_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Sum of k_h*k_w*C_in*C_out*H_out*W_out/groups (+ in*out for linear), output sizes from the conv arithmetic."""
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        sizes[module] = tuple(inputs[0].shape[-2:])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            h_in, w_in = sizes[m]
            h_out = (h_in + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
            w_out = (w_in + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
            total += m.kernel_size[0] * m.kernel_size[1] * m.in_channels * m.out_channels * h_out * w_out // m.groups
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_flops_and_params_match_formulas(name: str, channels: int, size: int) -> None:
    model, x, graph = _graph(name, channels, size)
    assert graph.flops == _formula_flops(model, x)
    assert graph.params == sum(p.numel() for p in model.parameters())
    assert sum(layer.flops for layer in graph.layers.values()) == graph.flops


def test_known_resnet20_cost() -> None:
    """ResNet-20 on 32x32: 40.8M MACs and 0.27M params, as commonly reported."""
    _, _, graph = _graph("resnet20", 3, 32)
    assert graph.flops == 40_813_184
    assert round(graph.params / 1e6, 2) == 0.27


def test_fashion_cnn_by_hand() -> None:
    _, _, graph = _graph("fashion_cnn", 1, 28)
    assert graph.flops == 9 * 1 * 32 * 28 * 28 + 9 * 32 * 64 * 14 * 14 + 9 * 64 * 128 * 7 * 7 + 128 * 10
    assert [g.channels for g in graph.groups] == [32, 64, 128]
    g = graph.groups[0]
    assert (g.root.kind, g.root.kernel, g.root.stride, g.root.out_size) == ("conv", (3, 3), (1, 1), (28, 28))


def test_head_is_excluded_and_residuals_coupled() -> None:
    model, _, graph = _graph("resnet20", 3, 32)
    assert graph.head == "fc"
    assert all(g.name != "fc" for g in graph.groups)
    # each stage's block outputs are tied through the residual adds: 3 coupled groups + 9 inner convs
    coupled = [g for g in graph.groups if len(g.members) > 1]
    assert len(coupled) == 3
    assert len(graph.groups) == 12
    stage2 = next(g for g in coupled if g.channels == 32)
    assert "layers.3.shortcut.0" in stage2.members and "layers.3.conv2" in stage2.members


def test_depthwise_conv_is_coupled_with_its_producer() -> None:
    model, _, graph = _graph("mobilenetv2", 3, 32)
    group = next(g for g in graph.groups if g.name == "features.4.block.0")  # an expansion conv
    assert "features.4.block.3" in group.members  # the depthwise conv prunes with it
    assert graph.layers["features.4.block.3"].kind == "dwconv"
    assert "features.4.block.6" in group.consumers


@pytest.mark.parametrize("name", ZOO + ["tv:resnet18", "tv:mobilenet_v2"])
def test_predicted_cost_equals_pruned_model(name: str) -> None:
    model, x, graph = _graph(name, 3, 32)
    gen = torch.Generator().manual_seed(0)
    plan = Plan({g: float(torch.empty(1).uniform_(0.2, 1.0, generator=gen)) for g in graph.group_names()})
    for round_to in (1, 8):
        pruned = apply(model, plan, "l1", graph=graph, round_to=round_to)
        cost = count_cost(pruned, x)
        predicted = graph.cost(plan, round_to)
        assert (cost.flops, cost.params) == (predicted.flops, predicted.params)


@pytest.mark.parametrize("name", ZOO)
def test_uniform_plan_hits_flops_target(name: str) -> None:
    model, x, graph = _graph(name, 3, 32)
    plan = graph.uniform_plan(0.5)
    assert len(set(plan.keep_ratios.values())) == 1
    pruned = apply(model, plan, "l1", graph=graph)
    assert abs(count_cost(pruned, x).flops / graph.flops - 0.5) <= 0.03


def test_plain_networks_can_lose_their_shape_preserving_layers() -> None:
    """N2N's layer removal in a plain network: convs with equal input and output widths, stride 1."""
    model, x, graph = _graph("vgg16_bn", 1, 28)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    equal = [n for n, m in convs.items() if m.in_channels == m.out_channels and m.stride == (1, 1)]
    assert graph.residual_blocks == [] and graph.blocks == equal and len(equal) == 9
    assert graph.block_modules("features.3") == ("features.3", "features.4")  # the conv and its BatchNorm
    # the first 64 -> 64 conv and the three 512 -> 512 convs of the last stage, some groups pruned around them
    removed = ["features.3", *equal[-3:]]
    plan = Plan({"features.0": 0.5, "features.37": 0.25}, skip=dict.fromkeys(removed, True))
    assert graph.skipped_blocks(plan) == removed
    pruned = apply(model, plan, "l1", graph=graph)
    convs_left = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs_left) == len(convs) - 4
    # features.7 now reads features.0's 32 kept channels; the last stage's convs are gone, the head reads features.34
    assert pruned.features[7].in_channels == 32 and isinstance(pruned.features[3], nn.Identity)
    cost = count_cost(pruned, x)
    predicted = graph.cost(plan)
    assert (cost.flops, cost.params) == (predicted.flops, predicted.params)
    assert cost.flops < graph.cost(Plan({"features.0": 0.5, "features.37": 0.25})).flops
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # a residual network keeps its layers inside the blocks: only the identity-shortcut blocks are removable
    _, _, resnet = _graph("resnet20", 1, 28)
    assert resnet.blocks == resnet.residual_blocks and len(resnet.blocks) == 7
    # `automl-prune graph` says what may go
    assert removal_note(graph).endswith(
        "9 shape-preserving layer(s) features.3, features.10, features.17, "
        "features.20, features.27, features.30, ... (9)"
    )
    assert "7 residual block(s) layers.0, layers.1, layers.2, layers.4" in removal_note(resnet)
    with pytest.raises(InvalidValueError, match="cannot lose: features.0.*Removable blocks and layers: features.3"):
        graph.cost(Plan(skip={"features.0": True}))


def test_plan_with_unknown_group_is_rejected() -> None:
    _, _, graph = _graph("fashion_cnn", 1, 28)
    with pytest.raises(InvalidValueError, match="does not have: nope.*features.0"):
        graph.cost(Plan({"nope": 0.5}))
    with pytest.raises(InvalidValueError, match=r"in \(0, 1\]"):
        graph.uniform_plan(1.5)


class _TwoHeads(torch.nn.Module):
    """A user model whose logits add a second linear layer on early features to the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.aux = torch.nn.Linear(16, 10)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = torch.relu(self.conv1(x))
        f2 = torch.relu(self.conv2(f1))
        return self.aux(f1.mean((2, 3))) + self.fc(f2.mean((2, 3)))


def test_layers_left_whole_are_named_with_the_reason() -> None:
    from automl_prune.graph import LayerGraph

    graph = LayerGraph(_TwoHeads(), torch.zeros(1, 1, 28, 28))
    whole = dict(graph.whole_layers())
    assert graph.head == "fc" and "classifier head" in whole["fc"]
    assert "tied to the classifier head (fc)" in whole["aux"]
    assert set(whole) == {"fc", "aux"}  # both convs stay prunable
    resnet = LayerGraph(build_model(ModelSpec("resnet20", 1, 10)), torch.zeros(1, 1, 28, 28))
    assert [n for n, _ in resnet.whole_layers()] == [resnet.head]


class _InterruptedOnce(nn.Module):
    """A small conv net whose first forward pass is interrupted, as by a Ctrl-C landing in it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt
        return self.body(x)


def test_a_ctrl_c_during_the_dependency_trace_stops_it() -> None:
    # Torch-Pruning's own call wraps its first forward in a bare except and retries: a Ctrl-C there was lost
    model = _InterruptedOnce()
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(KeyboardInterrupt):
        dependency_graph(model, x)
    assert model.calls == 1
    graph = dependency_graph(model, x)
    assert model.calls == 2  # one forward pass per trace, on the whole batch
    assert [len(g) for g in graph.get_all_groups()]
