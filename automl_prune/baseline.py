"""Baseline models: train once, cache by what determines the result, reload instantly.

A baseline's training keeps a resume file beside its future checkpoint (``KEY.pt.resume``) while it
runs, so a training that is interrupted (Ctrl-C, a lost machine) goes on where it stopped the next
time the same baseline is asked for; the file goes once the checkpoint is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from automl_prune.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from automl_prune.data import DataSplits
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec, build_model
from automl_prune.seeding import seed_everything
from automl_prune.training import TrainConfig, train

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """The cache directory: ``$AUTOML_PRUNE_CACHE`` or ``~/.cache/automl-prune``."""
    return Path(os.environ.get("AUTOML_PRUNE_CACHE") or Path.home() / ".cache" / "automl-prune")


@dataclass
class Baseline:
    """A trained dense model with its checkpoint info and where it is cached."""

    model: nn.Module
    info: CheckpointInfo
    path: Path
    cached: bool


def baseline_key(spec: ModelSpec, data: DataSplits, config: TrainConfig) -> str:
    """A stable key of everything that determines a trained baseline."""
    blob = json.dumps(
        {
            "spec": spec.to_dict(),
            "dataset": data.name,
            "input": list(data.input_shape()),
            "train_size": len(data.train),
            "val_size": len(data.search_val),
            "train": config.to_dict(),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{spec.name.replace(':', '_').replace('.', '_')}-{data.name}-e{config.epochs:g}-s{config.seed}-{digest}"


def baselines_dir(cache_dir: Path | None = None) -> Path:
    """Where cached baselines live: ``CACHE/baselines`` (``cache_dir`` or :func:`cache_root`)."""
    return (cache_dir or cache_root()) / "baselines"


def baseline_path(spec: ModelSpec, data: DataSplits, config: TrainConfig, cache_dir: Path | None = None) -> Path:
    """The cached checkpoint of the baseline of (spec, data, config), whether or not it exists yet."""
    return baselines_dir(cache_dir) / f"{baseline_key(spec, data, config)}.pt"


def resume_path(path: Path) -> Path:
    """The resume file of the baseline whose checkpoint will be ``path``."""
    return path.with_name(f"{path.name}.resume")


def train_baseline(
    spec: ModelSpec,
    data: DataSplits,
    config: TrainConfig,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> Baseline:
    """Return the baseline for (spec, data, config), training it only if it is not cached.

    An interrupted training of the same baseline resumes from its resume file (see the module docstring).

    Args:
        spec: Model to train.
        data: Dataset splits.
        config: Training hyper-parameters (epochs, seed, ...).
        cache_dir: Cache root (default :func:`cache_root`).
        device: Where to train (the cache does not depend on it; the model returned is on the CPU).
    """
    path = baseline_path(spec, data, config, cache_dir)
    with _training_lock(path):
        if path.is_file():
            model, info = load_checkpoint(path)
            logger.info("loaded cached baseline %s", path)
            return Baseline(model, info, path, cached=True)
        return _train_and_cache(spec, data, config, path, device)


@contextlib.contextmanager
def _training_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``PATH.lock`` while a baseline is looked up and trained.

    Two processes that need the same baseline at once (two searches, or the trials of a comparison)
    train it once: the second waits for the first and then loads its checkpoint. The kernel releases
    the lock however its holder ends, so a crashed training never blocks the next one.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another process that is training the baseline %s", path.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _train_and_cache(
    spec: ModelSpec, data: DataSplits, config: TrainConfig, path: Path, device: str | torch.device
) -> Baseline:
    """Train the baseline of (spec, data, config) and save it atomically at ``path``."""
    seed_everything(config.seed)
    model = build_model(spec).to(device)
    resume = resume_path(path)
    result = train(model, data, config, description=f"train {spec.name}", checkpoint=resume)
    test_acc = evaluate_accuracy(result.model, data.test)
    result.model.cpu()
    info = CheckpointInfo(
        spec=spec,
        input_shape=data.input_shape(1),
        meta={
            "dataset": data.name,
            "train": config.to_dict(),
            "val_accuracy": result.val_accuracy,
            "test_accuracy": test_acc,
            "history": result.history,
        },
    )
    save_checkpoint(path, result.model, info)
    resume.unlink(missing_ok=True)
    return Baseline(result.model, info, path, cached=False)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a checkpoint file atomically."""
    from automl_prune.io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device
