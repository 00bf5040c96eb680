"""Mixed precision: bfloat16 autocast for forward passes on CUDA, nothing on the CPU.

Weights, optimizer state and BatchNorm statistics stay in float32 (autocast keeps
normalisation and losses in float32); bfloat16 has float32's exponent range, so no loss
scaling is needed. It is on by default on CUDA; the config key ``amp: false`` turns it off by
setting ``AUTOML_PRUNE_AMP=0``, which Ray workers and Tune trials started afterwards inherit.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

ENV = "AUTOML_PRUNE_AMP"


def set_mixed_precision(enabled: bool) -> None:
    """Turn autocast on CUDA on or off for this process and the workers it starts."""
    os.environ[ENV] = "1" if enabled else "0"


def autocast(device: torch.device | str) -> Any:
    """A context for forward passes on ``device``: bfloat16 autocast on CUDA (unless turned off), else a no-op."""
    if torch.device(device).type == "cuda" and os.environ.get(ENV, "1") != "0":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
