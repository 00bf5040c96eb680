"""Tests of automl_prune.criteria: every registered criterion on real and zoo models.

Contract: each criterion prunes fashion_cnn, resnet20, mobilenetv2 and torchvision's
resnet18 to 50% FLOPs (runnable model, FLOPs on target, dense model untouched). Sanity:
on the trained fashion_cnn, dead channels rank last, FPGM drops duplicated filters,
reconstruction criteria rebuild the next layer better than random selection, and L1
beats random accuracy right after pruning.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from automl_prune.criteria import CRITERIA, Criterion, get_criterion
from automl_prune.criteria.base import to_ranks
from automl_prune.criteria.reconstruction import LassoCriterion, ThiNetCriterion
from automl_prune.errors import InvalidValueError, UnknownNameError
from automl_prune.graph import LayerGraph, count_cost
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec, build_model
from automl_prune.pruning import apply
from automl_prune.types import Plan

ALL = CRITERIA.names()
DATA_DRIVEN = ["apoz", "hrank", "entropy", "taylor", "snip", "thinet", "lasso"]
MODELS = ["fashion_cnn", "resnet20", "mobilenetv2", "tv:resnet18"]


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny and the CPU is shared (no oversubscription)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Each test runs single-threaded (session fixtures are built as in the rest of the suite)."""
    with _single_thread():
        yield


