"""Training loop and cached baselines on real Fashion-MNIST data."""

from __future__ import annotations

import pytest
import torch

from automl_prune.baseline import train_baseline
from automl_prune.errors import InvalidValueError
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec
from automl_prune.training import TrainConfig, bn_l1_penalty, train


def test_short_training_beats_80_percent(trained_cnn, fashion_small) -> None:
    assert evaluate_accuracy(trained_cnn.model, fashion_small.test) > 0.80
    assert trained_cnn.info.meta["test_accuracy"] > 0.80
    history = trained_cnn.info.meta["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_baseline_is_cached(trained_cnn, fashion_small) -> None:
    again = train_baseline(
        ModelSpec("fashion_cnn", 1, 10), fashion_small, TrainConfig(**trained_cnn.info.meta["train"])
    )
    assert again.cached and again.path == trained_cnn.path
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.model(x), trained_cnn.model(x))


def test_fractional_epoch_runs_that_many_steps(fashion_small) -> None:
    from automl_prune.models import build_model

    model = build_model(ModelSpec("fashion_cnn", 1, 10))
    result = train(model, fashion_small, TrainConfig(epochs=0.05, batch_size=100, eval_every_epoch=False))
    assert result.steps == round(0.05 * (len(fashion_small.train) // 100))
    assert "val_accuracy" in result.history[-1]


def test_bn_l1_penalty_shrinks_gammas(fashion_small) -> None:
    from automl_prune.models import build_model

    plain, sparse = build_model(ModelSpec("fashion_cnn", 1, 10)), build_model(ModelSpec("fashion_cnn", 1, 10))
    config = dict(epochs=0.1, eval_every_epoch=False)
    train(plain, fashion_small, TrainConfig(**config))
    train(sparse, fashion_small, TrainConfig(**config, bn_l1=1e-3))
    assert bn_l1_penalty(sparse).item() < bn_l1_penalty(plain).item()


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"lr": -1}, {"batch_size": 0}, {"bn_l1": -1}])
def test_bad_hyperparameters_are_rejected(kwargs) -> None:
    with pytest.raises(InvalidValueError):
        TrainConfig(**kwargs)


def test_integer_and_float_epochs_are_one_config() -> None:
    assert TrainConfig(epochs=3) == TrainConfig(epochs=3.0)
    assert TrainConfig(epochs=3).to_dict() == TrainConfig(epochs=3.0).to_dict()


@pytest.mark.slow
def test_two_processes_needing_one_baseline_train_it_once(tmp_path) -> None:
    """Started together on the real digits set, one trains the baseline and the other waits and loads it."""
    import os
    import subprocess

    from cli_helpers import command

    from automl_prune.checkpoint import load_checkpoint

    env = {**os.environ, "AUTOML_PRUNE_CACHE": str(tmp_path / "cache")}
    args = ("train", "--data.dataset", "digits", "--train.epochs", "2", "--seed", "0")  # about 10 s of training
    procs = [
        subprocess.Popen(
            command(*args, "--out", str(tmp_path / f"r{i}")),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert sorted("(cached)" in out for out, _ in outs) == [False, True]  # trained once, loaded once
    waited = [err for _, err in outs if "waiting for another process that is training the baseline" in err]
    assert len(waited) == 1  # the second found the first training (they start within a second of each other)
    first, second = (load_checkpoint(tmp_path / f"r{i}" / "model.pt")[0].state_dict() for i in range(2))
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_the_kept_baselines_are_trained_models_the_suite_would_train(trained_resnet20) -> None:
    """Each baseline kept in tests/data/baselines is named by the key the suite computes (so it stands in only
    for that exact baseline), loads under today's code and was really trained (see conftest.KEPT_BASELINES)."""
    from conftest import KEPT_BASELINES

    from automl_prune.baseline import baseline_path
    from automl_prune.checkpoint import load_checkpoint
    from automl_prune.config import resolve
    from automl_prune.pipeline import load_data, model_spec_of, train_config_of

    default = resolve(None)  # the README's first command, `bash scripts/run.sh`
    data = load_data(default)
    wanted = {
        baseline_path(model_spec_of(default, data), data, train_config_of(default)).name,
        trained_resnet20.path.name,
    }
    kept = {p.name for p in KEPT_BASELINES.glob("*.pt")}
    assert kept == wanted, "a kept baseline is stale: delete it (the suite trains it again) and keep the new one"
    for name in kept:
        _, info = load_checkpoint(KEPT_BASELINES / name)
        trained = info.meta["test_accuracy"], info.meta["history"][-1]["val_accuracy"]
        assert min(trained) > 0.75, name  # chance: 0.1
