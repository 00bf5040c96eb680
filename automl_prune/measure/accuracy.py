"""Accuracy of a classifier on in-memory data (batched, no grad)."""

from __future__ import annotations

import torch
from torch import nn

from automl_prune.data import TensorData
from automl_prune.precision import autocast


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, data: TensorData, batch_size: int = 500, limit: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (the first ``limit`` samples when given).

    The model is put in eval mode for the measurement and restored afterwards.

    Returns:
        Accuracy in [0, 1].
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    try:
        images, labels = data.images, data.labels
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            y = labels[start : start + batch_size].to(device, non_blocking=True)
            with autocast(device):
                logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)
