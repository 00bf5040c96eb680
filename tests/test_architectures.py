"""Any architecture prunes consistently: concatenations, grouped and depthwise convolutions, squeeze-excitation.

For every random plan the cost model's prediction equals the pruned model's counted cost, the
pruned model runs and exports to ONNX with the same outputs; groups that cannot be pruned
consistently are pruned in multiples that keep them valid, or left whole with the reason.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from automl_prune.criteria import CRITERIA
from automl_prune.errors import InvalidValueError
from automl_prune.graph import LayerGraph, count_cost
from automl_prune.models import ModelSpec, build_model
from automl_prune.pruning import apply, rebuild_structure
from automl_prune.runtimes import get_runtime
from automl_prune.types import Plan


def _cbr(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Branchy(nn.Module):
    """Two concatenated branches with a residual add over the concat, squeeze-excitation and a groups=2 conv."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, add: bool = True) -> None:
        super().__init__()
        self.add = add
        self.stem = _cbr(in_channels, 16, 3, 2)
        self.left = _cbr(16, 8, 1)
        self.right = _cbr(16, 8, 5)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.grouped = _cbr(16, 32, 3, 2, groups=2)
        self.mid = _cbr(32, 24, 3, 2)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.cat([self.left(s), self.right(s)], 1)
        if self.add:
            y = y + s
        w = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.fc(self.mid(self.grouped(y * w)).mean((2, 3)))


def test_grouped_convolution_groups_are_pruned_in_multiples() -> None:
    graph = LayerGraph(Branchy(), torch.zeros(1, 1, 28, 28))
    groups = {g.name: g for g in graph.groups}
    # the stem is tied to both branches (residual add over the concat) and feeds the groups=2 conv
    assert set(groups["stem.0"].members) == {"stem.0", "left.0", "right.0", "se_expand"}
    assert groups["stem.0"].divisor == 2 and groups["grouped.0"].divisor == 2
    assert groups["se_reduce"].divisor == 1 and groups["mid.0"].divisor == 1
    assert [name for name, *_ in graph.divided_groups()] == ["stem.0", "grouped.0"]
    assert "grouped.0 is a grouped convolution (groups=2)" in graph.divided_groups()[0][2]
    # every width the cost model predicts is a whole number of channels per conv group
    for keep in np.linspace(0.05, 1.0, 20):
        kept = graph.kept_channels(Plan.uniform(graph.group_names(), float(keep)))
        assert kept["stem.0"] % 2 == 0 and kept["grouped.0"] % 2 == 0


def test_a_concatenation_feeding_part_of_a_grouped_conv_is_left_whole_with_the_reason() -> None:
    graph = LayerGraph(Branchy(add=False), torch.zeros(1, 1, 28, 28))
    whole = dict(graph.whole_layers())
    assert "left.0" in whole and "right.0" in whole
    assert "only part of its channels (a concatenation)" in whole["left.0"]
    assert "left.0" not in graph.group_names() and "right.0" not in graph.group_names()
    assert "stem.0" in graph.group_names()  # the stem still prunes: it only feeds the branches


def test_a_channel_shuffle_leaves_its_groups_whole_and_the_rest_prunable() -> None:
    model = build_model(ModelSpec("tv:shufflenet_v2_x0_5", 3, 10)).eval()
    graph = LayerGraph(model, torch.zeros(1, 3, 32, 32))
    reasons = [why for name, why in graph.whole_layers() if name != graph.head]
    assert reasons and all("channel shuffle" in why or "cannot follow its channels" in why for why in reasons)
    assert sum("channel shuffle" in why for why in reasons) >= 10
    assert len(graph.groups) >= 15  # every branch's inner 1x1 -> depthwise -> 1x1 stays prunable


# (model, input channels, input size): the zoo and torchvision models carrying each structure
ARCHITECTURES = [
    ("branchy", 1, 28),  # concat + residual add over it + squeeze-excitation + groups=2
    ("resnet20", 3, 32),
    ("vgg16_bn", 1, 28),  # plain: shape-preserving layers removable
    ("mobilenetv2", 3, 32),
    ("tv:googlenet", 3, 32),  # concatenations
    ("tv:densenet121", 3, 32),
    ("tv:shufflenet_v2_x0_5", 3, 32),  # concatenation + channel shuffle
    ("tv:resnext50_32x4d", 3, 32),  # grouped convolutions
    ("tv:regnet_x_400mf", 3, 32),
    ("tv:efficientnet_b0", 3, 32),  # squeeze-excitation + depthwise
    ("tv:mobilenet_v3_small", 3, 32),
    ("tv:mobilenet_v2", 3, 32),  # depthwise
]


def _model(name: str, channels: int) -> nn.Module:
    torch.manual_seed(0)
    model = Branchy(channels) if name == "branchy" else build_model(ModelSpec(name, channels, 10))
    for m in model.modules():  # non-trivial BN statistics, so that a misaligned channel changes the outputs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _random_plan(graph: LayerGraph, rng: random.Random) -> Plan:
    keeps = {g: rng.uniform(0.05, 1.0) for g in graph.group_names()}
    return Plan(keeps, skip={b: rng.random() < 0.3 for b in graph.blocks})


