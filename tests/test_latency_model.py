"""The latency model: plans measured on the runtime, cached per machine, and a fit that predicts others."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import automl_prune.measure.latency_model as lm
from automl_prune.errors import InvalidValueError
from automl_prune.graph import LayerGraph
from automl_prune.measure.latency import LatencyStats
from automl_prune.measure.latency_model import LatencyModel, LatencyTable, Measured, calibrate, calibration_plans
from automl_prune.models import ModelSpec, build_model
from automl_prune.types import Plan

META = {"runtime": "onnxruntime", "device": "cpu", "threads": 1, "batch_size": 1}


@pytest.fixture(scope="module")
def resnet_graph() -> LayerGraph:
    return LayerGraph(build_model(ModelSpec("resnet20", 1, 10)).eval(), torch.zeros(1, 1, 28, 28))


@pytest.fixture(scope="module")
def cnn() -> tuple[torch.nn.Module, LayerGraph]:
    model = build_model(ModelSpec("fashion_cnn", 1, 10)).eval()
    return model, LayerGraph(model, torch.zeros(1, 1, 28, 28))


def _stats(ms: float, noisy: bool = False) -> LatencyStats:
    s = LatencyStats.from_times([ms] * 3, warmup=0, batch_size=1, threads=1, device="cpu", runtime="onnxruntime")
    return dataclasses.replace(s, noisy=noisy, note="spread" if noisy else "")


def _plans(graph: LayerGraph, n: int, seed: int = 0) -> list[Plan]:
    rng = np.random.default_rng(seed)
    return [Plan({g: float(rng.uniform(0.2, 1.0)) for g in graph.group_names()}) for _ in range(n)]


def test_fit_recovers_a_latency_that_follows_flops(resnet_graph: LayerGraph) -> None:
    plans = [Plan(), *_plans(resnet_graph, 12)]
    flops = np.array([resnet_graph.cost(p).flops for p in plans]) / resnet_graph.flops
    ratios = 0.15 + 0.85 * flops  # a fixed overhead plus time proportional to FLOPs
    shapes = [resnet_graph.layer_shapes(p) for p in plans]
    model = LatencyModel.fit(shapes, list(ratios), dense_ms=2.0, meta=META)
    assert model.loo_median < 1e-3 and model.loo_within_10 == 1.0 and model.plans == 13
    for plan in _plans(resnet_graph, 5, seed=1):
        expected = 2.0 * (0.15 + 0.85 * resnet_graph.cost(plan).flops / resnet_graph.flops)
        assert model.predict_ms(resnet_graph.layer_shapes(plan)) == pytest.approx(expected, rel=1e-3)
    again = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model
    with pytest.raises(InvalidValueError, match="not a latency model"):
        LatencyModel.from_dict({"features": "flops"})


def test_fit_picks_richer_features_when_flops_do_not_explain_latency(resnet_graph: LayerGraph) -> None:
    plans = [Plan(), *_plans(resnet_graph, 30)]
    shapes = [resnet_graph.layer_shapes(p) for p in plans]
    # memory-bound early layers: latency follows the 28x28 activations, not the FLOPs
    act = [sum(s.out_channels for s in layer if s.out_size == (28, 28)) for layer in shapes]
    ratios = [0.1 + 0.9 * a / act[0] for a in act]
    model = LatencyModel.fit(shapes, ratios, dense_ms=1.0, meta=META)
    # the simplest feature set that explains it: activations per resolution
    assert model.features == "resolutions" and model.loo_p90 < 0.01
    assert "activations@28x28" in model.columns
    flops_only = LatencyModel.fit(shapes, ratios, dense_ms=1.0, meta=META, feature_sets=["flops"])
    assert flops_only.loo_p90 > 5 * model.loo_p90


def test_calibration_plans_are_distinct_exact_widths(resnet_graph: LayerGraph) -> None:
    plans = calibration_plans(resnet_graph, 12, round_to=8, skip_gates=True)
    keys = {tuple(resnet_graph.kept_channels(p, 8).values()) + tuple(resnet_graph.skipped_blocks(p)) for p in plans}
    assert len(plans) == len(keys) == 12
    for plan in plans:
        kept = resnet_graph.kept_channels(plan, 8)
        assert kept == resnet_graph.kept_channels(plan, 1)  # keep ratios are exact: no rounding left to do
        assert all(n % 8 == 0 or n == g.channels or g.channels <= 8 for g, n in zip(resnet_graph.groups, kept.values()))
    assert any(p.skip for p in plans)
    with pytest.raises(InvalidValueError):
        calibration_plans(resnet_graph, 2)


def test_calibrate_measures_and_predicts_in_order(cnn: tuple[torch.nn.Module, LayerGraph], tmp_path: Path) -> None:
    model, graph = cnn
    table = LatencyTable(graph, "onnxruntime", "cpu", threads=1, batch_size=1, cache_dir=tmp_path)
    assert len(table) == 0 and not table.path.exists()
    assert "onnxruntime-cpu-" in table.path.parent.name and table.path.parent.name.endswith("-t1-b1")
    fitted = calibrate(model, graph, table, plans=6, round_to=8, progress=False)
    assert fitted.plans == 7 and fitted.dense_ms > 0 and fitted.runtime == "onnxruntime"
    stored = json.loads(table.path.read_text())
    assert len(stored["entries"]) + table.noisy_count == 6 and stored["dense_ms"] == pytest.approx(table.dense_ms)
    # the min-keep plan (10x fewer FLOPs) measures faster than the dense model; a noisy figure is
    # used in memory but not stored, so the in-memory table is where every measurement is
    smallest = calibration_plans(graph, 6, round_to=8)[0]
    ratios = {table.key(p): r for p, r in table.measured()}
    assert ratios[table.key(smallest)] < 0.9
    # predictions grow with the kept channels (non-negative weights on growing features)
    names = graph.group_names()
    predicted = [fitted.predict_ms(graph.layer_shapes(Plan.uniform(names, k), 8)) for k in (0.25, 0.5, 0.75, 1.0)]
    assert predicted == sorted(predicted) and predicted[-1] == pytest.approx(
        fitted.predict_ms(graph.layer_shapes(Plan()))
    )
    other = LatencyTable(graph, "onnxruntime", "cpu", threads=2, batch_size=1, cache_dir=tmp_path)
    assert other.path != table.path and len(other) == 0


def test_a_cached_table_is_not_measured_again(
    cnn: tuple[torch.nn.Module, LayerGraph], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measurements replaced by quiet, known ones (latency follows FLOPs), so what is cached is certain."""
    model, graph = cnn
    calls: list[list[str]] = []

    def fake_measure(model, graph, plans, table, round_to=1, **kwargs):
        calls.append([table.key(p) for p in plans])
        out = []
        for plan in plans:
            ratio = 0.1 + 0.9 * graph.cost(plan, round_to).flops / graph.flops
            measured = Measured(table.exact_plan(plan, round_to), ratio, _stats(ratio), _stats(1.0))
            table.add(measured, round_to)
            out.append(measured)
        table.save()
        return out

    monkeypatch.setattr(lm, "measure_plans", fake_measure)
    table = LatencyTable(graph, "onnxruntime", "cpu", threads=1, batch_size=1, cache_dir=tmp_path)
    calibrate(model, graph, table, plans=6, round_to=8, progress=False)
    wanted = [table.key(p) for p in calibration_plans(graph, 6, round_to=8)]
    assert calls == [wanted]  # every plan measured once; the fit explains them all, so none again
    reopened = LatencyTable(graph, "onnxruntime", "cpu", threads=1, batch_size=1, cache_dir=tmp_path)
    assert len(reopened) == 6 and reopened.noisy_count == 0 and all(k in reopened for k in wanted)
    fitted = calibrate(model, graph, reopened, plans=6, round_to=8, progress=False)
    assert calls == [wanted] and fitted.plans == 7  # nothing measured the second time
    bigger = calibrate(model, graph, reopened, plans=8, round_to=8, progress=False)
    extra = [k for k in (table.key(p) for p in calibration_plans(graph, 8, round_to=8)) if k not in wanted]
    assert extra and calls[1:] == [extra] and bigger.plans == 9  # only the plans the table lacks


