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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automl_prune.checkpoint import CheckpointInfo, save_checkpoint
from automl_prune.errors import InvalidValueError
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


def verify_forward(model: nn.Module, example: torch.Tensor, what: str = "the model") -> None:
    """One forward pass on ``example`` (eval mode, no gradients), before anything is written.

    Raises:
        InvalidValueError: The pass fails or gives non-finite outputs (one line, saying nothing was written).
    """
    try:
        with torch.no_grad():
            out = model.eval()(example.to(next(model.parameters()).device))
    except Exception as exc:  # noqa: BLE001 - any failure means the model must not be written
        raise InvalidValueError(
            f"{what} fails on a forward pass of shape {tuple(example.shape)} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written"
        ) from None
    if not torch.isfinite(out).all():
        raise InvalidValueError(f"{what} gives non-finite outputs on a forward pass; nothing was written")


def export_model(
    model: nn.Module,
    info: CheckpointInfo,
    out_dir: str | os.PathLike[str],
    stem: str = "model",
    checkpoint: bool = True,
) -> ExportPaths:
    """Write ``stem.pt`` (checkpoint, unless ``checkpoint`` is False), ``stem.ts`` and ``stem.onnx`` into ``out_dir``.

    The model is checked first (a forward pass), every file is written into a temporary
    directory beside ``out_dir`` and moved in only when all exist: a failure leaves ``out_dir`` as it was.

    Raises:
        InvalidValueError: The model fails its forward pass, or a format cannot be produced.
    """
    out = Path(out_dir)
    example = info.example_inputs()
    model = model.cpu().eval()
    verify_forward(model, example, f"{stem} ({info.spec.name})")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = ([f"{stem}.pt"] if checkpoint else []) + [f"{stem}.ts", f"{stem}.onnx"]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-export-") as tmp:
        staged = Path(tmp)
        try:
            if checkpoint:
                save_checkpoint(staged / f"{stem}.pt", model, info)
            get_runtime("torchscript").export(model, example, staged / f"{stem}.ts")
            get_runtime("onnxruntime").export(model, example, staged / f"{stem}.onnx")
        except Exception as exc:  # noqa: BLE001 - one line, and nothing moved into out_dir
            raise InvalidValueError(
                f"exporting {stem} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"nothing was written to '{out}'"
            ) from None
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(staged / name, out / name)
    paths = ExportPaths(out / f"{stem}.pt" if checkpoint else None, out / f"{stem}.ts", out / f"{stem}.onnx")
    logger.info("exported %s", ", ".join(str(p) for p in paths.__dict__.values() if p is not None))
    return paths


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> tuple[ExportPaths, float]:
    """``automl-prune export``: a checkpoint exported to ``out`` (checkpoint, TorchScript, ONNX).

    Returns:
        (where each format was written, the max abs difference of ONNX to torch on 8 random inputs).
    """
    from automl_prune.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    paths = export_model(model, info, Path(out))
    return paths, check_onnx(model, paths.onnx, torch.randn(8, *info.input_shape[1:]))
