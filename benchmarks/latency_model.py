"""Benchmark: how well the latency model predicts plans it was not fitted on.

For every model and batch size on one runtime (default: onnxruntime, the default runtime):

1. the latency model is fitted from scratch (fresh cache) on ``--plans`` calibration plans
   measured on the runtime, as a latency-budget search does; its build time is printed;
2. ``--test-plans`` random feasible plans of the search space (``SearchSpace.sample`` under
   FLOPs budgets of 75%, 50% and 30%, at the runtime's channel multiple) are measured end to
   end, each interleaved with the dense model;
3. each approach predicts them, and the error ``predicted / measured - 1`` of the latency
   relative to the dense model is summarised (share within 10%, median, p90, max):

   - ``model``: the shipped predictor (fitted on the calibration plans, feature set chosen
     by leave-one-out error);
   - ``model, 8 plans``: the same fitted on only the first 8 calibration plans;
   - ``flops (fitted)``: the same fit restricted to total FLOPs (a calibration on FLOPs alone);
   - ``resolutions features``, ``layers features``: the fit restricted to one of the richer
     feature sets (the shipped model picks among all by leave-one-out error);
   - ``flops ratio``: no fit, latency proportional to FLOPs;
   - ``layer table`` (``--layer-table-models``): the previous approach, per-layer latencies
     timed alone on the runtime (each conv or linear layer with its BatchNorm and
     activation, exported and timed by itself), summed and scaled so that the dense model is
     predicted exactly.

Errors are computed on latencies relative to the dense model measured in the same
interleaved rounds, so the machine's drift during the run is not counted as prediction
error; the absolute error (predicted ms against measured ms) is printed too. Example::

    python benchmarks/latency_model.py --out latency_model.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from _common import cpu_model, csv_list, int_at_least, load_average, load_splits, setup_logging
from torch import nn
from tqdm import tqdm

from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.graph import LayerGraph
from automl_prune.io import write_text
from automl_prune.measure.latency import measure_interleaved
from automl_prune.measure.latency_model import FEATURE_SETS, LatencyModel, LatencyTable, calibrate, measure_plans
from automl_prune.models import ModelSpec, build_model
from automl_prune.pruning import rebuild_structure
from automl_prune.runtimes import DEFAULT_RUNTIME, get_runtime
from automl_prune.search_spaces import SearchSpace
from automl_prune.types import Budget, Plan

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=csv_list, default=["fashion_cnn", "resnet20", "mobilenetv2"])
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in csv_list(v)], default=[1, 64])
    p.add_argument("--runtime", default=DEFAULT_RUNTIME)
    p.add_argument("--plans", type=int_at_least(3), default=24, help="calibration plans of the latency model")
    p.add_argument("--test-plans", type=int_at_least(3), default=30, help="random feasible plans predicted")
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument(
        "--layer-table-models",
        type=csv_list,
        default=["fashion_cnn", "resnet20"],
        help="models the per-layer table baseline runs for (slow for mobilenetv2)",
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


class LayerTable:
    """The per-layer baseline: each conv/linear layer (with its BN and activation) timed alone on the runtime."""

    def __init__(self, runtime: str, threads: int):
        self.runtime = get_runtime(runtime)
        self.threads = threads
        self.entries: dict[str, float] = {}

    def _units(self, model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, list[nn.Module], tuple[int, ...]]]:
        calls, handles, keep = [], [], []

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls.append((module, inputs[0], output))
            keep.append((inputs[0], output))

        for m in model.modules():
            if next(m.children(), None) is None:
                handles.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model.eval()(torch.zeros(shape))
        for h in handles:
            h.remove()
        units, i = [], 0
        while i < len(calls):
            module, x, y = calls[i]
            group, j = [module], i + 1
            if isinstance(module, nn.Conv2d):
                while j < len(calls) and calls[j][1] is y and isinstance(calls[j][0], (nn.BatchNorm2d, *ACTIVATIONS)):
                    group.append(calls[j][0])
                    y = calls[j][2]
                    j += 1
            key = "|".join([repr(group[0]), *(type(m).__name__ for m in group[1:]), str(tuple(x.shape))])
            units.append((key, group, tuple(x.shape)))
            i = j
        return units

    def predict(self, model: nn.Module, shape: tuple[int, ...]) -> float:
        total = 0.0
        for key, group, in_shape in self._units(model, shape):
            if key not in self.entries:
                unit = nn.Sequential(*[copy.deepcopy(m) for m in group]).eval()
                with self.runtime.compile(unit, in_shape, "cpu", self.threads) as runner:
                    self.entries[key] = measure_interleaved({"unit": runner}, rounds=3, retries=1)["unit"].median_ms
            total += self.entries[key]
        return total


def fixed_share(model: LatencyModel, shapes: Sequence) -> float:
    """The part of the dense model's latency the fit gives to what no plan changes (intercept, constant features)."""
    rows = [FEATURE_SETS[model.features](s) for s in shapes]
    constant = [i for i, c in enumerate(model.columns) if len({round(r.get(c, 0.0), 6) for r in rows}) == 1]
    return model.coef[-1] + sum(model.coef[i] for i in constant)


