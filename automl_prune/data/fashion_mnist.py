"""Fashion-MNIST from the four standard IDX files.

Directory search order: the ``data_dir`` argument (or its ``fashion-mnist`` subfolder) alone when given,
otherwise
``$AUTOML_PRUNE_FASHION_MNIST``, ``$AUTOML_PRUNE_DATA/fashion-mnist``, then
``/usr/share/datasets/fashion-mnist`` where the Debian package ``dataset-fashion-mnist``
installs the files. Each file may be gzipped (``.gz``) or not.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from automl_prune.data._base import (
    DATASETS,
    DataSplits,
    TensorData,
    check_data_dir,
    normalise_,
    resize_images,
    resolve_val_size,
    split_indices,
    uint8_to_float,
)
from automl_prune.data.idx import read_idx
from automl_prune.errors import DataNotFoundError

logger = logging.getLogger(__name__)

NAME = "fashion-mnist"
ENV_DIR = "AUTOML_PRUNE_FASHION_MNIST"
ENV_DATA_ROOT = "AUTOML_PRUNE_DATA"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN = (0.2860,)
STD = (0.3530,)
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DOWNLOAD_URL = "https://github.com/zalandoresearch/fashion-mnist"

_raw_cache: dict[tuple[object, ...], tuple[torch.Tensor, ...]] = {}


def _search_dirs(data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Candidate directories in search order, each with where it came from."""
    if data_dir is not None:  # an explicit directory is authoritative: never silently replaced
        base = Path(data_dir).expanduser()
        return [(base, "data_dir"), (base / NAME, "data_dir")]
    dirs: list[tuple[Path, str]] = []
    if os.environ.get(ENV_DIR):
        dirs.append((Path(os.environ[ENV_DIR]).expanduser(), f"${ENV_DIR}"))
    if os.environ.get(ENV_DATA_ROOT):
        dirs.append((Path(os.environ[ENV_DATA_ROOT]).expanduser() / NAME, f"${ENV_DATA_ROOT}/{NAME}"))
    dirs.append((DEBIAN_DIR, "Debian package dataset-fashion-mnist"))
    return dirs


def default_fashion_mnist_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories searched for the Fashion-MNIST files, in order.

    Args:
        data_dir: An explicit directory searched first (with its ``fashion-mnist`` subfolder).

    Returns:
        ``data_dir`` (if given), ``$AUTOML_PRUNE_FASHION_MNIST``, ``$AUTOML_PRUNE_DATA/fashion-mnist``
        (each if set) and ``/usr/share/datasets/fashion-mnist``.
    """
    return [path for path, _ in _search_dirs(data_dir)]


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def find_files(dirs: Iterable[tuple[Path, str]]) -> tuple[dict[str, Path] | None, list[str]]:
    """The first directory holding all four files, and a note per directory looked in.

    Returns:
        ``(files, notes)``: ``files`` maps the keys of :data:`FILES` to paths (None when no
        directory has them all); ``notes`` says for each place why it did not qualify.
    """
    notes: list[str] = []
    for directory, source in dirs:
        if not directory.is_dir():
            notes.append(f"{directory} ({source}; no such directory)")
            continue
        found = {key: _find_file(directory, stem) for key, stem in FILES.items()}
        missing = [FILES[key] for key, path in found.items() if path is None]
        if not missing:
            return {key: path for key, path in found.items() if path is not None}, notes
        notes.append(f"{directory} ({source}; missing {', '.join(missing)})")
    return None, notes


def _not_found(notes: list[str]) -> DataNotFoundError:
    return DataNotFoundError(
        "Fashion-MNIST files not found: need train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz). Looked in: "
        + "; ".join(notes)
        + ". To get them, run 'apt-get install -y dataset-fashion-mnist' (installs them into "
        f"{DEBIAN_DIR}), or download the four files from {DOWNLOAD_URL} into a directory and pass it "
        f"with --data.data_dir (or set ${ENV_DIR})."
    )


def _read_raw(files: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images and int64 labels of both sets, cached per file identity."""
    key = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in files.values())
    if key in _raw_cache:
        return _raw_cache[key]  # type: ignore[return-value]
    arrays = {name: read_idx(path) for name, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_path, lbl_path = files[f"{split}_images"], files[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataNotFoundError(
                f"'{img_path}' holds a {images.dtype} array of shape {images.shape}, not N x H x W uint8 images; "
                "it is not a Fashion-MNIST image file. Replace it with the original file."
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataNotFoundError(
                f"'{lbl_path}' holds {labels.shape} labels for {images.shape[0]} images in '{img_path}'; "
                "the files do not belong together. Replace them with the original files."
            )
        if labels.size and int(labels.max()) >= len(CLASS_NAMES):
            raise DataNotFoundError(
                f"'{lbl_path}' has label {int(labels.max())}, outside 0..9; it is not a Fashion-MNIST label file."
            )
    result = (
        torch.from_numpy(arrays["train_images"]),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"]),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    _raw_cache.clear()  # keep one copy (about 55 MB)
    _raw_cache[key] = result
    return result


def _to_float(images: torch.Tensor, image_size: int) -> torch.Tensor:
    out = uint8_to_float(images.unsqueeze(1))
    return normalise_(resize_images(out, image_size), MEAN, STD)


@DATASETS.register(NAME)
def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataSplits:
    """Fashion-MNIST: 28x28 grayscale clothing, 10 classes, 60k train / 10k test (IDX files)."""
    start = time.perf_counter()
    if data_dir is not None:
        check_data_dir(data_dir, NAME)
    dirs = _search_dirs(data_dir)
    files, notes = find_files(dirs)
    if files is None:
        raise _not_found(notes)
    train_u8, train_labels, test_u8, test_labels = _read_raw(files)
    height, width = train_u8.shape[1:]
    if height != width or tuple(test_u8.shape[1:]) != (height, width):
        raise DataNotFoundError(
            f"Fashion-MNIST images in '{files['train_images'].parent}' are {height}x{width} (train) and "
            f"{tuple(test_u8.shape[1:])} (test), not square images of one size; replace them with the original files."
        )
    size = image_size or height
    n_val = resolve_val_size(val_size, len(train_labels), NAME)
    val_idx, train_idx = split_indices(len(train_labels), [n_val], seed, NAME, "search_val")
    train = TensorData(_to_float(train_u8[train_idx], size), train_labels[train_idx])
    search_val = TensorData(_to_float(train_u8[val_idx], size), train_labels[val_idx])
    test = TensorData(_to_float(test_u8, size), test_labels.clone())  # never hand out the cached tensor
    logger.info("loaded Fashion-MNIST from %s in %.2f s", files["train_images"].parent, time.perf_counter() - start)
    return DataSplits(
        NAME,
        train,
        search_val,
        test,
        num_classes=len(CLASS_NAMES),
        in_channels=1,
        image_size=size,
        class_names=CLASS_NAMES,
        mean=MEAN,
        std=STD,
    )
