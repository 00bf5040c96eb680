"""Benchmark the model zoo: cost, measured CPU latency, LUT-predicted latency, pruning speed-ups.

For every zoo model and input size it prints (as markdown):

1. parameters and FLOPs (multiply-accumulates per sample), the measured latency at each
   batch size (median and p10-p90 of the timed runs), the latency predicted by the
   per-layer lookup table (:class:`~automl_prune.measure.latency.LatencyTable`) and its
   relative error, and the measured speed-up of the uniform 50%-FLOPs pruned model (l1);
2. at one batch size (64 by default): the effect of channel rounding (``round_to`` 1 vs 8,
   each with the uniform plan solved for 50% FLOPs under that rounding) and of the memory
   format (contiguous vs ``channels_last``), as latency and speed-up over the dense model.

Every figure is measured when the script runs; nothing is hard-coded. Example::

    python benchmarks/models.py --out bench.md
    python benchmarks/models.py --models resnet20 --sizes 32x32x3 --runs 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import cpu_model, int_at_least
from tqdm import tqdm

from automl_prune.graph import LayerGraph, count_cost
from automl_prune.io import write_text
from automl_prune.measure.latency import LatencyStats, LatencyTable, measure_latency
from automl_prune.models import MODELS, ModelSpec, build_model
from automl_prune.pruning import apply

ZOO = ("fashion_cnn", "resnet20", "resnet56", "vgg16_bn", "mobilenetv2")
DEFAULT_SIZES = ("28x28x1", "32x32x3")
TARGET_FLOPS = 0.5
ROUNDINGS = (1, 8)


# --------------------------------------------------------------------------- arguments


def _size(text: str) -> tuple[int, int, int]:
    """Parse ``HxWxC`` (e.g. ``32x32x3``) into ``(H, W, C)``."""
    try:
        h, w, c = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like HxWxC, e.g. 32x32x3; got {text!r}") from exc
    if min(h, w, c) < 1:
        raise argparse.ArgumentTypeError(f"size dimensions must be positive, got {text!r}")
    return h, w, c


_positive = int_at_least(1)
_non_negative = int_at_least(0)


def _runs_at(text: str) -> tuple[int, int]:
    """Parse ``BATCH=RUNS`` (e.g. ``64=10``)."""
    try:
        batch, runs = (int(part) for part in text.split("="))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected BATCH=RUNS, e.g. 64=10; got {text!r}") from exc
    if batch < 1 or runs < 1:
        raise argparse.ArgumentTypeError(f"batch and runs must be positive, got {text!r}")
    return batch, runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/models.py",
        description=(
            "Benchmark the zoo models on this CPU: params, FLOPs (MACs), measured and LUT-predicted "
            "latency, and speed-ups of uniform 50%-FLOPs pruning (l1), channel rounding and channels_last. "
            "Prints markdown tables; progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), metavar="NAME", help="zoo models to benchmark")
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=_size,
        default=list(DEFAULT_SIZES),
        metavar="HxWxC",
        help="input sizes, height x width x channels",
    )
    parser.add_argument("--threads", type=_positive, default=2, help="torch intra-op threads")
    parser.add_argument("--runs", type=_positive, default=30, help="timed runs per end-to-end measurement")
    parser.add_argument("--warmup", type=_non_negative, default=10, help="untimed warm-up runs before timing")
    parser.add_argument(
        "--runs-at",
        type=_runs_at,
        action="append",
        default=[],
        metavar="BATCH=RUNS",
        help="override --runs for one batch size (repeatable), e.g. 64=10; warm-up is capped at half that count",
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=_positive, default=[1, 64], metavar="B", help="batch sizes for the first table"
    )
    parser.add_argument(
        "--rounding-batch", type=_positive, default=64, help="batch size of the rounding / memory-format table"
    )
    parser.add_argument("--lut-runs", type=_positive, default=20, help="timed runs per lookup-table entry")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="latency lookup-table cache root (default: a fresh temporary directory, so every entry is measured now)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown to this file (atomically)")
    return parser


# --------------------------------------------------------------------------- machine info


def core_count() -> str:
    logical = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    return f"{logical} logical" + (f" ({usable} usable by this process)" if usable != logical else "")


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


class LoadSampler:
    """Samples the 1-minute load average every few seconds in a daemon thread.

    Other jobs on the machine inflate latencies; the samples show how loaded it was
    while each model was measured.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="load-sampler", daemon=True)

    def sample(self) -> float:
        try:
            value = os.getloadavg()[0]
        except OSError:
            return float("nan")
        self.samples.append(value)
        return value

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> LoadSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def since(self, index: int) -> list[float]:
        """Samples taken from position ``index`` on (plus the current value)."""
        return [*self.samples[index:], self.sample()]


# --------------------------------------------------------------------------- formatting


def fmt_ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_stats(stats: LatencyStats) -> str:
    return f"{fmt_ms(stats.median_ms)} ({fmt_ms(stats.p10_ms)}–{fmt_ms(stats.p90_ms)})"


def fmt_count(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1e6:.2f}M"
    if value >= 1_000:
        return f"{value / 1e3:.1f}k"
    return str(value)


