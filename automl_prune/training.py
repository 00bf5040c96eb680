"""Training and fine-tuning loop: SGD with momentum and a cosine learning-rate schedule.

The same loop trains baselines (``automl-prune train``) and fine-tunes pruned models
(``automl-prune finetune``). Epochs may be fractional (``0.25`` = a quarter of the train set).
Optionally adds the network-slimming L1 penalty on BatchNorm scales.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from automl_prune.data import DataSplits
from automl_prune.errors import InvalidValueError
from automl_prune.measure.accuracy import evaluate_accuracy
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


def train(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    *,
    description: str = "train",
    on_epoch_end: Callable[[int, nn.Module, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data.train``; return the best weights on ``data.search_val``.

    Args:
        model: Model to train (modified in place; the best weights are loaded at the end).
        data: Dataset splits; ``search_val`` picks the best epoch, ``test`` is not touched.
        config: Hyper-parameters.
        description: Progress bar label.
        on_epoch_end: Called with (epoch index, model, val accuracy) after each evaluated epoch.

    Returns:
        The trained model and its history.
    """
    seed_everything(config.seed)
    device = next(model.parameters()).device
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
    step = 0
    epoch = 0
    bar = tqdm(total=total_steps, desc=description, unit="step", disable=None, leave=False)
    try:
        while step < total_steps:
            model.train()
            running, seen = 0.0, 0
            batches = data.train.batches(
                config.batch_size,
                shuffle=True,
                seed=derive_seed(config.seed, "epoch", epoch),
                drop_last=n_train >= config.batch_size,
            )
            for x, y in batches:
                if step >= total_steps:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = loss_fn(model(x), y)
                if config.bn_l1 > 0:
                    loss = loss + config.bn_l1 * bn_l1_penalty(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                running += loss.item() * len(y)
                seen += len(y)
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{running / max(seen, 1):.3f}")
            epoch += 1
            record = {"epoch": epoch, "step": step, "train_loss": running / max(seen, 1)}
            if config.eval_every_epoch or step >= total_steps:
                acc = evaluate_accuracy(model, data.search_val)
                record["val_accuracy"] = acc
                if acc > best_acc:
                    best_acc, best_state = acc, copy.deepcopy(model.state_dict())
                if on_epoch_end is not None:
                    on_epoch_end(epoch, model, acc)
                logger.info("%s epoch %d: loss %.4f, val acc %.4f", description, epoch, record["train_loss"], acc)
            history.append(record)
    finally:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, val_accuracy=best_acc, history=history, steps=step)
