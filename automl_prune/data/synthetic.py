"""Random tensors with the shapes of a small image dataset, for shape and smoke tests only."""

from __future__ import annotations

import logging
import os

import torch

from automl_prune.data._base import DATASETS, DataSplits, TensorData
from automl_prune.seeding import derive_seed, torch_generator

logger = logging.getLogger(__name__)

NAME = "synthetic"
TRAIN_SIZE = 512
DEFAULT_VAL_SIZE = 128
TEST_SIZE = 128
NUM_CLASSES = 10
IN_CHANNELS = 1
DEFAULT_IMAGE_SIZE = 28
SIGNAL = 0.5
"""Strength of the per-class pattern added to the noise, so a model can fit the data a little."""


def _make(n: int, size: int, patterns: torch.Tensor, seed: int, split: str) -> TensorData:
    gen = torch_generator(derive_seed(seed, NAME, split))
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    images = torch.randn(n, IN_CHANNELS, size, size, generator=gen) + SIGNAL * patterns[labels]
    return TensorData(images, labels)


@DATASETS.register(NAME)
def load_synthetic(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataSplits:
    """Random 1x28x28 tensors, 10 classes, 512/128/128 (shape tests only; never for claiming accuracy)."""
    if data_dir is not None:
        logger.debug("synthetic data is generated; ignoring data_dir '%s'", data_dir)
    size = image_size or DEFAULT_IMAGE_SIZE
    patterns = torch.randn(
        NUM_CLASSES, IN_CHANNELS, size, size, generator=torch_generator(derive_seed(seed, NAME, "patterns"))
    )
    n_val = DEFAULT_VAL_SIZE if val_size is None else val_size
    return DataSplits(
        NAME,
        _make(TRAIN_SIZE, size, patterns, seed, "train"),
        _make(n_val, size, patterns, seed, "search_val"),
        _make(TEST_SIZE, size, patterns, seed, "test"),
        num_classes=NUM_CLASSES,
        in_channels=IN_CHANNELS,
        image_size=size,
        class_names=tuple(f"class{i}" for i in range(NUM_CLASSES)),
        mean=(0.0,),
        std=(1.0,),
    )
