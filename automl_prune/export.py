"""Export a (pruned) model: reloadable checkpoint, TorchScript and ONNX.

Each format is produced by its runtime (:mod:`automl_prune.runtimes`), the same conversion
that latency is measured on, so the files that ship are the forms that were timed:
``.ts`` is traced and frozen, ``.onnx`` comes from torch's exporter in eval mode; both have
BatchNorm folded into the convolutions. Every file is written atomically; the ONNX file is
checked against torch in onnxruntime (:func:`check_onnx`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automl_prune.checkpoint import CheckpointInfo, save_checkpoint
from automl_prune.runtimes import get_runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportPaths:
    """Where :func:`export_model` wrote each format (``checkpoint`` is None when not written)."""

    checkpoint: Path | None
    torchscript: Path
    onnx: Path


def check_onnx(model: nn.Module, path: str | os.PathLike[str], inputs: torch.Tensor) -> float:
    """Run ``path`` in onnxruntime on ``inputs``; return the max abs difference to torch."""
    out = get_runtime("onnxruntime").run(path, inputs)  # type: ignore[attr-defined]
    with torch.no_grad():
        expected = model.eval()(inputs).numpy()
    return float(np.abs(out - expected).max())


def export_model(
    model: nn.Module,
    info: CheckpointInfo,
    out_dir: str | os.PathLike[str],
    stem: str = "model",
    checkpoint: bool = True,
) -> ExportPaths:
    """Write ``stem.pt`` (checkpoint, unless ``checkpoint`` is False), ``stem.ts`` and ``stem.onnx`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = info.example_inputs()
    model = model.cpu().eval()
    paths = ExportPaths(out / f"{stem}.pt" if checkpoint else None, out / f"{stem}.ts", out / f"{stem}.onnx")
    if paths.checkpoint is not None:
        save_checkpoint(paths.checkpoint, model, info)
    get_runtime("torchscript").export(model, example, paths.torchscript)
    get_runtime("onnxruntime").export(model, example, paths.onnx)
    logger.info("exported %s", ", ".join(str(p) for p in paths.__dict__.values() if p is not None))
    return paths
