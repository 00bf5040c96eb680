"""Tests of the data subpackage: real Fashion-MNIST, IDX files, CIFAR-10 and ImageFolder fixtures."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from automl_prune.data import DATASETS, DataSplits, TensorData, default_fashion_mnist_dirs, load_dataset
from automl_prune.data import fashion_mnist as fm
from automl_prune.data.idx import read_idx, write_idx
from automl_prune.errors import DataNotFoundError, InvalidValueError, UnknownNameError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist is not installed"
)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not depend on the developer's data environment variables."""
    monkeypatch.delenv(fm.ENV_DIR, raising=False)
    monkeypatch.delenv(fm.ENV_DATA_ROOT, raising=False)


def _image_keys(*parts: torch.Tensor) -> torch.Tensor:
    """One float key per image (a fixed random projection), sorted, to compare multisets of images."""
    weights = torch.rand(parts[0][0].numel(), generator=torch.Generator().manual_seed(0))
    return torch.cat([images.flatten(1) @ weights for images in parts]).sort().values


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion() -> DataSplits:
    return load_dataset("fashion-mnist", DEBIAN, seed=0)


@needs_fashion
def test_fashion_mnist_shapes_and_labels(fashion: DataSplits) -> None:
    assert fashion.name == "fashion-mnist"
    assert (fashion.num_classes, fashion.in_channels, fashion.image_size) == (10, 1, 28)
    assert fashion.input_shape(4) == (4, 1, 28, 28)
    assert (len(fashion.train), len(fashion.search_val), len(fashion.test)) == (55000, 5000, 10000)
    for split in (fashion.train, fashion.search_val, fashion.test):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 28, 28)
        assert torch.equal(split.labels.unique(), torch.arange(10))
    assert abs(float(fashion.train.images.mean())) < 0.05
    assert abs(float(fashion.train.images.std()) - 1.0) < 0.05


@needs_fashion
def test_fashion_mnist_splits_partition_the_train_set(fashion: DataSplits) -> None:
    raw = torch.from_numpy(read_idx(DEBIAN / "train-images-idx3-ubyte.gz")).unsqueeze(1)
    full_keys = _image_keys(raw.float().div_(255).sub_(fm.MEAN[0]).div_(fm.STD[0]))
    split_keys = _image_keys(fashion.train.images, fashion.search_val.images)
    assert torch.allclose(split_keys, full_keys, rtol=0, atol=1e-3)  # disjoint and complete


@needs_fashion
def test_fashion_mnist_split_fixed_by_seed(fashion: DataSplits) -> None:
    again = load_dataset("fashion-mnist", seed=0, val_size=5000)
    assert torch.equal(again.search_val.images, fashion.search_val.images)
    assert torch.equal(again.train.labels, fashion.train.labels)
    other = load_dataset("Fashion_MNIST", seed=1)
    assert not torch.equal(other.search_val.labels, fashion.search_val.labels)
    assert torch.equal(other.test.images, fashion.test.images)  # the test set never depends on the seed


def test_default_dirs_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(fm.ENV_DIR, str(tmp_path / "env"))
    monkeypatch.setenv(fm.ENV_DATA_ROOT, str(tmp_path / "root"))
    # an explicit directory is the only place looked: it is never silently replaced
    assert default_fashion_mnist_dirs(tmp_path / "arg") == [tmp_path / "arg", tmp_path / "arg" / "fashion-mnist"]
    assert default_fashion_mnist_dirs() == [tmp_path / "env", tmp_path / "root" / "fashion-mnist", DEBIAN]


# ------------------------------------------------------------------------------------- IDX


