"""scikit-learn's bundled 8x8 handwritten digits, upsampled (no download needed).

The digits are read straight from the CSV file scikit-learn ships
(``sklearn/datasets/data/digits.csv.gz``, what ``sklearn.datasets.load_digits`` reads),
which avoids the second-long import of ``sklearn.datasets``; when that file is missing or
has an unexpected shape, ``load_digits`` itself is used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch

from automl_prune.data._base import (
    DATASETS,
    DataSplits,
    TensorData,
    channel_stats,
    normalise_,
    resize_images,
    split_indices,
)
from automl_prune.errors import InvalidValueError

logger = logging.getLogger(__name__)

NAME = "digits"
TEST_SIZE = 360
DEFAULT_VAL_SIZE = 300
DEFAULT_IMAGE_SIZE = 28


N_SAMPLES = 1797


def _read_bundled_csv() -> tuple[np.ndarray, np.ndarray] | None:
    """(images N x 8 x 8 in 0..16, labels) from scikit-learn's data file, or None if unusable."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except (OSError, ValueError) as exc:
        logger.debug("cannot read %s (%s); using sklearn.datasets.load_digits", path, exc)
        return None
    if table.shape != (N_SAMPLES, 65) or table[:, :64].max() > 16 or not np.isin(table[:, 64], np.arange(10)).all():
        logger.debug("unexpected content in %s; using sklearn.datasets.load_digits", path)
        return None
    return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    bundled = _read_bundled_csv()
    if bundled is not None:
        return bundled
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


@DATASETS.register(NAME)
def load_digits(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataSplits:
    """scikit-learn digits: 1797 8x8 grayscale digits upsampled to 28x28, 10 classes (bundled, tiny)."""
    if data_dir is not None:
        logger.debug("digits ships with scikit-learn; ignoring data_dir '%s'", data_dir)
    raw_images, raw_labels = _read_digits()
    images = torch.from_numpy(raw_images / np.float32(16.0)).unsqueeze(1)
    labels = torch.from_numpy(raw_labels)
    n = len(labels)
    n_val = DEFAULT_VAL_SIZE if val_size is None else val_size
    if n_val > n - TEST_SIZE - 1:
        raise InvalidValueError(
            f"val_size {n_val} leaves no training data: digits has {n - TEST_SIZE} images besides the "
            f"{TEST_SIZE} test images; pass a val_size below {n - TEST_SIZE}."
        )
    size = image_size or DEFAULT_IMAGE_SIZE
    images = resize_images(images, size)
    test_idx, val_idx, train_idx = split_indices(n, [TEST_SIZE, n_val], seed, NAME)
    mean, std = channel_stats(images[train_idx])
    images = normalise_(images, mean, std)
    return DataSplits(
        NAME,
        TensorData(images[train_idx], labels[train_idx]),
        TensorData(images[val_idx], labels[val_idx]),
        TensorData(images[test_idx], labels[test_idx]),
        num_classes=10,
        in_channels=1,
        image_size=size,
        class_names=tuple(str(i) for i in range(10)),
        mean=mean,
        std=std,
    )
