"""Compatibility shims for third-party packages.

The only shim today covers torchvision on CPU builds of torch whose torchvision C
extension cannot be loaded: ``import torchvision`` then fails while registering fake
kernels for ``torchvision::nms`` because the operator schema was never defined. Models,
datasets and transforms do not need the C extension, so defining the two missing
schemas and importing again makes them work (C operators such as ``nms`` still do not).
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

_MISSING_OP_MESSAGE = "operator torchvision::nms does not exist"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library_handle: object | None = None


def _define_missing_schemas() -> None:
    """Define the torchvision operator schemas the broken C extension should have defined."""
    global _library_handle
    import torch

    if _library_handle is not None:
        return
    lib = torch.library.Library("torchvision", "DEF")  # kept alive in _library_handle
    for name, schema in _SCHEMAS.items():
        try:
            lib.define(schema)
        except RuntimeError as exc:  # already defined by a partly working extension
            logger.debug("torchvision::%s already defined: %s", name, exc)
    _library_handle = lib


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """Import torchvision, repairing the missing-operator failure of CPU builds.

    Returns:
        The ``torchvision`` module.

    Raises:
        RuntimeError: Any import failure other than the known missing ``nms`` schema.
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if _MISSING_OP_MESSAGE not in str(exc):
            raise
        logger.debug("torchvision C extension unavailable; defining operator schemas")
    _forget_partial_import()
    _define_missing_schemas()
    return importlib.import_module("torchvision")
