"""Where training and scoring compute: CPU everywhere, CUDA where a GPU is present."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import cli

from automl_prune.config import resolve
from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.pipeline import compute_device, evaluator_config_of
from automl_prune.types import Budget, Plan

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (CPU build of torch)")


def test_device_auto_is_cuda_only_where_present() -> None:
    config = resolve(None)
    assert config.device == "auto"
    assert compute_device(config) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert evaluator_config_of(config).device == compute_device(config)
    assert compute_device(resolve(None, {"device": "cpu"})) == "cpu"
    with pytest.raises(InvalidValueError, match="unknown device 'tpu'"):
        compute_device(resolve(None, {"device": "tpu"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_cuda_where_absent_is_one_clear_line(tmp_path) -> None:
    proc = cli("search", "--config", "smoke", "--device", "cuda", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "CUDA is not available" in proc.stderr and "--device cpu" in proc.stderr


@CUDA
def test_scoring_on_cuda_matches_cpu(trained_cnn, fashion_small) -> None:
    plan = Plan({"features.0": 0.5, "features.4": 0.5})
    scores = {}
    for device in ("cpu", "cuda"):
        ev = Evaluator(
            trained_cnn.model, fashion_small, Budget(flops=0.6), EvaluatorConfig(eval_size=1000, device=device)
        )
        built = ev.build(plan)
        assert next(built.parameters()).device.type == device
        scores[device] = ev.evaluate(plan).accuracy
    assert scores["cuda"] == pytest.approx(scores["cpu"], abs=0.005)


@CUDA
def test_training_on_cuda_learns(fashion_small) -> None:
    from automl_prune.baseline import train_baseline
    from automl_prune.measure.accuracy import evaluate_accuracy
    from automl_prune.models import ModelSpec
    from automl_prune.training import TrainConfig

    base = train_baseline(ModelSpec("fashion_cnn", 1, 10), fashion_small, TrainConfig(epochs=1, seed=3), device="cuda")
    assert next(base.model.parameters()).device.type == "cpu"  # returned on the CPU, trained on the GPU
    assert evaluate_accuracy(base.model, fashion_small.test) > 0.75


def test_mixed_precision_only_on_cuda_and_off_by_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import warnings

    from automl_prune.pipeline import set_threads
    from automl_prune.precision import ENV, autocast

    monkeypatch.delenv(ENV, raising=False)
    assert isinstance(autocast("cpu"), contextlib.nullcontext)  # the CPU computes in float32
    with warnings.catch_warnings():  # torch warns that a CUDA autocast is disabled where CUDA is absent
        warnings.simplefilter("ignore", UserWarning)
        assert isinstance(autocast("cuda"), torch.autocast)
        set_threads(resolve(None, {"amp": "false"}))
        assert isinstance(autocast("cuda"), contextlib.nullcontext)
        set_threads(resolve(None))
        assert isinstance(autocast("cuda"), torch.autocast)


@CUDA
def test_mixed_precision_scores_like_float32(trained_cnn, fashion_small, monkeypatch: pytest.MonkeyPatch) -> None:
    from automl_prune.measure.accuracy import evaluate_accuracy
    from automl_prune.precision import ENV

    model = trained_cnn.model.to("cuda")
    monkeypatch.setenv(ENV, "0")
    full = evaluate_accuracy(model, fashion_small.test)
    monkeypatch.setenv(ENV, "1")
    assert evaluate_accuracy(model, fashion_small.test) == pytest.approx(full, abs=0.01)
    trained_cnn.model.cpu()
