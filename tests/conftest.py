"""Shared fixtures: real data and short-trained real models, built once per session."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# Tests interrupt the commands under test with SIGINT, as Ctrl-C does. A suite started in the
# background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored and would pass
# that on to every command it starts, which would then run to the end; handled here, it is back
# to its default in each command started.
def _restore_sigint() -> bool:
    """Give SIGINT its default handler if it is ignored; whether it was."""
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        return False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return True


_restore_sigint()


@pytest.fixture(autouse=True)
def _sigint_by_default(request: pytest.FixtureRequest) -> None:
    """Give each test a process whose SIGINT has its default handler, as the commands it starts need.

    A child started while SIGINT is ignored ignores it too, and a test that interrupts a command
    would then see it run to the end. Should anything in the session leave SIGINT ignored, this
    says which test found it so and restores the default.
    """
    if _restore_sigint():
        warnings.warn(f"SIGINT was ignored when {request.node.nodeid} started; restored", stacklevel=1)


KEPT_BASELINES = Path(__file__).parent / "data" / "baselines"
"""Baselines the suite would otherwise train in every session, trained once by ``train_baseline`` and kept.

Each file is named by its cache key (model, dataset, sizes and training settings), so it stands in only
for exactly the baseline that key describes: the README's default main job (fashion_cnn, 3 epochs on the
55,000 training images, about 95 s to train here) and the ``trained_resnet20`` fixture (about 25 s).
Training itself stays under test: ``trained_cnn``, the smoke run and the digits runs train in the session.
A change to a model or to the training recipe changes the key, and the suite then trains that baseline
again; to keep the new one, copy it from the session's cache (``.../cache0/baselines/``) here and
delete the stale file. ``test_training.py`` checks that every kept file loads and was really trained.
"""


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep baselines and latency tables of the test session out of the user's cache (seeded with the kept
    baselines)."""
    import shutil

    from automl_prune.baseline import baselines_dir

    cache = tmp_path_factory.mktemp("cache")
    shutil.copytree(KEPT_BASELINES, baselines_dir(cache))
    os.environ["AUTOML_PRUNE_CACHE"] = str(cache)
    torch.set_num_threads(2)
    return cache


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST splits (the real IDX files), search-val of 2,000 images."""
    from automl_prune.data import load_dataset

    return load_dataset("fashion-mnist", val_size=2000, seed=0)


@pytest.fixture(scope="session")
def fashion_small(fashion):
    """Fashion-MNIST with a 12k-image train subset and 2k test images, for short training runs."""
    from automl_prune.data import DataSplits

    return DataSplits(
        name="fashion-mnist-12k",
        train=fashion.train.subset(12000, seed=0),
        search_val=fashion.search_val,
        test=fashion.test.subset(2000, seed=0),
        num_classes=fashion.num_classes,
        in_channels=fashion.in_channels,
        image_size=fashion.image_size,
    )


def _train(name: str, data, epochs: float, lr: float = 0.1):
    from automl_prune.baseline import train_baseline
    from automl_prune.models import ModelSpec
    from automl_prune.training import TrainConfig

    spec = ModelSpec(name, data.in_channels, data.num_classes)
    return train_baseline(spec, data, TrainConfig(epochs=epochs, lr=lr, seed=0))


@pytest.fixture(scope="session")
def trained_cnn(fashion_small):
    """fashion_cnn trained 2 epochs on 12k Fashion-MNIST images (about 10 s here)."""
    return _train("fashion_cnn", fashion_small, epochs=2)


@pytest.fixture(scope="session")
def trained_resnet20(fashion_small):
    """resnet20 trained 1 epoch on 12k Fashion-MNIST images."""
    return _train("resnet20", fashion_small, epochs=1)
