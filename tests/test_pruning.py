"""Plans and apply(): keep ratios, rounding, physically smaller models, real accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from automl_prune.errors import InvalidValueError, UnknownNameError
from automl_prune.graph import LayerGraph
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.pruning import apply, channel_multiple, channels_to_keep, prune_ratio
from automl_prune.training import TrainConfig, train
from automl_prune.types import Plan


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, math.nan, "half", None])
def test_keep_ratio_outside_unit_interval_is_rejected(bad: object) -> None:
    with pytest.raises(InvalidValueError, match="keep ratio of 'g'"):
        Plan({"g": bad})


def test_plan_round_trips_through_dict() -> None:
    plan = Plan({"a": 0.5, "b": 1.0}, {"block": True})
    assert Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(InvalidValueError, match="unknown plan keys"):
        Plan.from_dict({"keep_ratios": {}, "ratios": {}})


def test_channel_counts_and_rounding() -> None:
    assert channels_to_keep(64, 0.5) == 32
    assert channels_to_keep(64, 0.01) == 1
    assert channels_to_keep(64, 0.3, round_to=8) == 16  # 19.2 -> 19 -> nearest multiple of 8
    assert channels_to_keep(64, 0.01, round_to=8) == 8
    # a group no larger than the multiple is rounded to half of it (8 -> 4 -> 2), so it stays prunable
    assert channels_to_keep(6, 0.5, round_to=8) == 4
    assert channels_to_keep(16, 0.3, round_to=16) == 8 and channel_multiple(16, 16) == 8
    assert channels_to_keep(3, 0.5, round_to=16) == 2 and channel_multiple(64, 16) == 16
    # keeping all channels keeps all, even when the group is not a multiple (24 with 16)
    assert channels_to_keep(24, 1.0, round_to=16) == 24 and channels_to_keep(24, 0.9, round_to=16) == 16
    assert prune_ratio(64, 0.25) == 0.75


def test_apply_makes_a_smaller_model_and_keeps_the_original(trained_cnn) -> None:
    model = trained_cnn.model
    x = trained_cnn.info.example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = LayerGraph(model, x)
    pruned = apply(model, Plan({"features.0": 0.5, "features.4": 0.25}), "l1", graph=graph)
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 128]
    assert [c.in_channels for c in convs] == [1, 16, 16]
    assert pruned(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_l1_keeps_the_largest_filters(trained_cnn) -> None:
    model = trained_cnn.model
    graph = LayerGraph(model, trained_cnn.info.example_inputs())
    weight = model.features[0].weight.detach()
    expected = set(torch.argsort(weight.abs().flatten(1).sum(1), descending=True)[:8].tolist())
    pruned = apply(model, Plan({"features.0": 0.25}), "l1", graph=graph)
    kept = pruned.features[0].weight.detach()
    matched = {int(torch.nonzero((weight == row).all(dim=(1, 2, 3)))[0]) for row in kept}
    assert matched == expected


def test_unknown_criterion_lists_valid_ones(trained_cnn) -> None:
    with pytest.raises(UnknownNameError, match="Valid criterion names: .*l1"):
        apply(trained_cnn.model, Plan(), "l7", example_inputs=trained_cnn.info.example_inputs())


@pytest.mark.slow
def test_uniform_half_flops_prune_and_finetune_recovers(trained_cnn, fashion_small) -> None:
    """Real data: a 50%-FLOPs uniform L1 prune loses accuracy; a short fine-tune recovers most of it."""
    model = trained_cnn.model
    base_acc = evaluate_accuracy(model, fashion_small.test)
    assert base_acc > 0.80
    graph = LayerGraph(model, trained_cnn.info.example_inputs())
    pruned = apply(model, graph.uniform_plan(0.5), "l1", graph=graph)
    acc_pruned = evaluate_accuracy(pruned, fashion_small.test)
    tuned = train(pruned, fashion_small, TrainConfig(epochs=0.5, lr=0.01, seed=1), description="fine-tune").model
    acc_tuned = evaluate_accuracy(tuned, fashion_small.test)
    assert acc_tuned > acc_pruned
    assert acc_tuned >= base_acc - 0.04
