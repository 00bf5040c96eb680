"""CIFAR-10 from the standard python-pickle batches, read through torchvision.

``data_dir`` is either the directory containing ``cifar-10-batches-py`` or that folder
itself; without ``data_dir``, ``$AUTOML_PRUNE_DATA`` and ``$AUTOML_PRUNE_DATA/cifar10`` are
searched. torchvision's md5 checks are replaced by presence checks so that subsets and
test fixtures in the same format load too.

The default search-validation split is 5000 images, but at most 10% of the training set
(so a small CIFAR-format set keeps 90% of its images for training).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automl_prune._compat import import_torchvision
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
from automl_prune.errors import DataNotFoundError

logger = logging.getLogger(__name__)

NAME = "cifar10"
BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ENV_DATA_ROOT = "AUTOML_PRUNE_DATA"


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


SAFE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)
"""The only globals a CIFAR batch pickle needs (numpy arrays, Python 2 byte strings)."""


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists and strings"
        )


def _read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys (Python 2 and 3 pickles alike), read without running code."""
    with open(path, "rb") as f:
        entry = _DataOnlyUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"'{path.name}' holds a {type(entry).__name__}, not a dict")
    return {_text(k): v for k, v in entry.items()}


@cache
def cifar10_class() -> type[Any]:
    """torchvision's ``CIFAR10`` with presence checks instead of md5 checks (built on first use)."""
    tv = import_torchvision()

    class PresenceCheckedCIFAR10(tv.datasets.CIFAR10):  # type: ignore[misc, name-defined]
        """``torchvision.datasets.CIFAR10`` that accepts any files in the standard format.

        Integrity is checked by presence (md5 sums only match the official files) and the
        batches may be Python 2 pickles (``str`` keys under ``latin1``) or Python 3 ones
        (``bytes`` keys such as ``b"data"``).
        """

        def __init__(
            self,
            root: str,
            train: bool = True,
            transform: Callable[..., Any] | None = None,
            target_transform: Callable[..., Any] | None = None,
            download: bool = False,
        ) -> None:
            tv.datasets.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
            self.train = train
            if download:
                self.download()
            if not self._check_integrity():
                raise DataNotFoundError(f"CIFAR-10 batches missing under '{Path(root) / self.base_folder}'")
            files = self.train_list if train else self.test_list
            data: list[np.ndarray] = []
            self.targets: list[int] = []
            for file_name, _ in files:
                entry = _read_pickle(Path(self.root) / self.base_folder / file_name)
                data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3072))
                self.targets.extend(int(v) for v in entry.get("labels", entry.get("fine_labels", [])))
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision
            self._load_meta()

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if path.is_file():
                self.classes = [_text(name) for name in _read_pickle(path)[self.meta["key"]]]
            else:
                self.classes = [str(i) for i in range(10)]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return PresenceCheckedCIFAR10


def _candidate_roots(data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Directories that may contain ``cifar-10-batches-py``, with where they came from."""
    if data_dir is not None:
        base = check_data_dir(data_dir, NAME)
        roots = [(base.parent, "data_dir")] if base.name == BASE_FOLDER else []
        return roots + [(base, "data_dir"), (base / NAME, "data_dir")]
    if os.environ.get(ENV_DATA_ROOT):
        root = Path(os.environ[ENV_DATA_ROOT]).expanduser()
        return [(root, f"${ENV_DATA_ROOT}"), (root / NAME, f"${ENV_DATA_ROOT}/{NAME}")]
    return []


def find_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """The directory containing a complete ``cifar-10-batches-py`` folder.

    Raises:
        DataNotFoundError: Listing each place looked and how to get the data.
    """
    notes: list[str] = []
    for root, source in _candidate_roots(data_dir):
        folder = root / BASE_FOLDER
        if not folder.is_dir():
            notes.append(f"{folder} ({source}; no such directory)")
            continue
        missing = [name for name in TRAIN_FILES + TEST_FILES if not (folder / name).is_file()]
        if not missing:
            return root
        notes.append(f"{folder} ({source}; missing {', '.join(missing)})")
    looked = "; ".join(notes) if notes else f"nowhere (no --data.data_dir given and ${ENV_DATA_ROOT} is not set)"
    raise DataNotFoundError(
        f"CIFAR-10 files not found: need {BASE_FOLDER}/ with {', '.join(TRAIN_FILES)} and {TEST_FILES[0]} "
        f"(python version). Looked in: {looked}. To get them, download {DOWNLOAD_URL}, extract it with "
        "'tar xzf cifar-10-python.tar.gz' into a directory, and pass that directory with --data.data_dir."
    )


def _read(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 ``N x 3 x 32 x 32`` images, int64 labels and class names of one set."""
    try:
        ds = cifar10_class()(str(root), train=train, download=False)
        data = np.asarray(ds.data, dtype=np.uint8)
        targets = np.asarray(ds.targets, dtype=np.int64)
    except DataNotFoundError:
        raise
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        files = TRAIN_FILES if train else TEST_FILES
        raise DataNotFoundError(
            f"cannot read CIFAR-10 {'training' if train else 'test'} batches {', '.join(files)} in "
            f"'{root / BASE_FOLDER}' ({type(exc).__name__}: {exc}); the files are not CIFAR-10 python pickles or "
            f"are corrupt. Download {DOWNLOAD_URL} again and extract it."
        ) from exc
    if len(targets) != len(data):
        raise DataNotFoundError(
            f"CIFAR-10 batches in '{root / BASE_FOLDER}' have {len(data)} images but {len(targets)} labels; "
            f"the files are corrupt. Download {DOWNLOAD_URL} again and extract it."
        )
    images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(targets), list(ds.classes)


def _to_float(images: torch.Tensor, image_size: int) -> torch.Tensor:
    return normalise_(resize_images(uint8_to_float(images), image_size), MEAN, STD)


@DATASETS.register(NAME)
def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> DataSplits:
    """CIFAR-10: 32x32 RGB, 10 classes, 50k train / 10k test (python batches in --data.data_dir)."""
    root = find_root(data_dir)
    size = image_size or 32
    train_u8, train_labels, class_names = _read(root, train=True)
    test_u8, test_labels, _ = _read(root, train=False)
    for labels in (train_labels, test_labels):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise DataNotFoundError(
                f"CIFAR-10 batches in '{root / BASE_FOLDER}' have labels outside 0..{len(class_names) - 1}; "
                f"they are not CIFAR-10 files. Download {DOWNLOAD_URL} again and extract it."
            )
    n_val = resolve_val_size(val_size, len(train_labels), NAME)
    val_idx, train_idx = split_indices(len(train_labels), [n_val], seed, NAME, "search_val")
    train = TensorData(_to_float(train_u8[train_idx], size), train_labels[train_idx])
    search_val = TensorData(_to_float(train_u8[val_idx], size), train_labels[val_idx])
    logger.info("loaded CIFAR-10 from %s", root / BASE_FOLDER)
    return DataSplits(
        NAME,
        train,
        search_val,
        TensorData(_to_float(test_u8, size), test_labels),
        num_classes=len(class_names),
        in_channels=3,
        image_size=size,
        class_names=tuple(class_names),
        mean=MEAN,
        std=STD,
    )
