"""Tests of automl_prune.measure.latency: end-to-end timing and the per-layer lookup table."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from automl_prune.errors import InvalidValueError
from automl_prune.measure import LatencyStats, LatencyTable, measure_latency, num_threads
from automl_prune.measure.latency import layer_key
from automl_prune.models.zoo import fashion_cnn


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield previous
    torch.set_num_threads(previous)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))


def test_measure_latency_stats_are_sane(restore_threads: int) -> None:
    torch.set_num_threads(2)
    model = fashion_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    stats = measure_latency(model, (2, 1, 28, 28), threads=1, warmup=2, runs=7)

    assert isinstance(stats, LatencyStats)
    assert stats.runs == 7 and stats.warmup == 2
    assert stats.batch_size == 2 and stats.threads == 1 and stats.device == "cpu"
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0
    assert torch.get_num_threads() == 2  # restored
    # The caller's model is untouched: still in training mode, BN statistics unchanged.
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert json.loads(json.dumps(stats.to_dict()))["runs"] == 7


def test_measure_latency_records_current_threads_when_none(restore_threads: int) -> None:
    torch.set_num_threads(1)
    stats = measure_latency(_tiny(), (1, 1, 8, 8), warmup=0, runs=1)
    assert stats.threads == 1 and stats.runs == 1 and stats.std_ms == 0.0


def test_channels_last_uses_a_copy() -> None:
    model = _tiny()
    stats = measure_latency(model, (1, 1, 8, 8), warmup=1, runs=3, channels_last=True)
    assert stats.median_ms > 0
    assert model[0].weight.is_contiguous()  # caller's model not converted


def test_num_threads_context_restores(restore_threads: int) -> None:
    torch.set_num_threads(2)
    with num_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with num_threads(None) as n:
        assert n == 2


def test_bigger_model_is_slower() -> None:
    # fashion_cnn at batch 64 does roughly 10^4 times the work of one 1->4 conv at batch 1.
    small = measure_latency(_tiny(), (1, 1, 28, 28), threads=1, warmup=2, runs=5)
    big = measure_latency(fashion_cnn(), (64, 1, 28, 28), threads=1, warmup=1, runs=3)
    assert big.median_ms > 10 * small.median_ms


@pytest.mark.parametrize(
    "kwargs",
    [{"device": "tpu"}, {"device": "not a device"}, {"threads": 0}, {"runs": 0}, {"warmup": -1}],
)
def test_measure_latency_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(InvalidValueError):
        measure_latency(_tiny(), (1, 1, 8, 8), **kwargs)


def test_bad_input_shapes_rejected() -> None:
    with pytest.raises(InvalidValueError):
        measure_latency(_tiny(), (1, 0, 8, 8))
    with pytest.raises(InvalidValueError):
        measure_latency(nn.Linear(4, 4), (1, 4), channels_last=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_unavailable_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match="CUDA"):
        measure_latency(_tiny(), (1, 1, 8, 8), device="cuda")
    with pytest.raises(InvalidValueError, match="CUDA"):
        LatencyTable(device="cuda", cache_dir=tmp_path)


@pytest.mark.parametrize("kwargs", [{"device": "bogus"}, {"threads": 0}, {"batch_size": 0}, {"runs": 0}])
def test_table_rejects_bad_values(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidValueError):
        LatencyTable(cache_dir=tmp_path, **kwargs)


def test_layer_key_format() -> None:
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    key = layer_key(conv, [((1, 16, 32, 32), torch.float32)])
    assert key == "Conv2d(16,32,kernel_size=(3,3),stride=(1,1),padding=(1,1),bias=False)@1x16x32x32"
    assert layer_key(nn.Embedding(10, 3), [((1, 5), torch.int64)]) == "Embedding(10,3)@1x5:int64"


def test_table_predicts_caches_and_reloads(tmp_path: Path, restore_threads: int) -> None:
    torch.set_num_threads(2)
    model = fashion_cnn()
    shape = (1, 1, 28, 28)
    table = LatencyTable(threads=1, batch_size=1, cache_dir=tmp_path, warmup=2, runs=10)
    assert len(table) == 0 and not table.path.exists()
    assert table.path.parent == tmp_path / "latency"
    assert table.path.name.startswith("cpu-") and table.path.name.endswith("-t1-b1.json")

    predicted = table.predict(model, shape)

    assert torch.get_num_threads() == 2
    assert predicted > 0
    rows = table.breakdown(model, shape)
    assert table.measured_count == len(table) == len({key for _, key, _ in rows})
    assert len(rows) == 13  # 3x (conv, bn, relu), 2 max-pools, avg-pool, linear
    assert rows[0][0] == "features.0" and rows[-1][0] == "classifier"
    assert sum(ms for _, _, ms in rows) == pytest.approx(predicted)
    assert table.path.exists()
    on_disk = json.loads(table.path.read_text())
    assert set(on_disk["entries"]) == set(table.entries)

    again = LatencyTable(threads=1, batch_size=1, cache_dir=tmp_path, warmup=2, runs=10)
    assert len(again) == len(table)
    assert again.predict(model, shape) == pytest.approx(predicted)
    assert again.measured_count == 0

    measured = measure_latency(model, shape, threads=1, warmup=5, runs=20)
    assert 0.2 * measured.median_ms <= predicted <= 5 * measured.median_ms

    # Another thread count or batch size uses another file.
    assert LatencyTable(threads=2, cache_dir=tmp_path).path != table.path
    assert len(LatencyTable(batch_size=4, cache_dir=tmp_path)) == 0


def test_table_leaves_model_untouched_and_checks_batch(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = LatencyTable(cache_dir=tmp_path, warmup=0, runs=2)
    assert table.predict(model, (1, 8)) > 0
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(InvalidValueError, match="batch size"):
        table.predict(model, (2, 8))


def test_table_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOML_PRUNE_CACHE", str(tmp_path / "cache"))
    assert LatencyTable().path.parent == tmp_path / "cache" / "latency"


def test_corrupt_cache_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = LatencyTable(cache_dir=tmp_path, warmup=0, runs=2)
    table.path.parent.mkdir(parents=True)
    table.path.write_text('{"format": "automl-prune-latency-table", "entries": {tru')

    with caplog.at_level(logging.WARNING, logger="automl_prune.measure.latency"):
        rebuilt = LatencyTable(cache_dir=tmp_path, warmup=0, runs=2)
    assert len(rebuilt) == 0
    assert any("latency cache" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    assert rebuilt.predict(_tiny(), (1, 1, 8, 8)) > 0
    assert rebuilt.measured_count == 1
    data = json.loads(rebuilt.path.read_text())  # valid JSON again
    assert len(data["entries"]) == 1
    assert len(LatencyTable(cache_dir=tmp_path)) == 1
    assert not list(rebuilt.path.parent.glob(".*.tmp"))  # no temporary files left behind


def test_cache_with_other_metadata_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = LatencyTable(cache_dir=tmp_path, warmup=0, runs=2)
    table.predict(_tiny(), (1, 1, 8, 8))
    data = json.loads(table.path.read_text())
    data["meta"]["threads"] = 7
    table.path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="automl_prune.measure.latency"):
        assert len(LatencyTable(cache_dir=tmp_path)) == 0
    assert caplog.records
