"""Export a (pruned) model: reloadable checkpoint, TorchScript and ONNX.

Each format is produced by its runtime (:mod:`automl_prune.runtimes`), the same conversion
that latency is measured on, so the files that ship are the forms that were timed:
``.ts`` is traced and frozen, ``.onnx`` comes from torch's exporter in eval mode; both have
BatchNorm folded into the convolutions. Both files are run and compared with the eager model
before anything is moved into place (:data:`EXPORT_TOLERANCE`), and every file is written
atomically: an export that disagrees with the model it came from is not written.
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


EXPORT_TOLERANCE = 1e-3
"""Largest difference allowed between an exported file's outputs and the eager model's, relative to the
outputs' scale (max |output|, at least 1). Folding BatchNorm and another runtime's kernels move float32
outputs by about 1e-5; a difference of this size is a broken conversion, not rounding."""


@dataclass(frozen=True)
class ExportPaths:
    """Where :func:`export_model` wrote each format, and how far each file's outputs are from the model's.

    Attributes:
        checkpoint: The checkpoint (None when not written).
        torchscript: The frozen TorchScript file.
        onnx: The ONNX file.
        torchscript_max_abs_diff: Largest absolute difference of the TorchScript file's outputs from
            the eager model's, on the first check input (the batch size it was traced at).
        onnx_max_abs_diff: The same for the ONNX file in onnxruntime, on all check inputs.
    """

    checkpoint: Path | None
    torchscript: Path
    onnx: Path
    torchscript_max_abs_diff: float
    onnx_max_abs_diff: float


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


def _check_exported(model: nn.Module, staged: Path, stem: str, inputs: torch.Tensor, out: Path) -> tuple[float, float]:
    """Run the staged ``.ts`` and ``.onnx`` files on ``inputs``; return their max abs differences from ``model``.

    Raises:
        InvalidValueError: A file's outputs differ by more than :data:`EXPORT_TOLERANCE` (relative).
    """
    with torch.no_grad():
        expected = model(inputs)
    scripted = get_runtime("torchscript").load(staged / f"{stem}.ts")
    with torch.no_grad():
        ts_diff = float((scripted(inputs[:1]) - expected[:1]).abs().max())
    onnx_diff = check_onnx(model, staged / f"{stem}.onnx", inputs)
    limit = EXPORT_TOLERANCE * max(1.0, float(expected.abs().max()))
    for name, diff in ((f"{stem}.ts", ts_diff), (f"{stem}.onnx", onnx_diff)):
        if not diff <= limit:  # NaN included
            raise InvalidValueError(
                f"the exported {name} differs from the model by {diff:.2e} (more than {limit:.1e}) on "
                f"{len(inputs)} input(s): the conversion is broken for this model; nothing was written to '{out}'"
            )
    return ts_diff, onnx_diff


def export_model(
    model: nn.Module,
    info: CheckpointInfo,
    out_dir: str | os.PathLike[str],
    stem: str = "model",
    checkpoint: bool = True,
    check_inputs: torch.Tensor | None = None,
) -> ExportPaths:
    """Write ``stem.pt`` (checkpoint, unless ``checkpoint`` is False), ``stem.ts`` and ``stem.onnx`` into ``out_dir``.

    The model is checked first (a forward pass); every file is written into a temporary directory
    beside ``out_dir``, the TorchScript and ONNX files are run and compared with the model there, and
    the files are moved in only when all exist and agree: a failure leaves ``out_dir`` as it was.

    Args:
        model: The model to export (moved to the CPU, eval mode).
        info: Its checkpoint metadata (input shape, plan).
        out_dir: Where the files go.
        stem: File name stem.
        checkpoint: Also write the reloadable checkpoint.
        check_inputs: Inputs the exported files are compared on (real images where available;
            default: 8 seeded random inputs of the model's input shape).

    Raises:
        InvalidValueError: The model fails its forward pass, a format cannot be produced, or an
            exported file disagrees with the model.
    """
    out = Path(out_dir)
    example = info.example_inputs()
    model = model.cpu().eval()
    verify_forward(model, example, f"{stem} ({info.spec.name})")
    if check_inputs is None:
        generator = torch.Generator().manual_seed(0)
        check_inputs = torch.randn((8, *example.shape[1:]), generator=generator)
    check_inputs = check_inputs.cpu()
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
        ts_diff, onnx_diff = _check_exported(model, staged, stem, check_inputs, out)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(staged / name, out / name)
    paths = ExportPaths(
        out / f"{stem}.pt" if checkpoint else None, out / f"{stem}.ts", out / f"{stem}.onnx", ts_diff, onnx_diff
    )
    logger.info(
        "exported %s (max abs difference from torch: TorchScript %.1e, ONNX %.1e)",
        ", ".join(str(p) for p in (paths.checkpoint, paths.torchscript, paths.onnx) if p is not None),
        ts_diff,
        onnx_diff,
    )
    return paths


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> ExportPaths:
    """``automl-prune export``: a checkpoint exported to ``out`` (checkpoint, TorchScript, ONNX), each file checked."""
    from automl_prune.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    return export_model(model, info, Path(out))
