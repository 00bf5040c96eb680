"""Export a (pruned) model: reloadable checkpoint, TorchScript and ONNX.

Every file is written atomically. The ONNX file is checked against torch with
onnxruntime (:func:`check_onnx`).
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
from automl_prune.io import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportPaths:
    """Where :func:`export_model` wrote each format."""

    checkpoint: Path
    torchscript: Path
    onnx: Path


def export_torchscript(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Trace ``model`` to TorchScript and save it atomically."""
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example_inputs)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return Path(path)


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Export ``model`` to ONNX (dynamic batch dimension) and save it atomically."""
    import warnings

    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_path = tmp.with_suffix(".onnx")
        program = torch.onnx.export(
            model.eval(),
            (example_inputs,),
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
        )
        program.save(str(onnx_path), external_data=False)
        os.replace(onnx_path, tmp)
    return Path(path)


def check_onnx(model: nn.Module, path: str | os.PathLike[str], inputs: torch.Tensor) -> float:
    """Run ``path`` in onnxruntime on ``inputs``; return the max abs difference to torch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (ort_out,) = session.run(None, {name: inputs.numpy()})
    with torch.no_grad():
        torch_out = model.eval()(inputs).numpy()
    return float(np.abs(ort_out - torch_out).max())


def export_model(
    model: nn.Module, info: CheckpointInfo, out_dir: str | os.PathLike[str], stem: str = "model"
) -> ExportPaths:
    """Write ``stem.pt`` (checkpoint), ``stem.ts`` (TorchScript) and ``stem.onnx`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = info.example_inputs()
    model = model.cpu().eval()
    paths = ExportPaths(out / f"{stem}.pt", out / f"{stem}.ts", out / f"{stem}.onnx")
    save_checkpoint(paths.checkpoint, model, info)
    export_torchscript(model, example, paths.torchscript)
    export_onnx(model, example, paths.onnx)
    logger.info("exported %s, %s, %s", *paths.__dict__.values())
    return paths
