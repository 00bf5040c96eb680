"""Any class-per-folder image tree, read through torchvision's ``ImageFolder``.

Layouts:

- ``DIR/train/CLASS/*.png`` plus ``DIR/test/CLASS/...`` (or ``DIR/val/CLASS/...`` when there is
  no ``test/``): the given train and test sets;
- ``DIR/CLASS/*.png``: one tree, split by seed into 80% train and 20% test.

The search-validation split is always held out of the training set (default 5000 images,
at most 10% of it). Images are resized to ``image_size`` x ``image_size`` (default 32) and
kept in memory. They load as grayscale (1 channel) when every image is grayscale, else as
RGB (3 channels). Mean and standard deviation are computed from the training split.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from automl_prune._compat import import_torchvision
from automl_prune.data._base import (
    DATASETS,
    DataSplits,
    TensorData,
    channel_stats,
    check_data_dir,
    normalise_,
    resolve_val_size,
    split_indices,
    uint8_to_float,
)
from automl_prune.errors import DataNotFoundError

logger = logging.getLogger(__name__)

NAME = "imagefolder"
DEFAULT_IMAGE_SIZE = 32
TEST_FRACTION = 0.2
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _load_image(path: str, size: int) -> torch.Tensor:
    """One image as a uint8 ``C x size x size`` tensor (C = 1 for grayscale files, else 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataNotFoundError(
            f"cannot read image '{path}' ({exc}); remove the file or replace it with a valid image."
        ) from exc
    tensor = torch.from_numpy(arr.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _read_tree(root: Path, size: int) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """Images (uint8, mixed channels), labels and class names of one class-per-folder tree."""
    tv = import_torchvision()
    try:
        ds = tv.datasets.ImageFolder(str(root), loader=partial(_load_image, size=size))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataNotFoundError(
            f"no images found in '{root}' ({exc}); imagefolder needs one subfolder per class holding image "
            "files (DIR/CLASS/x.png), optionally under DIR/train and DIR/test."
        ) from exc
    images = [ds[i][0] for i in range(len(ds))]
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    return images, labels, list(ds.classes)


def _stack(images: list[torch.Tensor], channels: int) -> torch.Tensor:
    if channels == 3:
        images = [img.expand(3, -1, -1) if img.shape[0] == 1 else img for img in images]
    return torch.stack(images)


def _remap(labels: torch.Tensor, classes: list[str], train_classes: list[str], root: Path) -> torch.Tensor:
    """Labels of a test tree re-expressed in the train tree's class indices."""
    unknown = sorted(set(classes) - set(train_classes))
    if unknown:
        raise DataNotFoundError(
            f"'{root}' has classes {', '.join(unknown)} that the training folder lacks; the train and test "
            "folders must use the same class subfolder names."
        )
    mapping = torch.tensor([train_classes.index(name) for name in classes], dtype=torch.int64)
    return mapping[labels]


@DATASETS.register(NAME)
def load_imagefolder(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataSplits:
    """Any class-per-folder image tree in --data.data_dir (train/ + test/ or one tree split 80/20), resized to 32."""
    if data_dir is None:
        raise DataNotFoundError(
            "dataset 'imagefolder' needs a directory: pass --data.data_dir DIR where DIR holds one subfolder per "
            "class (DIR/CLASS/x.png), or DIR/train/CLASS/... and DIR/test/CLASS/..."
        )
    root = check_data_dir(data_dir, NAME)
    size = image_size or DEFAULT_IMAGE_SIZE
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train_imgs, train_labels, classes = _read_tree(root / "train", size)
        test_imgs, test_labels, test_classes = _read_tree(test_dir, size)
        test_labels = _remap(test_labels, test_classes, classes, test_dir)
        source = f"{root / 'train'} and {test_dir}"
    else:
        images, labels, classes = _read_tree(root, size)
        n_test = max(1, round(len(labels) * TEST_FRACTION))
        if len(labels) - n_test < 2:
            raise DataNotFoundError(
                f"'{root}' has only {len(labels)} images; imagefolder needs at least 3 to make train and test splits."
            )
        test_idx, train_idx = split_indices(len(labels), [n_test], seed, NAME, "test")
        train_imgs, train_labels = [images[i] for i in train_idx.tolist()], labels[train_idx]
        test_imgs, test_labels = [images[i] for i in test_idx.tolist()], labels[test_idx]
        source = str(root)
    channels = 3 if any(img.shape[0] == 3 for img in train_imgs + test_imgs) else 1
    n_val = resolve_val_size(val_size, len(train_labels), NAME)
    val_idx, train_idx = split_indices(len(train_labels), [n_val], seed, NAME, "search_val")
    train_all = uint8_to_float(_stack(train_imgs, channels))
    test_x = uint8_to_float(_stack(test_imgs, channels))
    mean, std = channel_stats(train_all[train_idx])
    normalise_(train_all, mean, std)
    normalise_(test_x, mean, std)
    logger.info("loaded imagefolder from %s: %d classes, %d channels", source, len(classes), channels)
    return DataSplits(
        NAME,
        TensorData(train_all[train_idx], train_labels[train_idx]),
        TensorData(train_all[val_idx], train_labels[val_idx]),
        TensorData(test_x, test_labels),
        num_classes=len(classes),
        in_channels=channels,
        image_size=size,
        class_names=tuple(classes),
        mean=mean,
        std=std,
    )
