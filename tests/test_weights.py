"""Bring your own model: weights trained elsewhere come in safely; unsafe files are refused with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import cli

from automl_prune.config import resolve
from automl_prune.errors import CheckpointError
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec, build_model
from automl_prune.pipeline import dense_model
from automl_prune.weights import load_weights, safe_load


def test_weights_trained_elsewhere_are_the_dense_model(trained_cnn, fashion_small, tmp_path: Path) -> None:
    # a training script's checkpoint dict, saved from DataParallel (every key prefixed with "module.")
    state = {f"module.{k}": v for k, v in trained_cnn.model.state_dict().items()}
    path = tmp_path / "epoch3.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "model_state_dict": state}, path)
    config = resolve("smoke", {"model.weights": str(path), "cache_dir": str(tmp_path / "cache")})
    model, info, ckpt = dense_model(config, fashion_small)
    expected = evaluate_accuracy(trained_cnn.model, fashion_small.test)
    assert expected > 0.8  # a real trained model
    assert evaluate_accuracy(model, fashion_small.test) == expected
    assert info.spec.name == "fashion_cnn" and info.meta["weights"] == str(path.resolve())
    assert ckpt.is_file()
    stamp = ckpt.stat().st_mtime_ns

    def no_second_import(*args, **kwargs):
        raise AssertionError("the weights were imported again")

    with pytest.MonkeyPatch.context() as patch:  # imported once, then served from the cache
        patch.setattr("automl_prune.weights.load_weights", no_second_import)
        again, _, cached = dense_model(config, fashion_small)
    assert cached == ckpt and ckpt.stat().st_mtime_ns == stamp
    assert evaluate_accuracy(again, fashion_small.test) == expected


def test_model_kwargs_reach_the_factory(tmp_path: Path) -> None:
    spec = ModelSpec("automl_prune.models.zoo:FashionCNN", 1, 10, {"widths": [8, 16, 24]})
    small = build_model(spec)
    assert [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 16, 24]
    config = resolve(None, {"model.name": spec.name, "model.kwargs": "{widths: [8, 16, 24]}"})
    assert config.model.kwargs == {"widths": [8, 16, 24]}
    path = tmp_path / "w.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"do not fit fashion_cnn: .*another shape.*model.kwargs"):
        load_weights(build_model(ModelSpec("fashion_cnn", 1, 10)), path, "fashion_cnn")


def test_rgb_first_conv_weights_fit_a_grey_model(tmp_path: Path) -> None:
    rgb = build_model(ModelSpec("resnet20", 3, 10))
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    grey = load_weights(build_model(ModelSpec("resnet20", 1, 10)), path, "resnet20").eval()
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(grey(x), rgb.eval()(x.expand(-1, 3, -1, -1)), atol=1e-5)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_pickled_objects_and_torchscript_are_refused_without_running_code(trained_cnn, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"pickled Python objects .*torch.save\(model.state_dict\(\)"):
        safe_load(evil)
    assert not marker.exists()
    whole = tmp_path / "whole.pt"
    torch.save(trained_cnn.model, whole)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        safe_load(whole)
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(trained_cnn.model).save(str(scripted))
    with pytest.raises(CheckpointError, match=r"TorchScript archive.*torch.jit.load"):
        safe_load(scripted)
    # the CLI says the same in one line, exit 2
    proc = cli(
        "search", "--config", "smoke", "--model.weights", str(whole), "--out", str(tmp_path / "run"), check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "torch.save(model.state_dict()" in proc.stderr.strip().splitlines()[-1]
    state = tmp_path / "state.pt"
    torch.save(trained_cnn.model.state_dict(), state)
    proc = cli(
        "search", "--config", "smoke", "--model.checkpoint", str(state), "--out", str(tmp_path / "r"), check=False
    )
    assert proc.returncode == 2 and "--model.weights FILE" in proc.stderr