@pytest.mark.parametrize(("name", "channels", "size"), ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_random_plans_prune_to_the_predicted_cost_run_and_export(name: str, channels: int, size: int) -> None:
    model = _model(name, channels)
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    graph = LayerGraph(model, x[:1])
    assert graph.groups, f"{name}: no prunable group found"
    rng = random.Random(name)
    for trial in range(2):
        plan = _random_plan(graph, rng)
        for round_to in (1, 8):
            pruned = rebuild_structure(model, graph, plan, round_to)
            predicted, counted = graph.cost(plan, round_to), count_cost(pruned, x[:1])
            assert (counted.flops, counted.params) == (predicted.flops, predicted.params), (name, trial, round_to)
            assert counted.flops < graph.flops or all(k == 1.0 for k in plan.keep_ratios.values())
    pruned = apply(model, _random_plan(graph, rng), "l1", graph=graph, round_to=8)
    with torch.no_grad():
        expected = pruned(x)
    assert expected.shape == (2, 10) and torch.isfinite(expected).all()
    onnx = get_runtime("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = onnx.convert(pruned, x[:1])
    np.testing.assert_allclose(onnx.run(artifact, x), expected.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_every_criterion_prunes_concatenations_and_grouped_convs_consistently(criterion: str) -> None:
    model = _model("branchy", 1)
    x = torch.randn(1, 1, 28, 28)
    graph = LayerGraph(model, x)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(4)]
    plan = Plan({"stem.0": 0.5, "grouped.0": 0.5, "mid.0": 0.6})  # the SE squeeze (no BatchNorm) kept whole
    pruned = apply(model, plan, criterion, graph=graph, data=data)
    counted, predicted = count_cost(pruned, x), graph.cost(plan)
    assert (counted.flops, counted.params) == (predicted.flops, predicted.params)
    assert torch.isfinite(pruned(x)).all()
    assert pruned.grouped[0].groups == 2 and pruned.grouped[0].in_channels == 8


def test_slimming_says_which_group_has_no_batchnorm() -> None:
    model = _model("branchy", 1)
    graph = LayerGraph(model, torch.zeros(1, 1, 28, 28))
    with pytest.raises(InvalidValueError, match="group 'se_reduce'.*no affine BatchNorm"):
        apply(model, Plan({"se_reduce": 0.5}), "slimming", graph=graph)


@pytest.fixture(scope="module")
def trained_branchy(fashion_small) -> nn.Module:
    """Branchy trained one epoch on 12k Fashion-MNIST images."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y in DataLoader(TensorDataset(fashion_small.train.images, fashion_small.train.labels), 128, shuffle=True):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("strategy", ["uniform", "global", "abc"])
def test_searches_on_the_branchy_model_evaluate_and_meet_the_budget(trained_branchy, fashion_small, tmp_path, strategy):
    import json

    import automl_prune
    from automl_prune.measure.accuracy import evaluate_accuracy

    data = (fashion_small.search_val.images, fashion_small.search_val.labels)
    quick = {"search.refine_top": 0, "search.eval_size": 500, "search.recalibration_batches": 2, "prune.round_to": 1}
    result = automl_prune.search(
        trained_branchy,
        data,
        data,
        budget={"flops": 0.5},
        strategy=strategy,
        evaluations=6,
        options=quick,
        out=tmp_path / strategy,
    )
    stored = json.loads((tmp_path / strategy / "result.json").read_text())
    assert stored["failed_evaluations"] == 0
    pruned = result.prune()
    x = torch.zeros(1, 1, 28, 28)
    assert count_cost(pruned, x).flops <= 0.5 * count_cost(trained_branchy, x).flops
    assert evaluate_accuracy(pruned, result.evaluator.val) == pytest.approx(result.score)
    assert result.score > 0.3  # dense 0.75 on search-val; half the FLOPs keeps well above chance (0.1)


def test_structure_notes_say_which_groups_are_constrained_and_why() -> None:
    from automl_prune.graph import structure_notes

    notes = structure_notes(LayerGraph(Branchy(add=False), torch.zeros(1, 1, 28, 28)))
    assert len(notes) == 2
    # the squeeze-excitation's expand conv multiplies the concat's channels, so it is tied to them
    assert notes[0].startswith("3 layer(s) besides the head are left whole: left.0, right.0, se_expand: grouped.0 is")
    assert notes[1].startswith("1 group(s) are pruned in multiples: grouped.0: kept in multiples of 2")
    assert structure_notes(LayerGraph(build_model(ModelSpec("resnet20", 1, 10)), torch.zeros(1, 1, 28, 28))) == []


def test_the_torch_pruning_internal_wrapped_for_channel_shuffles_is_still_there() -> None:
    """graph.py wraps index_mapping.update_reshape_index_mapping; a Torch-Pruning release that moves it fails here."""
    from torch_pruning.dependency import index_mapping

    import automl_prune.graph  # noqa: F401 - installs the wrapper

    assert getattr(index_mapping.update_reshape_index_mapping, "_automl_prune", False)
    assert index_mapping.update_index_mapping.__globals__ is vars(index_mapping)  # the call the wrapper intercepts
