"""Deployment runtimes: each converts, exports and reloads a model that computes what torch computes."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import pytest
import torch

from automl_prune.config import RUNTIME_NAMES
from automl_prune.errors import InvalidValueError, UnknownNameError
from automl_prune.models import ModelSpec, build_model
from automl_prune.runtimes import RUNTIMES, get_runtime, runtime_for_file, simd_channels


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20", 1, 10))
    # non-trivial BN statistics, so folding them is really checked
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28))
    return model.eval()


def test_config_lists_the_registered_runtimes() -> None:
    assert set(RUNTIME_NAMES) == set(RUNTIMES.names())


def test_onnx_export_folds_batchnorm_and_matches_torch(resnet: torch.nn.Module, tmp_path: Path) -> None:
    runtime = get_runtime("onnxruntime")
    path = runtime.export(resnet, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Conv"] == 21 and ops["BatchNormalization"] == 0
    x = torch.randn(5, 1, 28, 28)  # exported at batch 1, run at 5: the batch dimension is dynamic
    with torch.no_grad():
        expected = resnet(x).numpy()
    assert abs(runtime.run(path, x) - expected).max() < 1e-4
    with runtime.open(path, (2, 1, 28, 28), threads=1) as runner:
        runner()
    assert not list(tmp_path.glob(".*.tmp"))


def test_torchscript_is_frozen_with_batchnorm_folded(resnet: torch.nn.Module, tmp_path: Path) -> None:
    runtime = get_runtime("torchscript")
    path = runtime.export(resnet, torch.zeros(1, 1, 28, 28), tmp_path / "m.ts")
    loaded = runtime.load(path)
    assert "batch_norm" not in str(loaded.graph)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), resnet(x), atol=1e-4)


def test_torch_runtime_folds_batchnorm_in_channels_last(resnet: torch.nn.Module) -> None:
    runtime = get_runtime("torch")
    converted = runtime.convert(resnet, torch.zeros(1, 1, 28, 28))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in converted.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())  # the original is untouched
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = converted(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(out, resnet(x), atol=1e-4)


def test_runtime_names_and_files() -> None:
    with pytest.raises(UnknownNameError, match="onnxruntime, torch, torchscript"):
        get_runtime("tensorrt")
    assert runtime_for_file("a/model.onnx").name == "onnxruntime"
    assert runtime_for_file("model.ts").name == "torchscript"
    with pytest.raises(InvalidValueError, match=".onnx"):
        runtime_for_file("model.tflite")


def test_a_damaged_artifact_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(InvalidValueError, match="onnxruntime cannot load"):
        get_runtime("onnxruntime").open(bad, (1, 1, 28, 28))
    bad_ts = tmp_path / "bad.ts"
    bad_ts.write_bytes(b"not torchscript")
    with pytest.raises(InvalidValueError, match="not a TorchScript file"):
        get_runtime("torchscript").load(bad_ts)


def test_preferred_channel_multiple_follows_the_cpu() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert simd_channels() == (16 if " avx512f" in flags else 8)
    for name in RUNTIMES.names():
        assert get_runtime(name).preferred_multiple("cpu") == simd_channels()
