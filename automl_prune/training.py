"""Training and fine-tuning loop: SGD with momentum and a cosine learning-rate schedule.

The same loop trains baselines (``automl-prune train``) and fine-tunes pruned models
(``automl-prune finetune``). Epochs may be fractional (``0.25`` = a quarter of the train set).
Optionally adds the network-slimming L1 penalty on BatchNorm scales, and knowledge
distillation from a teacher (the dense model): the loss is
``(1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
(Hinton et al.'s soft targets; :func:`distillation_loss`, :func:`student_loss`).

A long training can keep a resume file (``train(..., checkpoint=PATH)``): everything the loop
needs to go on (weights, optimiser momentum, schedule position, the best weights so far, the
place in the current epoch's seeded batch order and the RNG state), written atomically after
every epoch and every ``checkpoint_seconds``. Started again with the same file, the loop goes on
from there and ends with the weights an uninterrupted run would have reached.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automl_prune.data import DataSplits
from automl_prune.errors import CheckpointError, InvalidValueError
from automl_prune.io import atomic_path
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.precision import autocast
from automl_prune.progress import Progress
from automl_prune.seeding import derive_seed, seed_everything

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training or fine-tuning run.

    Attributes:
        epochs: Passes over the train split; fractional values train on part of an epoch.
        lr: Peak learning rate (SGD, Nesterov momentum 0.9).
        weight_decay: L2 weight decay.
        batch_size: Mini-batch size.
        warmup_fraction: Fraction of steps with a linear warm-up before the cosine decay.
        bn_l1: Network-slimming L1 penalty on BatchNorm scales (0 = off).
        label_smoothing: Cross-entropy label smoothing.
        eval_every_epoch: Evaluate on search-val after every epoch and keep the best weights.
        seed: Seed for initialisation and batch order.
        distill_weight: Weight ``w`` of the distillation term (0 = labels only; needs a teacher).
        distill_temperature: Softmax temperature ``T`` of the distillation term.
    """

    epochs: float = 3.0
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_fraction: float = 0.05
    bn_l1: float = 0.0
    label_smoothing: float = 0.0
    eval_every_epoch: bool = True
    seed: int = 0
    distill_weight: float = 0.0
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", float(self.epochs))  # 3 and 3.0 are one config (and one cache key)
        if not self.epochs > 0:
            raise InvalidValueError(f"epochs must be > 0 (fractions allowed), got {self.epochs}")
        if not self.lr > 0:
            raise InvalidValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise InvalidValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0 or self.bn_l1 < 0:
            raise InvalidValueError("weight_decay and bn_l1 must be >= 0")
        check_distillation(self.distill_weight, self.distill_temperature)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run produced: the model (best weights) and its history."""

    model: nn.Module
    val_accuracy: float
    history: list[dict[str, float]]
    steps: int


def bn_l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over all BatchNorm layers (network slimming's sparsity term)."""
    terms = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def check_distillation(weight: float, temperature: float) -> None:
    """Raise :class:`InvalidValueError` unless ``0 <= weight <= 1`` and ``temperature > 0``."""
    if not 0.0 <= weight <= 1.0:
        raise InvalidValueError(f"distill_weight must be in [0, 1], got {weight}")
    if not temperature > 0:
        raise InvalidValueError(f"distill_temperature must be > 0, got {temperature}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target loss: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    The ``T^2`` factor keeps the gradient's scale independent of the temperature (Hinton et al., 2015).
    """
    t = float(temperature)
    student = F.log_softmax(student_logits / t, dim=1)
    teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


def student_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: nn.Module | None,
    x: torch.Tensor,
    weight: float,
    temperature: float,
    hard: nn.Module | None = None,
) -> torch.Tensor:
    """The training loss of a (pruned) student: cross-entropy, blended with distillation when ``weight > 0``.

    Args:
        logits: The student's outputs on ``x``.
        labels: Hard labels.
        teacher: The teacher (used in eval mode, without gradients); required when ``weight > 0``.
        x: The inputs (the teacher's outputs are computed on them).
        weight: Weight of the distillation term.
        temperature: Its temperature.
        hard: The hard-label loss (default: plain cross-entropy).
    """
    ce = (hard or nn.CrossEntropyLoss())(logits, labels)
    if weight <= 0:
        return ce
    if teacher is None:
        raise InvalidValueError("distillation needs a teacher model (give the dense model, or set distill_weight 0)")
    with torch.no_grad():
        teacher_logits = teacher(x)
    return (1.0 - weight) * ce + weight * distillation_loss(logits, teacher_logits, temperature)


def train(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    *,
    description: str = "train",
    on_epoch_end: Callable[[int, nn.Module, float], None] | None = None,
    teacher: nn.Module | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_seconds: float = 300.0,
) -> TrainResult:
    """Train ``model`` in place on ``data.train``; return the best weights on ``data.search_val``.

    Args:
        model: Model to train (modified in place; the best weights are loaded at the end).
        data: Dataset splits; ``search_val`` picks the best epoch, ``test`` is not touched.
        config: Hyper-parameters.
        description: Progress bar label.
        on_epoch_end: Called with (epoch index, model, val accuracy) after each evaluated epoch.
        teacher: Teacher of the distillation term (``config.distill_weight > 0``); not modified.
        checkpoint: Resume file: when it exists, training goes on from the state it holds (it must
            have been written for the same ``config`` and architecture); the loop rewrites it after
            every epoch but the last and every ``checkpoint_seconds``. The caller removes it once the result is kept.
        checkpoint_seconds: Seconds between two writes of the resume file inside an epoch.

    Returns:
        The trained model and its history.

    Raises:
        CheckpointError: ``checkpoint`` was written by another configuration or model.
    """
    if config.distill_weight > 0 and teacher is None:
        raise InvalidValueError("distill_weight > 0 needs a teacher model (the dense model)")
    seed_everything(config.seed)
    device = next(model.parameters()).device
    if teacher is not None and config.distill_weight > 0:
        on_device = next(teacher.parameters()).device == device
        teacher = (teacher if on_device else copy.deepcopy(teacher).to(device)).eval()
    n_train = len(data.train)
    steps_per_epoch = max(1, n_train // config.batch_size)  # full batches only (drop_last)
    total_steps = max(1, int(round(config.epochs * steps_per_epoch)))
    warmup = int(config.warmup_fraction * total_steps)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    best_acc, best_state = -1.0, None
    history: list[dict[str, float]] = []
    step = epoch = epoch_step = 0
    running, seen = 0.0, 0
    resume = Path(checkpoint) if checkpoint is not None else None
    if resume is not None and resume.is_file():
        state = _load_resume(resume, config, model, optimizer, scheduler)
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        running, seen = state["running"], state["seen"]
        best_acc, best_state, history = state["best_acc"], state["best_state"], state["history"]
        logger.info(
            "%s: resuming at step %d of %d (epoch %d) from %s", description, step, total_steps, epoch + 1, resume
        )

    def save_resume() -> None:
        if resume is None:
            return
        state = {
            "format": RESUME_FORMAT,
            "config": config.to_dict(),
            "step": step,
            "epoch": epoch,
            "epoch_step": epoch_step,
            "running": running,
            "seen": seen,
            "best_acc": best_acc,
            "best_state": best_state,
            "history": history,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        with atomic_path(resume) as tmp:
            torch.save(state, tmp)

    saved_at = time.monotonic()
    bar = Progress(total_steps, description, "step", leave=False, initial=step)
    try:
        while step < total_steps:
            model.train()
            if not epoch_step:  # else a resume inside this epoch: its first epoch_step batches are done
                running, seen = 0.0, 0
            batches = data.train.batches(
                config.batch_size,
                shuffle=True,
                seed=derive_seed(config.seed, "epoch", epoch),
                drop_last=n_train >= config.batch_size,
            )
            for x, y in itertools.islice(batches, epoch_step, None):
                if step >= total_steps:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device):
                    loss = student_loss(
                        model(x), y, teacher, x, config.distill_weight, config.distill_temperature, hard=loss_fn
                    )
                if config.bn_l1 > 0:
                    loss = loss + config.bn_l1 * bn_l1_penalty(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                epoch_step += 1
                running += loss.item() * len(y)
                seen += len(y)
                if resume is not None and time.monotonic() - saved_at >= checkpoint_seconds and step < total_steps:
                    save_resume()
                    saved_at = time.monotonic()
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{running / max(seen, 1):.3f}")
            epoch += 1
            epoch_step = 0
            record = {"epoch": epoch, "step": step, "train_loss": running / max(seen, 1)}
            if config.eval_every_epoch or step >= total_steps:
                acc = evaluate_accuracy(model, data.search_val)
                record["val_accuracy"] = acc
                if acc > best_acc:
                    best_acc, best_state = acc, copy.deepcopy(model.state_dict())
                logger.info("%s epoch %d: loss %.4f, val acc %.4f", description, epoch, record["train_loss"], acc)
            history.append(record)
            if step < total_steps:  # the last state is the result itself, which the caller keeps
                save_resume()
                saved_at = time.monotonic()
            if on_epoch_end is not None and "val_accuracy" in record:
                on_epoch_end(epoch, model, record["val_accuracy"])
    finally:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, val_accuracy=best_acc, history=history, steps=step)


RESUME_FORMAT = 1
"""Version of the resume file's layout (:func:`train`'s ``checkpoint``)."""


def _load_resume(
    path: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Load a resume file into ``model``, ``optimizer``, ``scheduler`` and the RNG; return its counters.

    Raises:
        CheckpointError: The file is unreadable, or was written for another configuration or model.
    """
    from automl_prune.weights import safe_load

    state = safe_load(path, what="training resume file")
    fix = f"delete '{path}' to train from the start"
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"'{path}' is not a training resume file of this version; {fix}")
    if state["config"] != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if state["config"].get(k) != v)
        raise CheckpointError(
            f"training resume file '{path}' was written with other training settings ({', '.join(changed)}); "
            f"train with those settings again, or {fix}"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"training resume file '{path}' holds another model's weights; {fix}") from exc
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state