@pytest.fixture(scope="module")
def small_idx() -> dict[str, np.ndarray]:
    """40 real (or, without the Debian files, random) images and labels."""
    if (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file():
        with gzip.open(DEBIAN / "t10k-images-idx3-ubyte.gz") as f:
            header, body = f.read(16), f.read(40 * 28 * 28)
        assert header[:4] == b"\x00\x00\x08\x03"
        images = np.frombuffer(body, dtype=np.uint8).reshape(40, 28, 28).copy()
    else:
        images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    return {"images": images, "labels": (np.arange(40) % 10).astype(np.uint8)}


def _write_fashion_dir(directory: Path, small: dict[str, np.ndarray], gz: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", small["images"])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", small["labels"])
    return directory


def test_idx_header_format(tmp_path: Path, small_idx: dict[str, np.ndarray]) -> None:
    path = write_idx(tmp_path / "x-idx3-ubyte", small_idx["images"])
    raw = path.read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert raw[4:16] == (40).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    assert len(raw) == 16 + 40 * 28 * 28
    wide = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 70000
    assert np.array_equal(read_idx(write_idx(tmp_path / "w.gz", wide)), wide)


def test_gzipped_and_plain_idx_load_identically(tmp_path: Path, small_idx: dict[str, np.ndarray]) -> None:
    plain = _write_fashion_dir(tmp_path / "plain", small_idx, gz=False)
    zipped = _write_fashion_dir(tmp_path / "zipped", small_idx, gz=True)
    assert np.array_equal(read_idx(plain / "train-images-idx3-ubyte"), small_idx["images"])
    assert np.array_equal(read_idx(zipped / "train-images-idx3-ubyte.gz"), small_idx["images"])
    a = load_dataset("fashion-mnist", plain, val_size=8, seed=3)
    b = load_dataset("fashion-mnist", zipped, val_size=8, seed=3)
    assert (len(a.train), len(a.search_val), len(a.test)) == (32, 8, 40)
    for x, y in ((a.train, b.train), (a.search_val, b.search_val), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    expected = (torch.from_numpy(small_idx["images"]).float() / 255 - fm.MEAN[0]) / fm.STD[0]
    assert torch.allclose(a.test.images[:, 0], expected, atol=1e-6)
    assert load_dataset("fashion-mnist", plain, val_size=8, image_size=32).input_shape() == (1, 1, 32, 32)


def test_fashion_env_var_searched_before_debian(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_idx: dict[str, np.ndarray]
) -> None:
    monkeypatch.setenv(fm.ENV_DIR, str(_write_fashion_dir(tmp_path / "env", small_idx, gz=True)))
    assert len(load_dataset("fashion-mnist", val_size=4).test) == 40


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-100],  # truncated
        lambda raw: b"\x01\x02" + raw[2:],  # bad magic number
        lambda raw: gzip.compress(raw)[:-20],  # broken gzip stream
        lambda raw: raw + b"\x00",  # trailing garbage
    ],
)
def test_corrupt_idx_names_the_file(tmp_path: Path, small_idx: dict[str, np.ndarray], damage: object) -> None:
    directory = _write_fashion_dir(tmp_path / "bad", small_idx, gz=False)
    target = directory / "train-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))  # type: ignore[operator]
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        read_idx(target)
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", directory, val_size=4)


def test_missing_fashion_files_lists_places(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv(fm.ENV_DIR, str(tmp_path / "from-env"))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    for place in (tmp_path / "from-env", tmp_path / "debian"):
        assert str(place) in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", empty)  # the Debian copy exists, but an explicit dir is authoritative
    assert str(empty / "fashion-mnist") in str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "--data.data_dir" in message
    assert "\n" not in message
    with pytest.raises(DataNotFoundError, match="does-not-exist"):
        load_dataset("fashion-mnist", tmp_path / "does-not-exist")


# ---------------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root: Path, per_batch: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        entry = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [(j + i) % 10 for j in range(per_batch)],
            b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)],
        }
        if name == "test_batch":  # the official (Python 2) files unpickle with str keys; support both
            entry = {key.decode(): value for key, value in entry.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f)
    return folder


def test_cifar10_tiny_directory(tmp_path: Path) -> None:
    from automl_prune.data import cifar

    folder = _write_cifar(tmp_path)
    splits = load_dataset("cifar10", tmp_path, seed=0)
    assert (len(splits.train), len(splits.search_val), len(splits.test)) == (90, 10, 20)  # val capped at 10%
    assert splits.input_shape(2) == (2, 3, 32, 32) and splits.num_classes == 10
    assert splits.class_names[0] == "airplane"
    with open(folder / "test_batch", "rb") as f:
        entry = pickle.load(f)
    expected = torch.from_numpy(entry["data"].reshape(20, 3, 32, 32)).float() / 255
    mean, std = torch.tensor(cifar.MEAN).view(1, 3, 1, 1), torch.tensor(cifar.STD).view(1, 3, 1, 1)
    assert torch.allclose(splits.test.images * std + mean, expected, atol=1e-5)  # CHW layout kept
    assert splits.test.labels.tolist() == entry["labels"]
    same = load_dataset("cifar10", folder, seed=0, val_size=10)  # the batches folder itself works too
    assert torch.equal(same.search_val.images, splits.search_val.images)