@pytest.fixture(scope="module")
def cnn_batches(fashion) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eight search-val batches of 64 images: what data-driven criteria see."""
    return list(fashion.search_val.batches(64))[:8]


@dataclass
class Case:
    """A model for the contract test with its graph, 50%-FLOPs plan and a little data."""

    model: nn.Module
    graph: LayerGraph
    plan: Plan
    data: list[tuple[torch.Tensor, torch.Tensor]]
    example: torch.Tensor


_CASES: dict[str, Case] = {}


def _case(name: str, trained_cnn: Any, fashion: Any) -> Case:
    if name not in _CASES:
        if name == "fashion_cnn":
            model, example = trained_cnn.model, trained_cnn.info.example_inputs()
            data = list(fashion.search_val.batches(8))[:2]
        else:
            torch.manual_seed(0)
            model = build_model(ModelSpec(name, 3, 10)).eval()
            example = torch.randn(1, 3, 32, 32)
            gen = torch.Generator().manual_seed(1)
            data = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))]
        graph = LayerGraph(model, example)
        _CASES[name] = Case(model, graph, graph.uniform_plan(0.5), data, example)
    return _CASES[name]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- registry
def test_every_criterion_is_described_and_typed() -> None:
    assert set(ALL) == {
        "l1",
        "l2",
        "fpgm",
        "slimming",
        "random",
        "apoz",
        "hrank",
        "entropy",
        "taylor",
        "snip",
        "thinet",
        "lasso",
    }
    for name in ALL:
        crit = get_criterion(name)
        assert isinstance(crit, Criterion)
        assert crit.name == name
        assert crit.reference, name
        assert CRITERIA.describe(name), name
        assert crit.needs_data == (name in DATA_DRIVEN), name
        assert crit.needs_grad == (name in ("taylor", "snip")), name
        assert type(crit).__call__.__doc__ or type(crit).__doc__


def test_list_criteria_shows_names_and_references(capsys: pytest.CaptureFixture[str]) -> None:
    from automl_prune.cli import main

    assert main(["list", "criteria"]) == 0
    out = capsys.readouterr().out
    for name in ALL:
        assert name in out
    assert "CVPR 2019" in out and "ICCV 2017" in out


def test_unknown_criterion_lists_valid_names(trained_cnn) -> None:
    with pytest.raises(UnknownNameError) as err:
        get_criterion("l3")
    message = str(err.value)
    for name in ALL:
        assert name in message
    graph = LayerGraph(trained_cnn.model, trained_cnn.info.example_inputs())
    with pytest.raises(UnknownNameError, match="fpgm"):
        apply(trained_cnn.model, graph.uniform_plan(0.5), "geometric", graph=graph)


@pytest.mark.parametrize("name", DATA_DRIVEN)
def test_data_driven_without_data_errors_clearly(name: str, trained_cnn) -> None:
    model = trained_cnn.model
    graph = LayerGraph(model, trained_cnn.info.example_inputs())
    plan = graph.uniform_plan(0.5)
    with pytest.raises(InvalidValueError, match=f"'{name}' is data-driven and needs batches.*data=") as err:
        apply(model, plan, name, graph=graph)
    assert "--data.dataset" in str(err.value)
    with pytest.raises(InvalidValueError, match="holds no batch"):
        apply(model, plan, name, graph=graph, data=[])
    assert _hooks(model) == 0


def test_gradient_criteria_need_labels(trained_cnn, cnn_batches) -> None:
    graph = LayerGraph(trained_cnn.model, trained_cnn.info.example_inputs())
    images_only = [x for x, _ in cnn_batches[:1]]
    with pytest.raises(InvalidValueError, match="needs labels"):
        apply(trained_cnn.model, graph.uniform_plan(0.5), "taylor", graph=graph, data=images_only)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name", ALL)
def test_contract_prunes_to_target_flops(name: str, model_name: str, trained_cnn, fashion) -> None:
    case = _case(model_name, trained_cnn, fashion)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    pruned = apply(case.model, case.plan, name, graph=case.graph, data=case.data)

    ratio = count_cost(pruned, case.example).flops / case.graph.flops
    assert abs(ratio - 0.5) <= 0.03, f"{name} on {model_name}: FLOPs ratio {ratio:.3f}"
    with torch.no_grad():
        out = pruned(case.data[0][0][:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the dense model was modified"
    assert _hooks(case.model) == 0 and not case.model.training


def test_slimming_on_a_model_without_batchnorm_errors() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    graph = LayerGraph(model, torch.randn(1, 1, 12, 12))
    with pytest.raises(InvalidValueError, match="BatchNorm.*'l1'"):
        apply(model, graph.uniform_plan(0.5), "slimming", graph=graph)
    pruned = apply(model, graph.uniform_plan(0.5), "l1", graph=graph)  # the suggested fix works
    assert pruned(torch.randn(2, 1, 12, 12)).shape == (2, 10)


# --------------------------------------------------------------------------- sanity
def _group_scores(crit: Criterion, model: nn.Module, graph: LayerGraph, data: Any, group: str) -> torch.Tensor:
    """Scores ``crit`` gives the channels of ``group`` (prepared on ``model``)."""
    crit.prepare(model, graph, data)
    try:
        dg = graph.dependency_graph
        root = dict(model.named_modules())[group]
        channels = graph.group(group).channels
        tp_group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, list(range(channels)))
        scores = crit(tp_group).detach().flatten().double()
    finally:
        crit.release()
    assert scores.numel() == channels
    return scores


DEAD = [3, 17, 40]


@pytest.fixture(scope="module")
def dead_cnn(trained_cnn) -> tuple[nn.Module, LayerGraph]:
    """The trained fashion_cnn with channels 3, 17 and 40 of features.4 switched off (filter and BN zeroed)."""
    model = copy.deepcopy(trained_cnn.model).eval()
    with torch.no_grad():
        model.features[4].weight[DEAD] = 0.0
        model.features[5].weight[DEAD] = 0.0
        model.features[5].bias[DEAD] = 0.0
    return model, LayerGraph(model, trained_cnn.info.example_inputs())


@pytest.mark.parametrize(
    "name", ["l1", "l2", "slimming", "apoz", "hrank", "entropy", "taylor", "snip", "thinet", "lasso"]
)
def test_dead_channels_rank_least_important(name: str, dead_cnn, cnn_batches) -> None:
    model, graph = dead_cnn
    scores = _group_scores(get_criterion(name), model, graph, cnn_batches[:4], "features.4")
    alive = [i for i in range(scores.numel()) if i not in DEAD]
    assert scores[DEAD].max() < scores[alive].min(), (
        f"{name}: dead {scores[DEAD].tolist()}, alive min {scores[alive].min():.4g}"
    )
    assert sorted(torch.argsort(scores)[: len(DEAD)].tolist()) == DEAD


def test_fpgm_removes_duplicated_filters_first_not_the_smallest(trained_cnn) -> None:
    model = copy.deepcopy(trained_cnn.model).eval()
    conv = model.features[4]
    weight = conv.weight.detach().flatten(1)
    norms = weight.norm(dim=1)
    slots = torch.argsort(norms, descending=True)[:5].tolist()  # the 5 largest filters are overwritten ...
    distinct = [i for i in range(norms.numel()) if i not in slots and norms[i] >= norms.median()]
    spread = torch.cdist(weight[distinct], weight).sum(1)
    source = distinct[int(torch.argmin(spread))]  # ... by copies of a typical filter of above-median norm
    with torch.no_grad():
        conv.weight[slots] = conv.weight[source].clone()
    graph = LayerGraph(model, trained_cnn.info.example_inputs())
    duplicated = {source, *slots}

    fpgm = _group_scores(get_criterion("fpgm"), model, graph, None, "features.4")
    assert set(torch.argsort(fpgm)[: len(duplicated)].tolist()) == duplicated
    l1 = _group_scores(get_criterion("l1"), model, graph, None, "features.4")
    assert not set(torch.argsort(l1)[: len(duplicated)].tolist()) & duplicated  # l1 drops small filters instead


def _layer_output_error(dense: nn.Module, pruned: nn.Module, layer: str, batches: list[torch.Tensor]) -> float:
    """Relative squared error of ``layer``'s output in ``pruned`` vs ``dense`` on ``batches``."""
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [
        dict(m.named_modules())[layer].register_forward_hook(lambda _m, _i, o, k=k: outputs[k].append(o.detach()))
        for k, m in enumerate((dense, pruned))
    ]
    try:
        with torch.no_grad():
            for x in batches:
                dense(x)
                pruned(x)
    finally:
        for h in handles:
            h.remove()
    ref, out = torch.cat(outputs[0]), torch.cat(outputs[1])
    return float((ref - out).pow(2).sum() / ref.pow(2).sum())


