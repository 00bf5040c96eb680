"""How training and scoring compute: mixed precision on CUDA, the channels_last layout on the CPU.

Mixed precision: bfloat16 autocast for forward passes on CUDA, nothing on the CPU. Weights,
optimizer state and BatchNorm statistics stay in float32 (autocast keeps normalisation and
losses in float32); bfloat16 has float32's exponent range, so no loss scaling is needed. It is
on by default on CUDA; the config key ``amp: false`` turns it off by setting
``AUTOML_PRUNE_AMP=0``, which Ray workers and Tune trials started afterwards inherit.

Layout: on the CPU, oneDNN's convolutions run faster on channels_last tensors (measured here
on 2 threads: fashion_cnn scoring x1.9 and training x1.2, mobilenetv2 x1.8 and x1.6, resnet20
x1.2 and x1.0), so the loops that train and score models (:func:`fast_layout`) run them in it
and hand them back in the usual contiguous layout, which is what checkpoints, Torch-Pruning
and the exporters see.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

ENV = "AUTOML_PRUNE_AMP"


def set_mixed_precision(enabled: bool) -> None:
    """Turn autocast on CUDA on or off for this process and the workers it starts."""
    os.environ[ENV] = "1" if enabled else "0"


def autocast(device: torch.device | str) -> Any:
    """A context for forward passes on ``device``: bfloat16 autocast on CUDA (unless turned off), else a no-op."""
    if torch.device(device).type == "cuda" and os.environ.get(ENV, "1") != "0":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def _in_channels_last(weight: torch.Tensor) -> bool:
    """Whether ``weight`` has channels_last strides (also a weight with one input channel, or 1x1 kernels)."""
    channels_last = torch.empty_like(weight, memory_format=torch.channels_last).stride()
    contiguous = torch.empty_like(weight, memory_format=torch.contiguous_format).stride()
    return weight.stride() == channels_last and channels_last != contiguous


@contextlib.contextmanager
def fast_layout(*models: nn.Module | None) -> Iterator[None]:
    """Run ``models`` in the layout their convolutions are fastest in here, then restore the usual one.

    On the CPU the convolution weights are converted to channels_last for the duration (the
    same ``Parameter`` objects: an optimizer built before or after keeps working, and the
    activations follow the weights' layout), and back to contiguous on exit. A model already in
    channels_last (an enclosing ``fast_layout``), on another device, TorchScript, or without
    convolutions is left as it is. Convert outside ``torch.inference_mode``: parameters
    converted inside it could not be trained afterwards.

    Args:
        models: Models to convert (``None`` entries are skipped).
    """
    converted = []
    for model in models:
        if model is None or isinstance(model, torch.jit.ScriptModule):
            continue
        weights = _conv_weights(model)
        if not weights or weights[0].device.type != "cpu" or any(_in_channels_last(w) for w in weights):
            continue
        model.to(memory_format=torch.channels_last)
        converted.append(model)
    try:
        yield
    finally:
        for model in converted:
            model.to(memory_format=torch.contiguous_format)
