"""In-memory datasets: :class:`TensorData`, :class:`DataSplits` and shared helpers.

Every dataset is loaded once into normalised float32 tensors; batching is plain tensor
slicing/indexing (no ``DataLoader``), which is the fastest option for the small image
datasets this tool searches on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from automl_prune.errors import DataNotFoundError, InvalidValueError
from automl_prune.registry import Registry
from automl_prune.seeding import derive_seed, torch_generator

logger = logging.getLogger(__name__)

DEFAULT_VAL_SIZE = 5000
"""Default size of the search-validation split (capped at 10% of a small train set)."""

DEFAULT_VAL_FRACTION = 0.1
"""Largest fraction of the train set the *default* search-validation split takes."""


@dataclass
class TensorData:
    """A labelled image set held in memory.

    Attributes:
        images: float32 tensor ``N x C x H x W``, already normalised.
        labels: int64 tensor ``N``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise InvalidValueError(f"images must be N x C x H x W, got shape {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise InvalidValueError(
                f"labels must be a vector of {self.images.shape[0]} entries, got shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int | None = None, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over ``(images, labels)`` batches, each sample once per pass.

        Args:
            batch_size: Samples per batch (the last batch may be smaller).
            shuffle: Visit the samples in a seeded random order.
            seed: Seed of the shuffle order; ``None`` means 0. Pass a different seed per
                epoch (e.g. ``derive_seed(seed, epoch)``) to get a new order each epoch.
            drop_last: Skip the last batch when it is smaller than ``batch_size``.

        Yields:
            ``(images, labels)`` pairs; views of the data when not shuffled.

        Raises:
            InvalidValueError: ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        end = n - n % batch_size if drop_last else n
        if not shuffle:
            for start in range(0, end, batch_size):
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]
            return
        order = torch.randperm(n, generator=torch_generator(0 if seed is None else seed))
        if self.images.device.type != "cpu":
            order = order.to(self.images.device)
        for start in range(0, end, batch_size):
            idx = order[start : start + batch_size]
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def subset(self, n: int, seed: int = 0) -> TensorData:
        """The first ``n`` samples of a seeded permutation (``self`` when ``n >= len(self)``).

        Args:
            n: Number of samples to keep.
            seed: Seed of the permutation.

        Raises:
            InvalidValueError: ``n`` is negative.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidValueError(f"subset size must be a non-negative integer, got {n!r}")
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch_generator(seed))[:n]
        return self.take(idx)

    def take(self, indices: torch.Tensor) -> TensorData:
        """A new set holding the samples at ``indices`` (int64, on CPU or the data's device)."""
        indices = indices.to(self.images.device)
        return TensorData(self.images.index_select(0, indices), self.labels.index_select(0, indices))

    def to(self, device: torch.device | str) -> TensorData:
        """Move to ``device``: a new set, or ``self`` when already there."""
        if self.images.device == torch.device(device):
            return self
        return TensorData(self.images.to(device), self.labels.to(device))


@dataclass
class DataSplits:
    """The three splits of a dataset plus its shape.

    Attributes:
        name: Registry name of the dataset.
        train: Training split.
        search_val: Held out of the training data; used to score candidates during search.
        test: Final evaluation split, never seen by the search.
        num_classes: Number of classes.
        in_channels: Image channels.
        image_size: Height = width of the images.
        class_names: Class names in label order (may be empty).
        mean: Per-channel mean used for normalisation (of images scaled to ``[0, 1]``).
        std: Per-channel standard deviation used for normalisation.
    """

    name: str
    train: TensorData
    search_val: TensorData
    test: TensorData
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def input_shape(self, batch_size: int = 1) -> tuple[int, int, int, int]:
        """Model input shape ``(batch_size, C, H, W)``."""
        return (batch_size, self.in_channels, self.image_size, self.image_size)

    def summary(self) -> str:
        """One line: name, shape and split sizes."""
        return (
            f"{self.name}: {self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes, "
            f"train {len(self.train)}, search_val {len(self.search_val)}, test {len(self.test)}"
        )


Loader = Callable[..., DataSplits]
"""A dataset loader: ``loader(data_dir, *, val_size, seed, image_size) -> DataSplits``."""

DATASETS: Registry[Loader] = Registry("dataset")


# ----------------------------------------------------------------------------------- helpers


def check_data_dir(data_dir: str | os.PathLike[str], dataset: str) -> Path:
    """Return ``data_dir`` as a Path after checking it is a readable directory.

    Raises:
        DataNotFoundError: Naming the directory when it is missing, not a directory or unreadable.
    """
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataNotFoundError(
            f"data directory '{path}' for dataset '{dataset}' does not exist; check the path passed as --data.data_dir."
        )
    if not path.is_dir():
        raise DataNotFoundError(
            f"data directory '{path}' for dataset '{dataset}' is not a directory; pass the folder holding the data."
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataNotFoundError(
            f"data directory '{path}' for dataset '{dataset}' is not readable; fix its permissions or copy the data."
        )
    return path


def resolve_val_size(val_size: int | None, n_train: int, dataset: str) -> int:
    """The search-validation size: ``val_size``, or the default for a train set of ``n_train``.

    The default is ``min(5000, 10% of n_train)`` so that small train sets keep 90% for training.

    Raises:
        InvalidValueError: ``val_size`` leaves no training data.
    """
    if val_size is None:
        return min(DEFAULT_VAL_SIZE, int(n_train * DEFAULT_VAL_FRACTION))
    if val_size >= n_train:
        raise InvalidValueError(
            f"val_size {val_size} leaves no training data: dataset '{dataset}' has {n_train} training images; "
            f"pass a val_size below {n_train}."
        )
    return val_size


def split_indices(n: int, sizes: Sequence[int], seed: int, *keys: object) -> list[torch.Tensor]:
    """Split ``range(n)`` by a seeded permutation into parts of ``sizes`` plus the rest.

    Args:
        n: Number of samples.
        sizes: Sizes of the leading parts.
        seed: Root seed; the permutation uses ``derive_seed(seed, *keys)``.
        *keys: Keys that make this split independent of other uses of ``seed``.

    Returns:
        ``len(sizes) + 1`` sorted int64 index tensors; the last holds the remaining samples.
    """
    perm = torch.randperm(n, generator=torch_generator(derive_seed(seed, "split", *keys)))
    part_of = torch.full((n,), len(sizes), dtype=torch.int64)
    start = 0
    for k, size in enumerate(sizes):
        part_of[perm[start : start + size]] = k
        start += size
    return [torch.nonzero(part_of == k).flatten() for k in range(len(sizes) + 1)]  # sorted, O(n)


def hold_out(data: TensorData, val_size: int, seed: int, dataset: str) -> tuple[TensorData, TensorData]:
    """Split ``data`` into ``(train, search_val)`` with ``val_size`` seeded samples held out."""
    val_idx, train_idx = split_indices(len(data), [val_size], seed, dataset, "search_val")
    return data.take(train_idx), data.take(val_idx)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly resize float ``N x C x H x W`` images to ``size x size`` (no-op when equal)."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < images.shape[-1] or size < images.shape[-2]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


def normalise_(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise float ``N x C x H x W`` images in place per channel and return them."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(m).div_(s)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of float ``N x C x H x W`` images."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    mean = flat.mean(dim=1)
    std = flat.std(dim=1).clamp_min(1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in ``[0, 1]``."""
    return images.to(torch.float32).div_(255.0)