def fmt_speedup(base: LatencyStats, other: LatencyStats) -> str:
    return f"{base.median_ms / other.median_ms:.2f}×"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


@dataclass
class Variant:
    """One network measured in the benchmark (dense, or pruned with some rounding)."""

    model: torch.nn.Module
    flops: int
    params: int
    flops_ratio: float = 1.0
    keep_ratio: float = 1.0
    latency: dict[tuple[int, bool], LatencyStats] = field(default_factory=dict)  # (batch, channels_last)


@dataclass
class Result:
    name: str
    size: tuple[int, int, int]
    dense: Variant
    pruned: dict[int, Variant]  # round_to -> 50%-FLOPs model
    lut_ms: dict[int, float] = field(default_factory=dict)  # batch -> predicted ms
    load: tuple[float, float] = (float("nan"), float("nan"))  # min, max 1-min load average during the case


class Bench:
    def __init__(self, args: argparse.Namespace, cache_dir: Path, load: LoadSampler) -> None:
        self.args = args
        self.load = load
        self.runs_at = dict(args.runs_at)
        self.tables = {
            b: LatencyTable("cpu", threads=args.threads, batch_size=b, cache_dir=cache_dir, runs=args.lut_runs)
            for b in args.batch_sizes
        }
        steps_per_case = (
            1  # build + graph + pruning
            + 3 * len(args.batch_sizes)  # dense, LUT, pruned r1 per batch
            + 4  # rounding table: dense CL, r1 CL, r8 contiguous, r8 CL
            + (0 if args.rounding_batch in args.batch_sizes else 2)
        )
        self.bar = tqdm(
            total=steps_per_case * len(args.models) * len(args.sizes),
            desc="benchmark",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def _step(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)

    def _done(self) -> None:
        self.bar.update(1)

    def measure(self, variant: Variant, shape: tuple[int, ...], channels_last: bool = False) -> LatencyStats:
        key = (shape[0], channels_last)
        if key not in variant.latency:
            runs = self.runs_at.get(shape[0], self.args.runs)
            warmup = min(self.args.warmup, max(1, runs // 2)) if shape[0] in self.runs_at else self.args.warmup
            variant.latency[key] = measure_latency(
                variant.model, shape, threads=self.args.threads, warmup=warmup, runs=runs, channels_last=channels_last
            )
        return variant.latency[key]

    def run_case(self, name: str, size: tuple[int, int, int]) -> Result:
        first_sample = len(self.load.samples)
        self.load.sample()
        h, w, c = size
        label = f"{name} {h}x{w}x{c}"
        self._step(f"{label}: build + prune")
        torch.manual_seed(0)
        model = build_model(ModelSpec(name, in_channels=c, num_classes=10)).eval()
        example = torch.randn(1, c, h, w)
        graph = LayerGraph(model, example)
        dense = Variant(model, graph.flops, graph.params)
        pruned: dict[int, Variant] = {}
        for round_to in ROUNDINGS:
            plan = graph.uniform_plan(TARGET_FLOPS, round_to=round_to)
            small = apply(model, plan, "l1", graph=graph, round_to=round_to).eval()
            cost = count_cost(small, example)  # counted on the built model, not predicted
            keep = next(iter(plan.keep_ratios.values()), 1.0)
            pruned[round_to] = Variant(small, cost.flops, cost.params, cost.flops / graph.flops, keep)
        self._done()
        result = Result(name, size, dense, pruned)

        for b in self.args.batch_sizes:
            shape = (b, c, h, w)
            self._step(f"{label}: dense b{b}")
            self.measure(dense, shape)
            self._done()
            self._step(f"{label}: LUT b{b}")
            result.lut_ms[b] = self.tables[b].predict(model, shape)
            self._done()
            self._step(f"{label}: pruned b{b}")
            self.measure(pruned[1], shape)
            self._done()

        shape = (self.args.rounding_batch, c, h, w)
        todo = [("dense", dense)] + [(f"r{k}", pruned[k]) for k in ROUNDINGS]
        for tag, variant in todo:
            for channels_last in (False, True):
                if (shape[0], channels_last) in variant.latency:
                    continue
                fmt = "channels_last" if channels_last else "contiguous"
                self._step(f"{label}: {tag} b{shape[0]} {fmt}")
                self.measure(variant, shape, channels_last)
                self._done()
        loads = self.load.since(first_sample)
        result.load = (min(loads), max(loads))
        return result


# --------------------------------------------------------------------------- report


def cost_latency_table(results: Sequence[Result], batches: Sequence[int]) -> str:
    header = ["Model", "Input", "Params", "FLOPs (MACs)"]
    align = ["l", "l", "r", "r"]
    for b in batches:
        header += [f"b{b} measured ms (p10–p90)", f"b{b} LUT ms (error)"]
        align += ["r", "r"]
    header.append("50% plan: FLOPs ratio")
    align.append("r")
    for b in batches:
        header.append(f"50% speed-up b{b}")
        align.append("r")
    header.append("load avg (1-min, min–max)")
    align.append("r")
    rows = []
    for r in results:
        h, w, c = r.size
        row = [r.name, f"{h}x{w}x{c}", fmt_count(r.dense.params), fmt_count(r.dense.flops)]
        for b in batches:
            measured = r.dense.latency[(b, False)]
            predicted = r.lut_ms[b]
            error = (predicted - measured.median_ms) / measured.median_ms * 100
            row += [fmt_stats(measured), f"{fmt_ms(predicted)} ({error:+.0f}%)"]
        row.append(f"{r.pruned[1].flops_ratio:.3f}")
        for b in batches:
            small = r.pruned[1].latency[(b, False)]
            row.append(f"{fmt_speedup(r.dense.latency[(b, False)], small)} ({fmt_ms(small.median_ms)} ms)")
        row.append(f"{r.load[0]:.1f}–{r.load[1]:.1f}")
        rows.append(row)
    return markdown_table(header, rows, align)


def rounding_table(results: Sequence[Result], batch: int) -> str:
    header = [
        "Model",
        "Input",
        "Network",
        "Keep ratio",
        "FLOPs ratio",
        "Params",
        "contiguous ms (p10–p90)",
        "speed-up",
        "channels_last ms (p10–p90)",
        "speed-up",
    ]
    align = ["l", "l", "l", "r", "r", "r", "r", "r", "r", "r"]
    rows = []
    for r in results:
        h, w, c = r.size
        base = r.dense.latency[(batch, False)]
        variants = [("dense", r.dense)] + [(f"50% FLOPs, round_to={k}", r.pruned[k]) for k in ROUNDINGS]
        for label, v in variants:
            cont, last = v.latency[(batch, False)], v.latency[(batch, True)]
            rows.append(
                [
                    r.name,
                    f"{h}x{w}x{c}",
                    label,
                    f"{v.keep_ratio:.3f}",
                    f"{v.flops_ratio:.3f}",
                    fmt_count(v.params),
                    fmt_stats(cont),
                    fmt_speedup(base, cont),
                    fmt_stats(last),
                    fmt_speedup(base, last),
                ]
            )
    return markdown_table(header, rows, align)


def render(args: argparse.Namespace, results: Sequence[Result], meta: dict[str, str]) -> str:
    runs = ", ".join(
        f"b{b}: {args.runs_at.get(b, args.runs)} runs" for b in sorted({*args.batch_sizes, args.rounding_batch})
    )
    lines = [
        f"- Machine: {meta['cpu']}, {meta['cores']} cores; {meta['platform']}",
        f"- torch {torch.__version__}, threads (torch.get_num_threads()): {meta['threads']}",
        f"- Date: {meta['date']}",
        f"- Load average (1, 5, 15 min) at start: {meta['load_start']}; at end: {meta['load_end']}; "
        f"1-min load sampled every 5 s during the run: {meta['load_range']} (this machine has {os.cpu_count()} cores)",
        f"- Timing: median of timed runs after {args.warmup} warm-up runs ({runs}); "
        f"LUT entries: median of {args.lut_runs} runs each, measured fresh"
        + ("" if meta["fresh_lut"] == "yes" else " or loaded from the cache dir"),
        f"- Command: `{meta['command']}`",
        f"- Wall time: {meta['wall']}",
        "",
        "Dense models: cost, measured and LUT-predicted latency, and the speed-up of the uniform "
        "50%-FLOPs pruned model (l1, round_to=1, contiguous). LUT error = (predicted − measured) / measured.",
        "",
        cost_latency_table(results, args.batch_sizes),
        "",
        f"Channel rounding and memory format at batch {args.rounding_batch}: each pruned model uses the uniform "
        "plan solved for 50% FLOPs with that rounding (FLOPs ratio counted on the built model). "
        "Speed-ups are against the dense model in contiguous format.",
        "",
        rounding_table(results, args.rounding_batch),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; zoo models: {', '.join(ZOO)}")
    args.sizes = [_size(s) if isinstance(s, str) else s for s in args.sizes]  # list defaults skip `type`
    args.batch_sizes = list(dict.fromkeys(args.batch_sizes))
    args.runs_at = dict(args.runs_at)

    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    meta = {
        "cpu": cpu_model(),
        "cores": core_count(),
        "platform": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "threads": str(torch.get_num_threads()),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": load_average(),
        "command": " ".join(
            ["python", "benchmarks/models.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
        ),
        "fresh_lut": "yes" if args.cache_dir is None else "no",
    }
    load = LoadSampler().start()
    with tempfile.TemporaryDirectory(prefix="automl-prune-bench-") as tmp:
        bench = Bench(args, args.cache_dir if args.cache_dir is not None else Path(tmp), load)
        results = []
        try:
            for name in args.models:
                for size in args.sizes:
                    results.append(bench.run_case(name, size))
        finally:
            bench.bar.close()
            load.stop()
    meta["load_end"] = load_average()
    meta["load_range"] = f"{min(load.samples):.2f}–{max(load.samples):.2f}"
    meta["threads"] = str(torch.get_num_threads())
    seconds = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    meta["wall"] = f"{seconds / 60:.1f} min"
    text = render(args, results, meta)
    print(text)
    if args.out is not None:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
