"""Inference latency: end-to-end measurement and a per-layer lookup table.

Two tools live here:

* :func:`measure_latency` times a whole model on a random input (warm-up runs, then
  timed runs with :func:`time.perf_counter`) and summarises the run times in a
  :class:`LatencyStats`.
* :class:`LatencyTable` predicts a model's latency as the sum of the latencies of its
  leaf modules, each measured once in isolation and cached on disk per device, machine,
  thread count and batch size. Candidate pruned networks share most layer shapes, so a
  search can estimate thousands of them after measuring a few hundred layers.

Timings depend on the thread count; both tools pin it with :func:`num_threads` for the
measurement and restore the previous value afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from automl_prune.errors import InvalidValueError
from automl_prune.io import write_json

logger = logging.getLogger(__name__)

__all__ = [
    "LatencyStats",
    "LatencyTable",
    "default_cache_dir",
    "hardware_slug",
    "layer_key",
    "measure_latency",
    "num_threads",
]

CACHE_ENV_VAR = "AUTOML_PRUNE_CACHE"
_FORMAT = "automl-prune-latency-table"
_VERSION = 1
_PROGRESS_MIN_MISSING = 5  # show a progress bar when more keys than this must be measured
_INPUT_SEED = 0  # random inputs are drawn from a fixed seed so runs are repeatable


# --------------------------------------------------------------------------- helpers


def _resolve_device(device: str | torch.device) -> torch.device:
    """Parse and check a device name; raise :class:`InvalidValueError` if it cannot be used."""
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


def _check_threads(threads: int | None, *, allow_none: bool) -> None:
    if threads is None and allow_none:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidValueError(f"threads must be an integer >= 1, got {threads!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError as exc:
        raise InvalidValueError(f"input_shape must be a sequence of positive integers, got {input_shape!r}") from exc
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise InvalidValueError(f"input_shape must be a non-empty sequence of positive integers, got {input_shape!r}")
    return shape


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Pin torch's intra-op thread count to ``n`` inside the block, then restore it.

    Args:
        n: Number of threads (>= 1), or ``None`` to leave the current setting alone.

    Yields:
        The thread count in effect inside the block.

    Raises:
        InvalidValueError: If ``n`` is not ``None`` and not an integer >= 1.
    """
    _check_threads(n, allow_none=True)
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield previous
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block and restore every module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Disable the garbage collector inside the block so collections do not land in timed runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _on_device(model: nn.Module, device: torch.device) -> bool:
    def same(d: torch.device) -> bool:
        if d.type != device.type:
            return False
        if device.type == "cuda":
            want = device.index if device.index is not None else torch.cuda.current_device()
            return d.index == want
        return True

    return all(same(t.device) for t in (*model.parameters(), *model.buffers()))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_runs(fn: Callable[[], Any], device: torch.device, warmup: int, runs: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed; return the run times in ms."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _synchronize(device)
        times: list[float] = []
        with _gc_paused():
            for _ in range(runs):
                _synchronize(device)
                start = time.perf_counter()
                fn()
                _synchronize(device)
                times.append((time.perf_counter() - start) * 1000.0)
    return times


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile (``q`` in [0, 100]) of already sorted values."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(_INPUT_SEED)


# --------------------------------------------------------------------------- end to end


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated latency measurements of one model and input shape.

    Attributes:
        median_ms: Median run time in milliseconds (the robust headline number).
        mean_ms: Mean run time in milliseconds.
        p10_ms: 10th percentile run time in milliseconds.
        p90_ms: 90th percentile run time in milliseconds.
        std_ms: Sample standard deviation of the run times in milliseconds (0 for one run).
        runs: Number of timed runs.
        warmup: Number of untimed warm-up runs before them.
        batch_size: Leading dimension of the input shape.
        threads: torch intra-op thread count during the measurement.
        device: Device the model ran on, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    std_ms: float
    runs: int
    warmup: int
    batch_size: int
    threads: int
    device: str

    @classmethod
    def from_times(
        cls, times_ms: Sequence[float], *, warmup: int, batch_size: int, threads: int, device: str
    ) -> LatencyStats:
        """Summarise a list of run times.

        Args:
            times_ms: Run times in milliseconds (at least one).
            warmup: Number of warm-up runs that preceded them.
            batch_size: Batch size of the measured input.
            threads: Thread count used.
            device: Device name.

        Returns:
            The statistics.
        """
        if not times_ms:
            raise InvalidValueError("cannot summarise an empty list of run times")
        ordered = sorted(float(t) for t in times_ms)
        return cls(
            median_ms=float(statistics.median(ordered)),
            mean_ms=float(statistics.fmean(ordered)),
            p10_ms=_percentile(ordered, 10),
            p90_ms=_percentile(ordered, 90),
            std_ms=float(statistics.stdev(ordered)) if len(ordered) > 1 else 0.0,
            runs=len(ordered),
            warmup=warmup,
            batch_size=batch_size,
            threads=threads,
            device=device,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the statistics as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 30,
    channels_last: bool = False,
) -> LatencyStats:
    """Measure the end-to-end inference latency of ``model`` on a random input.

    The model runs in eval mode under :func:`torch.inference_mode`; after ``warmup``
    untimed runs, ``runs`` forward passes are timed one by one with
    :func:`time.perf_counter` (with :func:`torch.cuda.synchronize` before and after each
    on CUDA). The caller's model is left as it was: its training flags are restored, and
    it is copied only when it must move to another device or memory format.

    Args:
        model: The network to time.
        input_shape: Full input shape including the batch dimension, e.g. ``(1, 3, 32, 32)``.
        device: ``"cpu"`` or ``"cuda[:index]"``.
        threads: torch intra-op threads for the measurement (restored afterwards);
            ``None`` keeps the current setting. The value used is recorded either way.
        warmup: Untimed runs before timing (>= 0).
        runs: Timed runs (>= 1).
        channels_last: Run model and input in ``torch.channels_last`` memory format
            (4-D inputs only).

    Returns:
        The run-time statistics.

    Raises:
        InvalidValueError: For an unknown or unavailable device, ``threads < 1``, a bad
            shape, ``warmup < 0``, ``runs < 1``, or ``channels_last`` with a non-4-D input.
    """
    dev = _resolve_device(device)
    _check_threads(threads, allow_none=True)
    _check_count("warmup", warmup, 0)
    _check_count("runs", runs, 1)
    shape = _check_shape(input_shape)
    if channels_last and len(shape) != 4:
        raise InvalidValueError(f"channels_last needs a 4-D input shape (N, C, H, W), got {shape}")

    target = model
    if channels_last or not _on_device(model, dev):
        target = copy.deepcopy(model).to(dev)
        if channels_last:
            target = target.to(memory_format=torch.channels_last)
    x = torch.randn(shape, generator=_generator()).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    with num_threads(threads) as used_threads, _eval_mode(target):
        times = _time_runs(lambda: target(x), dev, warmup, runs)
    stats = LatencyStats.from_times(times, warmup=warmup, batch_size=shape[0], threads=used_threads, device=str(dev))
    logger.debug("measured %s on %s: %s", type(model).__name__, shape, stats)
    return stats


# --------------------------------------------------------------------------- lookup table


def default_cache_dir() -> Path:
    """Cache root: ``$AUTOML_PRUNE_CACHE`` if set, else ``~/.cache/automl-prune``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "automl-prune"


def _slug(text: str, max_len: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "unknown"


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where available)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def hardware_slug(device: str | torch.device) -> str:
    """Filename-safe name of the hardware behind ``device``: the CPU model or the GPU name.

    Args:
        device: ``"cpu"`` or ``"cuda[:index]"``.

    Returns:
        A lower-case slug such as ``"amd-epyc"`` or ``"nvidia-h100-80gb-hbm3"``.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        return _slug(torch.cuda.get_device_name(dev))
    return _slug(cpu_model_name())


def _input_spec(args: Sequence[Any]) -> tuple[tuple[tuple[int, ...], torch.dtype], ...] | None:
    """Shapes and dtypes of positional tensor inputs, or ``None`` if any input is not a tensor."""
    spec = []
    for arg in args:
        if not isinstance(arg, torch.Tensor):
            return None
        spec.append((tuple(arg.shape), arg.dtype))
    return tuple(spec)


def _spec_text(spec: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
    parts = []
    for shape, dtype in spec:
        text = "x".join(str(d) for d in shape) or "scalar"
        if dtype != torch.float32:
            text += ":" + str(dtype).removeprefix("torch.")
        parts.append(text)
    return ",".join(parts)


def layer_key(module: nn.Module, spec: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
    """Table key of a leaf module called on inputs of the given shapes and dtypes.

    The key is ``type(module).__name__`` plus its ``extra_repr()`` with whitespace
    removed, then ``@`` and the full input shape(s) including the batch dimension, e.g.
    ``Conv2d(16,32,kernel_size=(3,3),stride=(1,1),padding=(1,1),bias=False)@1x16x32x32``.
    Inputs that are not float32 get their dtype appended (``@1x8:int64``); several
    inputs are joined by commas.

    Args:
        module: The leaf module.
        spec: ``(shape, dtype)`` of each positional input.

    Returns:
        The key string.
    """
    extra = re.sub(r"\s+", "", module.extra_repr())
    return f"{type(module).__name__}({extra})@{_spec_text(spec)}"


def _make_inputs(spec: Sequence[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> list[torch.Tensor]:
    """Random inputs of the given shapes (zeros for integer and bool dtypes, valid as indices)."""
    gen = _generator()
    inputs = []
    for shape, dtype in spec:
        if dtype.is_floating_point or dtype.is_complex:
            tensor = torch.randn(shape, generator=gen).to(dtype)
        else:
            tensor = torch.zeros(shape, dtype=dtype)
        inputs.append(tensor.to(device))
    return inputs


@dataclasses.dataclass(frozen=True)
class _LeafCall:
    name: str
    module: nn.Module
    key: str
    spec: tuple[tuple[tuple[int, ...], torch.dtype], ...]


class LatencyTable:
    """Per-device lookup table of leaf-module latencies, cached on disk as JSON.

    A model's latency is predicted as the sum over its leaf modules (modules without
    children: ``Conv2d``, ``Linear``, ``BatchNorm2d``, activations, pooling, ``Flatten``,
    ``Dropout``, ``Identity`` and any custom leaf) of the latency of that module on the
    input shape it receives. Each distinct key (see :func:`layer_key`) is measured once by
    timing a ``copy.deepcopy`` of the module on a random input of that shape in eval mode;
    the median of the timed runs is stored.

    The cache file is ``<cache_dir>/latency/<device>-<hardware>-t<threads>-b<batch>.json``
    where ``<hardware>`` is the CPU model or GPU name (:func:`hardware_slug`), so tables
    from different machines, thread counts and batch sizes never mix. It is loaded on
    construction and written atomically; a corrupt or mismatching file is reported with a
    warning and rebuilt.

    Limitations: functional operations in ``forward`` (residual additions,
    ``torch.relu`` or ``torch.flatten`` called as functions, concatenations) are not leaf
    modules, so they are not in the table and the prediction leaves them out. Python
    overhead of container modules and cache effects between consecutive layers are not
    captured either. The prediction therefore underestimates end-to-end latency
    somewhat (more for residual networks and small batches); use it to rank or constrain
    candidate networks on one machine, and :func:`measure_latency` for final numbers.

    Attributes:
        device: The device entries are measured on.
        threads: torch intra-op thread count used for measuring.
        batch_size: Batch size the table is for; inputs passed to :meth:`predict` must
            have it as their leading dimension.
        path: The cache file.
        measured_count: Number of entries this instance has measured (not loaded).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        threads: int = 1,
        batch_size: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        warmup: int = 5,
        runs: int = 20,
    ) -> None:
        """Create the table and load its cache file if there is one.

        Args:
            device: ``"cpu"`` or ``"cuda[:index]"``.
            threads: torch intra-op threads for measuring (>= 1).
            batch_size: Batch size of the inputs the table describes (>= 1).
            cache_dir: Cache root; defaults to :func:`default_cache_dir`.
            warmup: Untimed runs before timing each entry (>= 0).
            runs: Timed runs per entry (>= 1).

        Raises:
            InvalidValueError: For an unknown or unavailable device or a bad count.
        """
        self.device = _resolve_device(device)
        _check_threads(threads, allow_none=False)
        _check_count("batch_size", batch_size, 1)
        _check_count("warmup", warmup, 0)
        _check_count("runs", runs, 1)
        self.threads = threads
        self.batch_size = batch_size
        self.warmup = warmup
        self.runs = runs
        self.hardware = hardware_slug(self.device)
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        device_slug = _slug(str(self.device))
        self.path = root / "latency" / f"{device_slug}-{self.hardware}-t{threads}-b{batch_size}.json"
        self.measured_count = 0
        self._entries: dict[str, float] = {}
        self._entries.update(self._read_file(warn=True))

    # ------------------------------------------------------------------ mapping-like access

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> float:
        return self._entries[key]

    @property
    def entries(self) -> dict[str, float]:
        """A copy of the table: key to median latency in ms."""
        return dict(self._entries)

    # ------------------------------------------------------------------ persistence

    def _metadata(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "hardware": self.hardware,
            "threads": self.threads,
            "batch_size": self.batch_size,
        }

    def _read_file(self, *, warn: bool) -> dict[str, float]:
        """Entries of the cache file; empty (with a warning if ``warn``) when missing or unusable."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
                raise ValueError("not a latency table of this format version")
            if data.get("meta") != self._metadata():
                raise ValueError(f"made for {data.get('meta')}, not {self._metadata()}")
            raw = data["entries"]
            if not isinstance(raw, dict):
                raise TypeError("'entries' is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if warn:
                logger.warning("ignoring unusable latency cache %s (%s); it will be rebuilt", self.path, exc)
            return {}
        entries: dict[str, float] = {}
        dropped = 0
        for key, value in raw.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
                entries[str(key)] = float(value)
            else:
                dropped += 1
        if dropped and warn:
            logger.warning("dropped %d invalid entries from latency cache %s", dropped, self.path)
        logger.debug("loaded %d latency entries from %s", len(entries), self.path)
        return entries

    def save(self) -> Path:
        """Write the table to its cache file atomically and return the path.

        Entries another process added to the file since it was loaded are merged in
        (this instance's values win on conflicts).
        """
        merged = self._read_file(warn=False)
        merged.update(self._entries)
        self._entries = merged
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "meta": self._metadata(),
            "torch": torch.__version__,
            "entries": dict(sorted(merged.items())),
        }
        write_json(self.path, payload)
        logger.debug("saved %d latency entries to %s", len(merged), self.path)
        return self.path

    # ------------------------------------------------------------------ measuring

    def _collect(self, model: nn.Module, input_shape: Sequence[int]) -> list[_LeafCall]:
        """Run ``model`` once and record every leaf-module call in execution order."""
        shape = _check_shape(input_shape)
        if shape[0] != self.batch_size:
            raise InvalidValueError(
                f"input_shape {shape} has batch size {shape[0]} but this table is for batch size "
                f"{self.batch_size}; create LatencyTable(batch_size={shape[0]})"
            )
        calls: list[_LeafCall] = []
        skipped: set[str] = set()

        def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                spec = _input_spec(args)
                if spec is None or kwargs:
                    skipped.add(name)
                    return
                calls.append(_LeafCall(name, module, layer_key(module, spec), spec))

            return hook

        handles = []
        try:
            for name, module in model.named_modules():
                if next(module.children(), None) is None:
                    handles.append(module.register_forward_pre_hook(make_hook(name or "<root>"), with_kwargs=True))
            x = torch.randn(shape, generator=_generator()).to(_model_device(model))
            with _eval_mode(model), torch.inference_mode():
                model(x)
        finally:
            for handle in handles:
                handle.remove()
        if skipped:
            logger.warning(
                "leaf modules called with non-tensor or keyword inputs are left out of the latency table: %s",
                ", ".join(sorted(skipped)),
            )
        return calls

    def _measure(self, call: _LeafCall) -> float:
        """Median latency (ms) of a fresh copy of the call's module on a random input."""
        module = copy.deepcopy(call.module).to(self.device).eval()
        inputs = _make_inputs(call.spec, self.device)
        times = _time_runs(lambda: module(*inputs), self.device, self.warmup, self.runs)
        self.measured_count += 1
        median = float(statistics.median(times))
        logger.debug("measured %s: %.4f ms", call.key, median)
        return median

    def _ensure(self, calls: Sequence[_LeafCall]) -> None:
        """Measure the keys among ``calls`` missing from the table and save the table if any were."""
        missing: dict[str, _LeafCall] = {}
        for call in calls:
            if call.key not in self._entries and call.key not in missing:
                missing[call.key] = call
        if not missing:
            return
        logger.info("measuring %d layer latencies on %s (%d threads)", len(missing), self.device, self.threads)
        todo: Any = missing.values()
        if len(missing) > _PROGRESS_MIN_MISSING:
            todo = tqdm(todo, total=len(missing), desc="latency table", unit="layer", disable=None)
        with num_threads(self.threads):
            for call in todo:
                self._entries[call.key] = self._measure(call)
        self.save()

    def breakdown(self, model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, str, float]]:
        """Per-leaf predicted latency, in execution order, measuring missing entries first.

        Args:
            model: The network; it is run once (eval mode, restored afterwards) to
                record the leaf calls and is not otherwise modified.
            input_shape: Full input shape; its leading dimension must equal ``batch_size``.

        Returns:
            ``(module name, key, ms)`` per leaf-module call; a module called twice appears twice.

        Raises:
            InvalidValueError: For a bad shape or a batch size other than the table's.
        """
        calls = self._collect(model, input_shape)
        self._ensure(calls)
        return [(call.name, call.key, self._entries[call.key]) for call in calls]

    def predict(self, model: nn.Module, input_shape: Sequence[int]) -> float:
        """Predicted latency of ``model`` in ms: the sum of its leaf-module latencies.

        Missing entries are measured (with a progress bar when there are many) and the
        cache is saved. See the class docstring for what the sum leaves out.

        Args:
            model: The network.
            input_shape: Full input shape; its leading dimension must equal ``batch_size``.

        Returns:
            The predicted latency in milliseconds.

        Raises:
            InvalidValueError: For a bad shape or a batch size other than the table's.
        """
        return float(sum(ms for _, _, ms in self.breakdown(model, input_shape)))