@pytest.fixture(scope="module")
def next_layer_errors(trained_cnn, fashion, cnn_batches) -> dict[str, float]:
    """Error of features.8's output after halving group features.4 with each selection."""
    model = trained_cnn.model
    graph = LayerGraph(model, trained_cnn.info.example_inputs())
    plan = Plan({"features.4": 0.5})
    held_out = [x for x, _ in list(fashion.test.batches(250))[:2]]

    def error(crit: Criterion) -> float:
        return _layer_output_error(
            model, apply(model, plan, crit, graph=graph, data=cnn_batches), "features.8", held_out
        )

    with _single_thread():
        errors = {f"random{s}": error(get_criterion("random", seed=s)) for s in range(3)}
        errors["random"] = sum(errors[f"random{s}"] for s in range(3)) / 3
        errors["thinet"] = error(ThiNetCriterion())
        errors["thinet-select"] = error(ThiNetCriterion(reconstruct=False))
        errors["lasso"] = error(LassoCriterion())
        errors["lasso-select"] = error(LassoCriterion(reconstruct=False))
        errors["l1"] = error(get_criterion("l1"))
    logging.getLogger(__name__).info("next-layer errors: %s", errors)
    return errors


def test_reconstruction_criteria_beat_random_selection(next_layer_errors: dict[str, float]) -> None:
    e = next_layer_errors
    assert e["thinet-select"] < e["random"], e  # the greedy selection alone
    assert e["thinet"] < e["random"], e
    assert e["lasso-select"] < e["random"], e
    assert e["lasso"] < e["random"], e


def test_lasso_reconstruction_lowers_the_output_error(next_layer_errors: dict[str, float]) -> None:
    e = next_layer_errors
    assert e["lasso"] < 0.8 * e["lasso-select"], e  # same channels, refitted weights
    assert e["thinet"] <= e["thinet-select"], e


def test_lasso_writes_refitted_weights_into_the_pruned_model(trained_cnn, cnn_batches) -> None:
    model = trained_cnn.model
    graph = LayerGraph(model, trained_cnn.info.example_inputs())
    plan = Plan({"features.4": 0.5})
    plain = apply(model, plan, LassoCriterion(reconstruct=False), graph=graph, data=cnn_batches)
    refit = apply(model, plan, LassoCriterion(), graph=graph, data=cnn_batches)
    assert plain.features[8].weight.shape == refit.features[8].weight.shape == (128, 32, 3, 3)
    assert torch.equal(plain.features[4].weight, refit.features[4].weight)  # same selection
    assert not torch.allclose(plain.features[8].weight, refit.features[8].weight)  # consumer refitted
    assert torch.equal(plain.features[0].weight, refit.features[0].weight)  # layers before untouched


def test_l1_accuracy_after_pruning_beats_random(trained_cnn, fashion_small, cnn_batches) -> None:
    model = trained_cnn.model
    graph = LayerGraph(model, trained_cnn.info.example_inputs())
    plan = graph.uniform_plan(0.5)
    l1 = evaluate_accuracy(apply(model, plan, "l1", graph=graph), fashion_small.test)
    randoms = [
        evaluate_accuracy(apply(model, plan, get_criterion("random", seed=s), graph=graph), fashion_small.test)
        for s in range(3)
    ]
    random_mean = sum(randoms) / len(randoms)
    logging.getLogger(__name__).info("accuracy at 50%% FLOPs: l1 %.4f, random %s", l1, randoms)
    # Without fine-tuning (or BN re-calibration) every pruned 2-epoch model loses much accuracy,
    # and how much varies between trainings (l1 0.24..0.51 seen, random 0.14..0.20); l1 must
    # beat every random draw and their mean by a clear margin.
    assert l1 > max(randoms) + 0.02 and l1 > random_mean + 0.05, (l1, randoms)


def test_to_ranks_breaks_ties_and_keeps_order() -> None:
    ranks = to_ranks(torch.tensor([0.5, 0.1, 0.5, 0.9]), tie_break=torch.tensor([2.0, 0.0, 1.0, 0.0]))
    assert ranks.tolist() == [2.0, 0.0, 1.0, 3.0]
