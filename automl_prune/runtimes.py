"""Deployment runtimes: how a model ships, and how it is timed where it ships.

A :class:`Runtime` converts a PyTorch model into its deployment form, saves that form as an
artifact, loads an artifact back, and wraps either in a :class:`Runner` that runs one
inference on a fixed random input. Latency is always measured on a runner, so the figure
belongs to the form that ships (see :mod:`automl_prune.measure.latency`).

Three runtimes are registered in :data:`RUNTIMES`:

- ``onnxruntime`` (default): ONNX exported with torch's TorchScript-based exporter (which
  folds BatchNorm into the convolutions in eval mode), run in an onnxruntime session with
  all graph optimisations, ``intra_op_num_threads`` set to the requested count and
  spinning threads off, so an idle session does not steal the CPU from whatever is timed
  next. Measured here at 4-8x the speed of eager PyTorch at batch 1 (BENCHMARKS.md).
- ``torchscript``: traced and frozen (``torch.jit.freeze`` folds BatchNorm into the
  convolutions), running in ``channels_last`` for 4-D inputs (the artifact converts its
  input itself; 1.2-2.8x faster than contiguous here), saved as ``.ts``.
- ``torch``: eager PyTorch, BatchNorm folded with ``torch.fx`` where the model traces, in
  ``channels_last`` memory format for 4-D inputs (faster for every zoo model measured here).
  Its artifact is the automl-prune checkpoint (``.pt``).

Every runner runs with the requested intra-op thread count (onnxruntime sessions are created
with it; torch runtimes inside :meth:`Runner.pinned`, which restores torch's count after) and
synchronises CUDA around each call on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_prune.errors import InvalidValueError
from automl_prune.io import atomic_path
from automl_prune.registry import Registry
from automl_prune.threads import num_threads

logger = logging.getLogger(__name__)

__all__ = [
    "RUNTIMES",
    "Runner",
    "Runtime",
    "check_runtime",
    "get_runtime",
    "onnx_session",
    "resolve_device",
    "simd_channels",
]

_INPUT_SEED = 0


# --------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device) -> torch.device:
    """Parse and check a device name.

    Raises:
        InvalidValueError: Unknown device, or CUDA asked for where it is not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidValueError(f"unknown device {device!r}; use 'cpu' or 'cuda[:index]'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InvalidValueError(f"unsupported device {device!r}; use 'cpu' or 'cuda[:index]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidValueError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dev


@functools.lru_cache(maxsize=1)
def simd_channels() -> int:
    """Channel block of this CPU's vector kernels: 16 with AVX-512, else 8.

    oneDNN and onnxruntime's NCHWc kernels work on blocks of 16 float channels with AVX-512
    and 8 with AVX2/NEON; channel counts that are multiples of the block run on the fast
    path (BENCHMARKS.md, "Channel widths").
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8


def random_input(shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A float input of ``shape`` drawn from a fixed seed (timings do not depend on the values)."""
    generator = torch.Generator().manual_seed(_INPUT_SEED)
    return torch.randn(tuple(shape), generator=generator).to(device)


@dataclass
class Runner:
    """One model in one runtime, ready to run inference on a fixed input.

    Calling the runner runs one forward pass (synchronised on CUDA). Use it as a context
    manager, or call :meth:`close`, to release the runtime's resources (an onnxruntime
    session's thread pool) as soon as timing is done.

    Attributes:
        runtime: Registry name of the runtime.
        device: Where it runs.
        threads: Intra-op threads it runs with.
        input_shape: Shape of the input it runs on.
    """

    runtime: str
    device: torch.device
    threads: int
    input_shape: tuple[int, ...]
    _call: Callable[[], Any] = field(repr=False)
    _close: Callable[[], None] | None = field(default=None, repr=False)
    _reopen: Callable[[], Runner] | None = field(default=None, repr=False)

    def __call__(self) -> None:
        """Run one inference (timed by the caller)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._call()
            torch.cuda.synchronize(self.device)
        else:
            self._call()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Runner]:
        """Inside the block torch uses this runner's intra-op thread count (restored afterwards).

        onnxruntime sessions own their thread pools (sized at creation); torch runtimes share
        torch's, so timing code runs them inside this block.
        """
        with num_threads(self.threads if self.runtime != "onnxruntime" else None):
            yield self

    def reopen(self) -> Runner:
        """A fresh runner of the same artifact and input: a new session where the runtime has one.

        Two onnxruntime sessions of one file can run a few per cent apart for their whole life
        (memory placement, thread start-up), so a measurement that must hold for the file, not
        for one session, times several. A runner built without an artifact (a bare call)
        returns a runner of the same call, which the caller may close without closing this one.
        """
        if self._reopen is not None:
            return self._reopen()
        return Runner(self.runtime, self.device, self.threads, self.input_shape, self._call)

    def close(self) -> None:
        """Release the runtime's resources; the runner is unusable afterwards."""
        if self._close is not None:
            self._close()
            self._close = None
        self._call = _closed

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _closed() -> None:
    raise RuntimeError("this runner was closed")


def _inference(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run under :func:`torch.inference_mode` (no autograd bookkeeping)."""

    def call() -> Any:
        with torch.inference_mode():
            return fn()

    return call


# --------------------------------------------------------------------------- runtimes
class Runtime:
    """A deployment runtime: convert, save, load and run a model.

    Subclasses implement :meth:`convert`, :meth:`save`, :meth:`load` and :meth:`_runner`.

    Attributes:
        name: Registry name.
        suffix: File suffix of the artifact it ships (``.onnx``, ``.ts``, ``.pt``).
    """

    name: str = ""
    suffix: str = ""

    def check(self, device: str | torch.device = "cpu") -> None:
        """Raise :class:`InvalidValueError` (one line, with the fix) when it cannot run on ``device``."""
        resolve_device(device)

    def preferred_multiple(self, device: str | torch.device = "cpu") -> int:
        """Channel multiple its kernels are fastest at on ``device`` (see :func:`simd_channels`)."""
        return 8 if torch.device(device).type == "cuda" else simd_channels()

    def convert(self, model: nn.Module, example: torch.Tensor) -> Any:
        """The deployment form of ``model`` (an eval-mode copy; ``model`` is not modified)."""
        raise NotImplementedError

    def save(self, artifact: Any, path: Path) -> None:
        """Write ``artifact`` to ``path`` (called on a temporary path; :meth:`export` renames it)."""
        raise NotImplementedError

    def load(self, path: str | os.PathLike[str]) -> Any:
        """Read an artifact written by :meth:`export`."""
        raise NotImplementedError

    def _runner(self, artifact: Any, x: torch.Tensor, device: torch.device, threads: int) -> Runner:
        raise NotImplementedError

    def export(self, model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
        """Convert ``model`` and write the artifact atomically to ``path``."""
        artifact = self.convert(model, example)
        with atomic_path(path) as tmp:
            self.save(artifact, tmp)
        return Path(path)

    def runner(
        self, artifact: Any, input_shape: Sequence[int], device: str | torch.device = "cpu", threads: int | None = None
    ) -> Runner:
        """A runner of ``artifact`` (from :meth:`convert` or :meth:`load`) on a random input of ``input_shape``."""
        self.check(device)
        dev = resolve_device(device)
        used = threads or torch.get_num_threads()
        if used < 1:
            raise InvalidValueError(f"threads must be >= 1, got {threads}")
        x = random_input(input_shape)
        runner = self._runner(artifact, x, dev, used)
        runner._reopen = lambda: self._runner(artifact, x, dev, used)
        return runner

    def compile(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        device: str | torch.device = "cpu",
        threads: int | None = None,
    ) -> Runner:
        """Convert ``model`` as :meth:`export` would and return a runner of the result."""
        self.check(device)
        example = torch.zeros((1, *tuple(input_shape)[1:]))
        return self.runner(self.convert(model, example), input_shape, device, threads)

    def open(
        self,
        path: str | os.PathLike[str],
        input_shape: Sequence[int],
        device: str | torch.device = "cpu",
        threads: int | None = None,
    ) -> Runner:
        """A runner of the artifact at ``path``."""
        return self.runner(self.load(path), input_shape, device, threads)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the convolution before it.

    Uses ``torch.fx.experimental.optimization.fuse``; a model that ``torch.fx`` cannot trace
    (data-dependent control flow) is returned unfolded, with a debug log line.
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        return fuse(model, inplace=True)
    except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable models
        logger.debug("BatchNorm not folded (torch.fx cannot trace %s: %s)", type(model).__name__, exc)
        return model


class TorchRuntime(Runtime):
    """Eager PyTorch: BatchNorm folded, channels_last for 4-D inputs; artifact: the checkpoint."""

    name = "torch"
    suffix = ".pt"

    def convert(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        folded = fold_batchnorm(model)
        if example.dim() == 4:
            folded = folded.to(memory_format=torch.channels_last)
        return folded

    def save(self, artifact: Any, path: Path) -> None:
        raise InvalidValueError(
            "the torch runtime ships the automl-prune checkpoint (model.pt); save it with "
            "automl_prune.checkpoint.save_checkpoint"
        )

    def load(self, path: str | os.PathLike[str]) -> nn.Module:
        from automl_prune.checkpoint import load_checkpoint

        model, info = load_checkpoint(path)
        return self.convert(model, info.example_inputs())

    def _runner(self, artifact: nn.Module, x: torch.Tensor, device: torch.device, threads: int) -> Runner:
        module = artifact.to(device).eval()
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(device)
        return Runner(self.name, device, threads, tuple(x.shape), _inference(lambda: module(x)))


class ChannelsLastInput(nn.Module):
    """Runs ``module`` (in channels_last) on its input converted to channels_last.

    Traced into a TorchScript artifact, the conversion travels with it: callers pass ordinary
    contiguous tensors and the convolutions still run on the faster channels_last kernels.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def script_on(module: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    """``module`` with every tensor on ``device``, the weights that freezing made constants included.

    ``ScriptModule.to`` moves parameters and buffers only; a frozen module keeps its weights as
    constants of the graph, which stay where they were traced (the CPU) unless the module is
    loaded again with ``map_location``.
    """
    if device.type == "cpu":
        return module
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location=device)


class TorchScriptRuntime(Runtime):
    """TorchScript: traced, then frozen (BatchNorm folded into the convolutions); channels_last for 4-D inputs."""

    name = "torchscript"
    suffix = ".ts"

    def convert(self, model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
        module = copy.deepcopy(model).eval().cpu()
        if example.dim() == 4:
            module = ChannelsLastInput(module).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example.cpu())
            return torch.jit.freeze(traced)

    def save(self, artifact: torch.jit.ScriptModule, path: Path) -> None:
        artifact.save(str(path))

    def load(self, path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise InvalidValueError(
                f"'{path}' is not a TorchScript file ({type(exc).__name__}); re-export it"
            ) from None

    def _runner(self, artifact: torch.jit.ScriptModule, x: torch.Tensor, device: torch.device, threads: int) -> Runner:
        module = script_on(artifact, device)
        x = x.to(device)
        runner = Runner(self.name, device, threads, tuple(x.shape), _inference(lambda: module(x)))
        with runner.pinned():
            for _ in range(2):  # the profiling executor specialises on the first calls
                runner()
        return runner


def onnx_session(source: bytes | str | os.PathLike[str], device: str | torch.device = "cpu", threads: int = 1) -> Any:
    """An onnxruntime session with ``threads`` intra-op threads, one inter-op thread and no spinning.

    The one way the package creates onnxruntime sessions: spinning threads left alive in the
    process slow down everything else timed on the same cores (5-10x measured here).

    Raises:
        InvalidValueError: onnxruntime is missing, has no CUDA provider for a CUDA device, or
            the source is not an ONNX model.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise InvalidValueError(
            "onnxruntime is not installed; `pip install onnxruntime` or use --budget.runtime torch"
        ) from None
    dev = torch.device(device)
    providers = ["CPUExecutionProvider"]
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InvalidValueError(
                "this onnxruntime has no CUDA provider; `pip install onnxruntime-gpu` or use --budget.runtime torch"
            )
        providers = [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        name = source if isinstance(source, str) else "the model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidValueError(f"onnxruntime cannot load {name}: {first}") from None


class OnnxRuntime(Runtime):
    """ONNX (BatchNorm folded by the exporter) run in onnxruntime."""

    name = "onnxruntime"
    suffix = ".onnx"

    def check(self, device: str | torch.device = "cpu") -> None:
        dev = resolve_device(device)
        try:
            import onnxruntime as ort
        except ImportError:
            raise InvalidValueError(
                "onnxruntime is not installed; `pip install onnxruntime` or use --budget.runtime torch"
            ) from None
        if dev.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InvalidValueError(
                "this onnxruntime has no CUDA provider; `pip install onnxruntime-gpu` or use --budget.runtime torch"
            )

    def convert(self, model: nn.Module, example: torch.Tensor) -> bytes:
        module = copy.deepcopy(model).eval().cpu()
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example.cpu(),),
                buffer,
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=True,
            )
        return buffer.getvalue()

    def save(self, artifact: bytes, path: Path) -> None:
        path.write_bytes(artifact)

    def load(self, path: str | os.PathLike[str]) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise InvalidValueError(f"cannot read '{path}': {exc.strerror}") from None

    def _runner(self, artifact: bytes, x: torch.Tensor, device: torch.device, threads: int) -> Runner:
        session = onnx_session(artifact, device, threads)
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x.cpu().numpy())}
        holder = [session]

        def close() -> None:
            holder.clear()  # the session (and its thread pool) goes with its last reference

        return Runner(self.name, device, threads, tuple(x.shape), lambda: holder[0].run(None, feed), close)

    def run(self, path_or_bytes: bytes | str | os.PathLike[str], inputs: torch.Tensor) -> np.ndarray:
        """Outputs of the ONNX model on ``inputs`` (CPU), e.g. to check an export against torch."""
        session = onnx_session(path_or_bytes, "cpu", torch.get_num_threads())
        (out,) = session.run(None, {session.get_inputs()[0].name: inputs.cpu().numpy()})
        return out


RUNTIMES: Registry[Runtime] = Registry("runtime")
RUNTIMES.register("onnxruntime", OnnxRuntime(), "ONNX in onnxruntime (default): fastest here at batch 1 and 64")
RUNTIMES.register(
    "torchscript", TorchScriptRuntime(), "TorchScript, traced and frozen (BatchNorm folded), channels_last"
)
RUNTIMES.register("torch", TorchRuntime(), "eager PyTorch, BatchNorm folded, channels_last")

DEFAULT_RUNTIME = "onnxruntime"


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name``.

    Raises:
        UnknownNameError: Listing the valid names.
    """
    return RUNTIMES.get(name)


def check_runtime(name: str, device: str = "cpu") -> Runtime:
    """The runtime ``name``, checked to run on ``device`` (one clear error otherwise)."""
    runtime = get_runtime(name)
    runtime.check(device)
    return runtime


def runtime_for_file(path: str | os.PathLike[str]) -> Runtime:
    """The runtime whose artifacts end like ``path`` (``.onnx``, ``.ts``, ``.pt``).

    Raises:
        InvalidValueError: For another suffix.
    """
    suffix = Path(path).suffix
    for name in RUNTIMES.names():
        runtime = RUNTIMES.get(name)
        if runtime.suffix == suffix:
            return runtime
    known = ", ".join(RUNTIMES.get(n).suffix for n in RUNTIMES.names())
    raise InvalidValueError(f"'{path}' is not a model file this package runs; give one ending in {known}")