def test_noisy_measurements_are_used_but_not_cached(cnn: tuple[torch.nn.Module, LayerGraph], tmp_path: Path) -> None:
    _, graph = cnn
    table = LatencyTable(graph, "torch", cache_dir=tmp_path)
    quiet, noisy = Plan.uniform(graph.group_names(), 0.5), Plan.uniform(graph.group_names(), 0.25)
    table.add(Measured(quiet, 0.6, _stats(0.6), _stats(1.0)))
    table.add(Measured(noisy, 0.4, _stats(0.4, noisy=True), _stats(1.0)))
    table.dense_ms = 1.0
    table.save()
    assert len(table) == 2 and table.noisy_count == 1
    fitted = table.fit(1.0)
    assert fitted.noisy_plans == 1 and "noisy" in fitted.describe()
    reopened = LatencyTable(graph, "torch", cache_dir=tmp_path)
    assert len(reopened) == 1 and table.key(quiet) in reopened and table.key(noisy) not in reopened
    reopened.rebuild()
    assert len(reopened) == 0 and not reopened.path.exists()


def test_a_damaged_table_is_rebuilt_with_a_warning(
    cnn: tuple[torch.nn.Module, LayerGraph], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, graph = cnn
    table = LatencyTable(graph, "torch", cache_dir=tmp_path)
    table.path.parent.mkdir(parents=True)
    table.path.write_text('{"format": "automl-prune-latency-table", "entries": {tru')
    with caplog.at_level(logging.WARNING, logger="automl_prune.measure.latency_model"):
        assert len(LatencyTable(graph, "torch", cache_dir=tmp_path)) == 0
    assert any("unusable latency table" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidValueError):
        LatencyTable(graph, "torch", threads=0, cache_dir=tmp_path)
