"""Safe loading of weight files: automl-prune checkpoints and models trained elsewhere.

Nothing here unpickles arbitrary objects: every file is read with
``torch.load(..., weights_only=True)``, which rebuilds tensors and plain containers only. A file
that holds anything else (a whole pickled ``nn.Module``, a TorchScript archive) is refused with
one line saying how to turn it into a state_dict, the form every tool can load safely.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_prune.errors import CheckpointError, InvalidValueError

logger = logging.getLogger(__name__)

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params", "module")
"""Keys under which training scripts commonly store a state_dict inside a checkpoint dict."""

TO_STATE_DICT = "torch.save(model.state_dict(), 'weights.pt')"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def safe_load(path: str | os.PathLike[str], what: str = "weights file") -> Any:
    """``torch.load`` restricted to tensors and plain containers, with errors that say what to do.

    Raises:
        CheckpointError: Missing or corrupt file, a TorchScript archive, or a pickled object.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' does not exist")
    if _is_torchscript(path):
        raise CheckpointError(
            f"{what} '{path}' is a TorchScript archive, which holds code; save its weights instead: "
            f"torch.save(torch.jit.load('{path.name}').state_dict(), 'weights.pt'), then pass that file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files and refused globals
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"{what} '{path}' holds pickled Python objects (a whole nn.Module?), which are not loaded "
                f"because unpickling can run code; save the weights instead: {TO_STATE_DICT}, then pass that file"
            ) from None
        raise CheckpointError(
            f"{what} '{path}' is corrupt or not a torch file ({type(exc).__name__}); re-create it"
        ) from exc


def extract_state_dict(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """The state_dict in ``payload``: the mapping itself, or one under a common key.

    A ``module.`` prefix on every key (``DataParallel``, DDP) is removed.

    Raises:
        CheckpointError: No mapping of names to tensors found.
    """
    state: Any = payload
    if isinstance(payload, Mapping) and not _is_state_dict(payload):
        state = next((payload[k] for k in STATE_DICT_KEYS if _is_state_dict(payload.get(k))), None)
    if not _is_state_dict(state):
        keys = ", ".join(map(str, list(payload)[:8])) if isinstance(payload, Mapping) else type(payload).__name__
        raise CheckpointError(
            f"{source} holds no state_dict (found: {keys}); give a file saved with {TO_STATE_DICT}, or a "
            f"checkpoint dict holding one under {', '.join(STATE_DICT_KEYS[:5])}"
        )
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) for k in value)
        and any(isinstance(v, torch.Tensor) for v in value.values())
    )


def load_weights(model: nn.Module, path: str | os.PathLike[str], label: str) -> nn.Module:
    """Load trained weights from ``path`` into ``model`` (in place; returned for chaining).

    A first convolution trained on RGB images and built here for one input channel receives the
    sum of its filters over the colour channels (a grey image then gives the response an RGB
    image with equal channels gave). Every other mismatch is an error naming the first layer
    and both shapes.

    Args:
        model: The architecture, built for the data at hand.
        path: A state_dict file, or a checkpoint dict holding one (see :data:`STATE_DICT_KEYS`).
        label: How to name the model in errors (``resnet20``, ``tv:resnet18``).

    Raises:
        CheckpointError: Unsafe, unreadable or mismatching weights.
        InvalidValueError: ``path`` does not exist.
    """
    if not Path(path).is_file():
        raise InvalidValueError(f"weights file '{path}' does not exist; pass a local state_dict file")
    state = extract_state_dict(safe_load(path), f"weights file '{path}'")
    own = model.state_dict()
    for key, tensor in list(state.items()):
        target = own.get(key)
        if (
            target is not None
            and tensor.dim() == 4
            and target.dim() == 4
            and tensor.shape[1] == 3
            and target.shape[1] == 1
            and tensor.shape[0] == target.shape[0]
            and tensor.shape[2:] == target.shape[2:]
        ):
            logger.info("%s: %s summed over RGB for one input channel", label, key)
            state[key] = tensor.sum(dim=1, keepdim=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensor(s) of another shape, first {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(own[k].shape)} in the model (another num_classes, input channels or model.kwargs?)"
            )
        if missing:
            parts.append(f"{len(missing)} missing, first {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, first {unexpected[0]}")
        raise CheckpointError(f"weights in '{path}' do not fit {label}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
