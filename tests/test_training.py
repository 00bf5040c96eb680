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


@pytest.mark.slow
def test_train_command_interrupted_goes_on_where_it_stopped(tmp_path) -> None:
    """Ctrl-C during `automl-prune train` keeps the training so far; the same command goes on from it."""
    import os
    import signal
    import subprocess
    import time

    from cli_helpers import command

    from automl_prune.checkpoint import load_checkpoint

    env = {**os.environ, "AUTOML_PRUNE_CACHE": str(tmp_path / "cache")}
    args = command("train", "--data.dataset", "digits", "--train.epochs", "30", "--seed", "0", "--out", str(tmp_path))
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    resume_files: list = []
    while not resume_files and time.time() < deadline and proc.poll() is None:
        resume_files = list((tmp_path / "cache" / "baselines").glob("*.pt.resume"))
        time.sleep(0.02)
    assert proc.poll() is None and resume_files, "the training ended (or never saved) before it could be stopped"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; the training so far is kept" in stderr and "the same command goes on" in stderr
    assert resume_files[0].is_file() and not (tmp_path / "model.pt").exists()
    stopped_at = torch.load(resume_files[0], weights_only=True)["step"]

    again = subprocess.run([*args[:3], "-v", *args[3:]], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming at step {stopped_at} of" in again.stderr
    assert not resume_files[0].exists()
    _, info = load_checkpoint(tmp_path / "model.pt")
    assert [h["epoch"] for h in info.meta["history"]] == list(range(1, 31))
    assert info.meta["test_accuracy"] > 0.8


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


@pytest.fixture(scope="module")
def fashion_tiny(fashion_small):
    """2,000 training and 500 search-val images: 20 steps an epoch at batch 100, for resume tests."""
    from automl_prune.data import DataSplits

    return DataSplits(
        name="fashion-mnist-2k",
        train=fashion_small.train.subset(2000, seed=1),
        search_val=fashion_small.search_val.subset(500, seed=1),
        test=fashion_small.test,
        num_classes=fashion_small.num_classes,
        in_channels=fashion_small.in_channels,
        image_size=fashion_small.image_size,
    )


def _interrupt_after(monkeypatch, steps: int) -> None:
    """Make the training loop stop with KeyboardInterrupt after ``steps`` steps, as Ctrl-C would."""
    from automl_prune import training

    original = training.Progress.update

    def update(self, n: int = 1) -> None:
        original(self, n)
        if self.n >= steps and self.unit == "step":
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Progress, "update", update)


RESUME_CONFIG = TrainConfig(epochs=2.5, batch_size=100, lr=0.05, seed=3)  # 50 steps, 20 an epoch


def _fresh_cnn():
    """fashion_cnn initialised as a baseline of RESUME_CONFIG is (seeded, then built)."""
    from automl_prune.models import build_model
    from automl_prune.seeding import seed_everything

    seed_everything(RESUME_CONFIG.seed)
    return build_model(ModelSpec("fashion_cnn", 1, 10))


@pytest.fixture(scope="module")
def uninterrupted(fashion_tiny):
    """RESUME_CONFIG's training run from start to end, without a resume file."""
    return train(_fresh_cnn(), fashion_tiny, RESUME_CONFIG)


@pytest.mark.parametrize("stop_at", [27, 40])  # inside the second epoch; its last step, before its evaluation
def test_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_one(
    fashion_tiny, uninterrupted, tmp_path, monkeypatch, stop_at
) -> None:
    reference = uninterrupted
    resume = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, stop_at)
        with pytest.raises(KeyboardInterrupt):
            train(_fresh_cnn(), fashion_tiny, RESUME_CONFIG, checkpoint=resume, checkpoint_seconds=0.0)
    assert resume.is_file()
    saved = torch.load(resume, weights_only=True)
    assert saved["step"] == stop_at and saved["epoch"] == 1 and len(saved["history"]) == 1

    resumed = train(_fresh_cnn(), fashion_tiny, RESUME_CONFIG, checkpoint=resume, checkpoint_seconds=0.0)
    assert resumed.steps == reference.steps == 50
    assert resumed.history == reference.history
    assert resumed.val_accuracy == reference.val_accuracy > 0.5
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_resume_file_of_other_settings_is_refused(fashion_tiny, tmp_path, monkeypatch) -> None:
    from automl_prune.errors import CheckpointError
    from automl_prune.models import build_model

    resume = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            model = build_model(ModelSpec("fashion_cnn", 1, 10))
            train(model, fashion_tiny, RESUME_CONFIG, checkpoint=resume, checkpoint_seconds=0.0)
    assert resume.is_file()
    other = TrainConfig(**{**RESUME_CONFIG.to_dict(), "lr": 0.1})
    with pytest.raises(CheckpointError, match=r"other training settings \(lr\).*delete"):
        train(build_model(ModelSpec("fashion_cnn", 1, 10)), fashion_tiny, other, checkpoint=resume)
    with pytest.raises(CheckpointError, match="another model's weights"):
        train(build_model(ModelSpec("resnet20", 1, 10)), fashion_tiny, RESUME_CONFIG, checkpoint=resume)


def test_interrupted_baseline_resumes_and_leaves_no_resume_file(
    fashion_tiny, uninterrupted, tmp_path, monkeypatch
) -> None:
    from automl_prune.baseline import baseline_path, resume_path

    spec = ModelSpec("fashion_cnn", 1, 10)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 30)
        with pytest.raises(KeyboardInterrupt):
            train_baseline(spec, fashion_tiny, RESUME_CONFIG, cache_dir=tmp_path)
    path = baseline_path(spec, fashion_tiny, RESUME_CONFIG, tmp_path)
    assert resume_path(path).is_file() and not path.exists()  # the state at the end of epoch 1 was kept

    again = train_baseline(spec, fashion_tiny, RESUME_CONFIG, cache_dir=tmp_path)
    assert not again.cached and again.path == path
    assert not resume_path(path).exists()
    assert again.info.meta["history"] == uninterrupted.history
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