def summary(errors: Sequence[float]) -> str:
    e = np.abs(np.asarray(errors))
    return (
        f"{np.mean(e <= 0.10):.0%} | {np.median(e):.1%} | {np.percentile(e, 90):.1%} | {e.max():.1%}"
        if len(e)
        else "| | |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, ("automl_prune.measure.latency", "automl_prune.measure.latency_model"))
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    splits = load_splits(args)
    runtime = get_runtime(args.runtime)
    multiple = runtime.preferred_multiple()
    rows, model_rows = [], []
    for name in args.models:
        model = build_model(ModelSpec(name, splits.in_channels, splits.num_classes)).eval()
        graph = LayerGraph(model, torch.zeros(splits.input_shape(1)))
        sample = tuple(splits.input_shape(1)[1:])
        # random feasible plans of the search space (latency depends on shapes only: the weights are untrained)
        rng = np.random.default_rng(args.seed)
        tests: list[Plan] = []
        for i, fraction in enumerate((0.75, 0.5, 0.3)):
            ev = Evaluator(model, splits, Budget(flops=fraction), EvaluatorConfig(round_to=multiple, eval_size=100))
            space = SearchSpace(ev)
            count = args.test_plans // 3 + (1 if i < args.test_plans % 3 else 0)
            tests += [space.sample(rng) for _ in range(count)]
        for batch in args.batch_sizes:
            with tempfile.TemporaryDirectory() as cache:
                table = LatencyTable(graph, runtime.name, "cpu", args.threads, batch, cache)
                t0 = time.perf_counter()
                fitted = calibrate(model, graph, table, plans=args.plans, round_to=multiple, progress=True)
                build_s = time.perf_counter() - t0
                calib, ratios = (list(x) for x in zip(*table.measured()))
                measured = measure_plans(model, graph, tests, table, multiple, progress=f"{name} b{batch} test plans")
            shapes = [graph.layer_shapes(p) for p in calib]
            meta = {"runtime": runtime.name, "device": "cpu", "threads": args.threads, "batch_size": batch}
            small = LatencyModel.fit(shapes[:9], ratios[:9], fitted.dense_ms, meta)
            flops_only = LatencyModel.fit(shapes, ratios, fitted.dense_ms, meta, feature_sets=["flops"])
            per_set = {}
            for features in FEATURE_SETS:
                if features != "flops":
                    try:
                        per_set[f"{features} features"] = LatencyModel.fit(
                            shapes, ratios, fitted.dense_ms, meta, feature_sets=[features]
                        )
                    except InvalidValueError:  # more weights than measured plans
                        pass
            true = np.array([m.ratio for m in measured])
            test_shapes = [graph.layer_shapes(m.plan) for m in measured]
            predictions = {
                "model": [fitted.predict_ratio(s) for s in test_shapes],
                "model, 8 plans": [small.predict_ratio(s) for s in test_shapes],
                "flops (fitted)": [flops_only.predict_ratio(s) for s in test_shapes],
                **{k: [m.predict_ratio(s) for s in test_shapes] for k, m in per_set.items()},
                "flops ratio": [sum(x.flops for x in s) / graph.flops for s in test_shapes],
            }
            if name in args.layer_table_models:
                layers = LayerTable(runtime.name, args.threads)
                shape = (batch, *sample)
                dense_sum = layers.predict(model, shape)
                predictions["layer table"] = [
                    layers.predict(rebuild_structure(model, graph, m.plan, multiple), shape) / dense_sum
                    for m in tqdm(measured, desc=f"{name} b{batch} layer table", file=sys.stderr)
                ]
            absolute = [
                fitted.predict_ms(s) / m.stats.median_ms - 1.0 for s, m in zip(test_shapes, measured)
            ]  # includes the machine's drift since the fit
            noisy = sum(m.noisy for m in measured)
            model_rows.append(
                f"| {name} | {batch} | {fitted.dense_ms:.4g} | {fixed_share(fitted, shapes):.0%} | {fitted.plans} | "
                f"{fitted.features} | {build_s:.0f} | "
                f"{fitted.loo_median:.1%} / {fitted.loo_p90:.1%} | {len(measured)} ({noisy} noisy) | {summary(absolute)} |"
            )
            for approach, pred in predictions.items():
                errors = np.asarray(pred) / true - 1.0
                rows.append(f"| {name} | {batch} | {approach} | {summary(errors)} |")
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}; {args.runtime}, "
        f"{args.threads} thread(s), channel multiple {multiple}; {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"load average {load_start} at start, {load_average()} at end; {time.perf_counter() - started:.0f} s.",
        "",
        f"Command: `python benchmarks/latency_model.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        "The fitted latency model (what a latency-budget search uses): fitted on the dense model and "
        f"{args.plans} calibration plans; 'fixed share' is the fitted intercept, the part of the dense model's "
        "latency that does not shrink with channels; leave-one-out error on the calibration plans; the absolute "
        "error on the test plans (predicted ms against measured ms, machine drift included) as within 10% | "
        "median | p90 | max:",
        "",
        "| model | batch | dense ms | fixed share | plans fitted | features | build s | LOO median / p90 | test plans | "
        "within 10% | median | p90 | max |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *model_rows,
        "",
        "Error of each approach on the test plans (latency relative to the dense model, measured in the same "
        "interleaved rounds):",
        "",
        "| model | batch | approach | within 10% | median | p90 | max |",
        "|---|---:|---|---:|---:|---:|---:|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
