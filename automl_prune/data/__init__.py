"""Datasets: named loaders that return in-memory, normalised train / search_val / test splits.

Registered datasets (``automl-prune list datasets``):

- ``fashion-mnist``: the four IDX files (``data_dir``, ``$AUTOML_PRUNE_FASHION_MNIST``,
  ``$AUTOML_PRUNE_DATA/fashion-mnist`` or ``/usr/share/datasets/fashion-mnist``);
- ``digits``: scikit-learn's bundled 8x8 digits, upsampled;
- ``cifar10``: the python-pickle batches under ``data_dir``;
- ``imagefolder``: any class-per-folder image tree under ``data_dir``;
- ``synthetic``: random tensors for shape tests (never for accuracy claims).

``search_val`` is always held out of the training data by a seeded permutation; ``test``
is never seen by the search. All randomness derives from ``seed`` through torch generators.
"""

from __future__ import annotations

import logging
import os

from automl_prune.data import cifar, digits, fashion_mnist, imagefolder, synthetic  # noqa: F401  (register)
from automl_prune.data._base import DATASETS, DataSplits, TensorData
from automl_prune.data.fashion_mnist import default_fashion_mnist_dirs
from automl_prune.errors import InvalidValueError, UnknownNameError

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "DataSplits", "TensorData", "default_fashion_mnist_dirs", "list_datasets", "load_dataset"]


def _check_int(value: object, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def canonical_name(name: str) -> str:
    """The registered name for ``name``, accepting any case and ``_`` for ``-`` (``Fashion_MNIST``).

    Raises:
        UnknownNameError: Listing the valid dataset names.
    """
    if name in DATASETS:
        return name
    normalised = name.strip().lower().replace("_", "-")
    if normalised in DATASETS:
        return normalised
    raise UnknownNameError(DATASETS.unknown_message(name))


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataSplits:
    """Load dataset ``name`` into memory as train / search_val / test splits.

    Args:
        name: Registered dataset name (see ``DATASETS.names()``).
        data_dir: Where the dataset's files are (ignored by ``digits`` and ``synthetic``).
        val_size: Size of ``search_val``, held out of the training data; None for the
            dataset's default (5000 for the large sets, at most 10% of the training data).
        seed: Seed of every split and of generated data.
        image_size: Resize images to ``image_size`` x ``image_size``; None keeps the
            dataset's native/default size.

    Returns:
        The normalised splits and the dataset's shape.

    Raises:
        UnknownNameError: ``name`` is not registered.
        InvalidValueError: ``val_size``, ``seed`` or ``image_size`` is out of range.
        DataNotFoundError: The files are missing, unreadable or corrupt.
    """
    loader = DATASETS.get(canonical_name(name))
    if val_size is not None:
        _check_int(val_size, "val_size", 0)
    _check_int(seed, "seed", 0)
    if image_size is not None:
        _check_int(image_size, "image_size", 4)
    splits = loader(data_dir, val_size=val_size, seed=seed, image_size=image_size)
    logger.info("dataset %s", splits.summary())
    return splits


def list_datasets() -> list[tuple[str, str]]:
    """(name, description) of every registered dataset."""
    return [(n, DATASETS.describe(n)) for n in DATASETS.names()]
