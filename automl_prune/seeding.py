"""The one seeding utility: seeds Python, NumPy and torch, and derives child seeds."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy and torch (CPU and CUDA) with ``seed``.

    Args:
        seed: Non-negative integer seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *keys: object) -> int:
    """Derive an independent, reproducible seed from ``seed`` and any keys.

    Used for per-worker and per-component seeds so that parallel copies differ yet a run
    is reproducible from its root seed.

    Args:
        seed: Root seed.
        *keys: Anything with a stable ``str`` (worker index, component name).

    Returns:
        A seed in ``[0, 2**31)``.
    """
    text = "/".join([str(seed), *map(str, keys)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def torch_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