def test_cifar10_missing_file(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="test_batch") as info:
        load_dataset("cifar10", tmp_path)
    assert "cifar-10-python.tar.gz" in str(info.value) and str(folder) in str(info.value)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    (folder / "test_batch").write_bytes((folder / "data_batch_1").read_bytes())
    with pytest.raises(DataNotFoundError, match="corrupt"):
        load_dataset("cifar10", tmp_path)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_cifar10_pickles_run_no_code(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    with open(folder / "data_batch_1", "rb") as f:
        entry = pickle.load(f)
    with open(folder / "data_batch_1", "wb") as f:  # Python 2-style protocol still loads
        pickle.dump(entry, f, protocol=2)
    assert len(load_dataset("cifar10", tmp_path).train) == 90
    marker = tmp_path / "pwned"
    entry[b"labels"] = _Payload(marker)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(DataNotFoundError, match="refused to load pathlib.*Path.write_text"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------- ImageFolder


def _write_pngs(root: Path, classes: dict[str, int], mode: str, size: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(len(classes))
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


def test_imagefolder_train_test_tree(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", {"cat": 10, "dog": 10}, "RGB")
    _write_pngs(tmp_path / "test", {"cat": 3, "dog": 2}, "RGB")
    splits = load_dataset("imagefolder", tmp_path, val_size=4)
    assert splits.class_names == ("cat", "dog") and splits.num_classes == 2
    assert splits.input_shape() == (1, 3, 32, 32)
    assert (len(splits.train), len(splits.search_val), len(splits.test)) == (16, 4, 5)
    assert sorted(splits.test.labels.tolist()) == [0, 0, 0, 1, 1]
    assert splits.train.images.shape == (16, 3, 32, 32)
    assert abs(float(splits.train.images.mean())) < 0.1


def test_imagefolder_single_grayscale_tree(tmp_path: Path) -> None:
    _write_pngs(tmp_path, {"a": 10, "b": 10, "c": 10}, "L", size=20)
    splits = load_dataset("imagefolder", tmp_path, image_size=16, seed=1)
    assert splits.input_shape() == (1, 1, 16, 16)
    assert (len(splits.test), len(splits.train) + len(splits.search_val)) == (6, 24)
    again = load_dataset("imagefolder", tmp_path, image_size=16, seed=1)
    assert torch.equal(again.test.labels, splits.test.labels)
    with pytest.raises(DataNotFoundError, match="imagefolder"):
        load_dataset("imagefolder", None)
    (tmp_path / "a" / "0.png").write_bytes(b"broken")
    with pytest.raises(DataNotFoundError, match="0.png"):
        load_dataset("imagefolder", tmp_path)


# ---------------------------------------------------------------------------- digits, synthetic


def test_digits() -> None:
    splits = load_dataset("digits", seed=0)
    assert (len(splits.train), len(splits.search_val), len(splits.test)) == (1797 - 360 - 300, 300, 360)
    assert splits.input_shape() == (1, 1, 28, 28)
    assert set(splits.test.labels.tolist()) == set(range(10))
    assert load_dataset("digits", image_size=8, val_size=100).train.images.shape[1:] == (1, 8, 8)


def test_synthetic_is_small_and_seeded() -> None:
    a, b = load_dataset("synthetic", seed=5), load_dataset("synthetic", seed=5, image_size=32)
    assert (len(a.train), len(a.search_val), len(a.test)) == (512, 128, 128)
    assert a.input_shape() == (1, 1, 28, 28) and b.input_shape() == (1, 1, 32, 32)
    assert torch.equal(a.train.images, load_dataset("synthetic", seed=5).train.images)
    assert "never" in DATASETS.describe("synthetic")


def test_registry_and_argument_errors() -> None:
    assert DATASETS.names() == ["cifar10", "digits", "fashion-mnist", "imagefolder", "synthetic"]
    assert all(DATASETS.describe(name) for name in DATASETS.names())
    with pytest.raises(UnknownNameError, match="fashion-mnist") as info:
        load_dataset("fashoin-mnist")
    assert "cifar10" in str(info.value)
    with pytest.raises(InvalidValueError, match="val_size"):
        load_dataset("synthetic", val_size=-1)
    with pytest.raises(InvalidValueError, match="val_size"):
        load_dataset("digits", val_size=5000)


# ---------------------------------------------------------------------------------- TensorData


def _toy(n: int = 10) -> TensorData:
    return TensorData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n))


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_sample_once(shuffle: bool) -> None:
    data = _toy(10)
    batches = list(data.batches(3, shuffle=shuffle, seed=7))
    assert [len(y) for _, y in batches] == [3, 3, 3, 1]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(10))
    assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in batches)  # images stay with their labels
    if not shuffle:
        assert labels.tolist() == list(range(10))
    assert [len(y) for _, y in data.batches(3, shuffle=shuffle, drop_last=True)] == [3, 3, 3]


def test_batches_shuffle_reproducible() -> None:
    data = _toy(50)

    def order(seed: int | None) -> list[int]:
        return torch.cat([y for _, y in data.batches(8, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(None) == order(0)
    with pytest.raises(InvalidValueError):
        next(data.batches(0))


def test_subset() -> None:
    data = _toy(20)
    sub = data.subset(5, seed=3)
    assert len(sub) == 5 and len(set(sub.labels.tolist())) == 5
    assert torch.equal(sub.labels, data.subset(5, seed=3).labels)
    assert not torch.equal(sub.labels, data.subset(5, seed=4).labels)
    assert data.subset(20) is data and data.subset(100) is data
    with pytest.raises(InvalidValueError):
        TensorData(torch.zeros(3, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
