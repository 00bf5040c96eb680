"""The report of one main-job run: baseline vs pruned model, measured from the run's files.

:func:`write_run_report` reads ``baseline.pt``, ``model.pt``, ``result.json`` and
``export.json`` from a run directory and measures both models again: test accuracy, exact
FLOPs and parameters of the built models, and end-to-end latency of the *exported files*
(``baseline.onnx`` / ``model.onnx`` for onnxruntime, ``.ts`` for TorchScript, the checkpoints
for eager torch) on the budget's runtime, device and threads at each configured batch size,
in interleaved rounds, with p10/p90 and a noise flag; when the pruned model's margin to a latency
budget is inside the noise band, that batch size is measured again with more rounds, so the
verdict is not the noise's. It writes:

- ``report.json``: every figure, the budget with whether each term is met by the measured
  value, the measured finalists, the Pareto front, the per-group channels, the config;
- ``report.md``: the same for people, with how to load each file;
- ``keep_ratios.png``: original vs kept channels per group;
- ``search_curve.png``: every evaluation's search-val accuracy and the best so far.

Because it only needs the run directory, ``automl-prune report --run DIR`` re-measures a
finished run (e.g. on the deployment machine).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automl_prune.checkpoint import load_checkpoint
from automl_prune.config import REFINE_RULES, Config
from automl_prune.data import DataSplits
from automl_prune.errors import InvalidValueError
from automl_prune.export import EXPORT_TOLERANCE
from automl_prune.finalists import NOISE_BAND, REMEASURE_FACTOR, latency_margin
from automl_prune.graph import LayerGraph, count_cost
from automl_prune.io import atomic_path, write_json, write_text
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.measure.latency import SESSIONS, LatencyStats, cpu_model_name, measure_interleaved, round_ratio
from automl_prune.refine import reference_rule
from automl_prune.report import best_so_far
from automl_prune.runtimes import Runner, Runtime, get_runtime
from automl_prune.types import Budget, Evaluation

logger = logging.getLogger(__name__)

REQUIRED = ("baseline.pt", "model.pt", "result.json")
DRIFT = 0.15
"""Relative change of the baseline's latency between search and report worth a note."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidValueError(f"'{path}' is damaged (not valid JSON); rerun the search into a new --out") from None


def _latency_sizes(config: Config) -> list[int]:
    sizes = list(dict.fromkeys(config.report.latency_batch_sizes))
    if config.budget.batch_size not in sizes and (
        config.budget.latency_ms is not None or config.budget.speedup is not None
    ):
        sizes.append(config.budget.batch_size)
    return sizes


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return cpu_model_name()


def _budget_terms(config: Config, base: dict[str, Any], pruned: dict[str, Any], result: dict[str, Any]) -> list[dict]:
    """One entry per budget term: limit, measured value, met, and by how much.

    A latency term also records the prediction of the search, the measurement of the
    finalists, whether today's measurement is noisy, and the baseline's latency now and
    when the latency model was fitted, so that a machine whose speed changed in between is
    visible in the report.
    """
    b = config.budget
    terms = []
    for name, limit in (("flops", b.flops), ("params", b.params)):
        if limit is None:
            continue
        absolute = Budget.absolute(limit, base[name])
        value = pruned[name]
        terms.append(
            {
                "term": name,
                "limit": absolute,
                "limit_given": limit,
                "measured": value,
                "met": value <= absolute,
                "margin": value / absolute - 1.0,
            }
        )
    size = str(b.batch_size)
    chosen = result.get("chosen", {})
    fitted = result.get("latency_model") or {}
    common = {
        "runtime": b.runtime,
        "device": b.device,
        "batch_size": b.batch_size,
        "noisy": pruned["latency"][size]["noisy"] or base["latency"][size]["noisy"]
        if size in pruned["latency"]
        else False,
        "baseline_measured": base["latency_ms"].get(size),
        "baseline_at_search": fitted.get("dense_ms"),
    }
    if b.latency_ms is not None:
        measured = pruned["latency_ms"][size]
        predicted = chosen.get("latency_ms")
        terms.append(
            {
                "term": "latency_ms",
                "limit": b.latency_ms,
                "limit_given": b.latency_ms,
                "measured": measured,
                "predicted": predicted,
                "prediction_error": (predicted - measured) / measured if predicted is not None else None,
                "measured_at_search": chosen.get("measured_latency_ms"),
                "met": measured <= b.latency_ms,
                "margin": measured / b.latency_ms - 1.0,
                **common,
            }
        )
    if b.speedup is not None:
        measured = pruned["speedup"][size]
        terms.append(
            {
                "term": "speedup",
                "limit": b.speedup,
                "limit_given": b.speedup,
                "measured": measured,
                "met": measured >= b.speedup,
                "margin": b.speedup / measured - 1.0,
                **common,
            }
        )
    return terms


def _artifact_runner(
    runtime: Runtime, run: Path, stem: str, model: torch.nn.Module, shape: tuple, config: Config
) -> Runner:
    """A runner of ``run/stem<suffix>`` (the exported file), or of ``model`` converted alike when the file is missing."""
    b = config.budget
    path = run / f"{stem}{runtime.suffix}"
    if path.is_file():
        return runtime.open(path, shape, b.device, b.threads)
    logger.info("%s is missing; converting the checkpoint for %s instead", path.name, runtime.name)
    return runtime.compile(model, shape, b.device, b.threads)


def _measure_latency(
    run: Path, config: Config, models: dict[str, torch.nn.Module], shape: tuple[int, ...], sizes: list[int]
) -> dict[int, dict[str, LatencyStats]]:
    """Latency of the baseline's and the pruned model's files per batch size, in interleaved rounds.

    Taking turns spreads a transient slowdown of a shared machine over both models instead of
    charging it to whichever was being timed; sharing the rounds out among fresh sessions keeps
    one session's speed from deciding the figure; a measurement that stays noisy is flagged.
    """
    runtime = get_runtime(config.budget.runtime)
    runtime.check(config.budget.device)
    stems = {"baseline": "baseline", "pruned": "model"}
    out = {}
    for size in sizes:
        runners: dict[str, Runner] = {}
        try:
            for label, model in models.items():  # opened one by one, so that a failure closes those already open
                runners[label] = _artifact_runner(runtime, run, stems[label], model, (size, *shape), config)
            out[size] = measure_interleaved(runners, rounds=config.report.latency_rounds, sessions=SESSIONS)
            margin = _budget_margin(config, out[size]) if size == config.budget.batch_size else math.inf
            if abs(margin) < NOISE_BAND:  # the verdict would be the noise's: more rounds and sessions, as the finalists
                rounds = REMEASURE_FACTOR * config.report.latency_rounds
                logger.info(
                    "the measured margin to the latency budget (%+.1f%%) is inside the noise band: measuring again "
                    "with %d rounds",
                    100 * margin,
                    rounds,
                )
                out[size] = measure_interleaved(runners, rounds=rounds, sessions=REMEASURE_FACTOR * SESSIONS)
        finally:
            for runner in runners.values():
                runner.close()
    return out


def _budget_margin(config: Config, latency: dict[str, LatencyStats]) -> float:
    """Headroom of the pruned model's measurement to the budget's latency terms (inf without one)."""
    b, pruned = config.budget, latency["pruned"]
    return latency_margin(b.latency_ms, b.speedup, pruned.median_ms, round_ratio(pruned, latency["baseline"]))


def measure_run(run_dir: str | Path, config: Config, data: DataSplits) -> dict[str, Any]:
    """Every figure of the report, measured from the files in ``run_dir``.

    Raises:
        InvalidValueError: ``run_dir`` lacks a file the report needs.
    """
    run = Path(run_dir)
    missing = [name for name in REQUIRED if not (run / name).is_file()]
    if missing and config.search.only:
        raise InvalidValueError(
            f"'{run}' is a search-only run (search.only): it has a plan but no pruned model to report on; "
            f"prune its plan with `automl-prune prune --plan {run / 'plan.json'}`, or run the search without search.only"
        )
    if missing:
        raise InvalidValueError(
            f"'{run}' lacks {', '.join(missing)}: the report needs a finished run (run `automl-prune search` "
            "without search.only, or resume it with --resume)"
        )
    baseline, base_info = load_checkpoint(run / "baseline.pt")
    pruned, info = load_checkpoint(run / "model.pt")
    result = _read_json(run / "result.json")
    export = _read_json(run / "export.json")
    x = base_info.example_inputs()
    b = config.budget
    threads = b.threads or torch.get_num_threads()
    sizes = _latency_sizes(config)
    pair = {"baseline": baseline, "pruned": pruned}
    latency = _measure_latency(run, config, pair, tuple(x.shape[1:]), sizes)
    models: dict[str, dict[str, Any]] = {}
    for label, model in pair.items():
        cost = count_cost(model, x)
        models[label] = {
            "test_accuracy": evaluate_accuracy(model, data.test, limit=config.report.test_size),
            "flops": cost.flops,
            "params": cost.params,
            "latency_ms": {str(size): latency[size][label].median_ms for size in sizes},
            "latency": {str(size): latency[size][label].to_dict() for size in sizes},
        }
    speedup = {str(size): 1.0 / round_ratio(latency[size]["pruned"], latency[size]["baseline"]) for size in sizes}
    models["pruned"]["speedup"] = speedup
    graph = LayerGraph(baseline, x)
    plan = info.plan
    assert plan is not None  # model.pt is written by prune_and_finetune, always with its plan
    kept = graph.kept_channels(plan, info.round_to)
    layers = [
        {
            "group": g.name,
            "type": g.root.kind,
            "channels": g.channels,
            "kept": kept[g.name],
            "keep_ratio": kept[g.name] / g.channels,
        }
        for g in graph.groups
    ]
    best = result.get("chosen") or result.get("best", {})
    base, new = models["baseline"], models["pruned"]
    terms = _budget_terms(config, base, new, result)
    noisy = [
        f"{label} at batch {size}: {latency[size][label].note}"
        for size in sizes
        for label in pair
        if latency[size][label].noisy
    ]
    finalists = _read_json(run / "finalists.json")
    front = _read_json(run / "pareto.json")
    return {
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": base_info.spec.name,
        "dataset": data.name,
        "seed": config.seed,
        "strategy": result.get("strategy", config.search.strategy),
        "criterion": info.meta.get("criterion", config.prune.criterion),
        "machine": {
            "runtime": b.runtime,
            "device": b.device,
            "device_name": _device_name(b.device),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "budget": {"description": Budget(**result["budget"]).describe() if "budget" in result else "", "terms": terms},
        "budget_met": all(t["met"] for t in terms),
        "latency_noisy": noisy,
        "baseline": base,
        "pruned": new,
        "pruned_before_finetune_test_accuracy": info.meta.get("test_accuracy_before_finetune"),
        "pruned_before_finetune_search_val_accuracy": info.meta.get("search_val_accuracy_after_prune"),
        "pruned_as_scored": info.meta.get("as_scored"),
        "finetune_refined_start": info.meta.get("refined_start"),
        "chance_accuracy": 1.0 / data.num_classes,
        "finetune": info.meta.get("finetune"),
        "speedup": speedup,
        "round_to": info.round_to,
        "skipped_blocks": graph.skipped_blocks(plan),
        "layers": layers,
        "search": {
            "evaluations": result.get("evaluations"),
            "failed_evaluations": result.get("failed_evaluations", 0),
            "first_failure": result.get("first_failure"),
            "worker_faults": result.get("worker_faults"),
            "wall_time_s": result.get("wall_time"),
            "best_search_val_accuracy": best.get("accuracy"),
            "dense_search_val_accuracy": result.get("dense", {}).get("accuracy"),
            "best_flops_ratio": best.get("flops_ratio"),
            "latency_model": result.get("latency_model"),
        },
        "refinement": _read_json(run / "refine.json") or None,
        "finalists": finalists.get("finalists", []),
        "chosen_finalist": finalists.get("chosen"),
        "pareto": front.get("points", []),
        "pareto_cost": front.get("cost_label"),
        "inputs": _inputs(base_info.input_shape, data, base_info.meta),
        "onnx_max_abs_diff": export.get("onnx_max_abs_diff"),
        "torchscript_max_abs_diff": export.get("torchscript_max_abs_diff"),
        "files": {name: name for name in FILES if (run / name).is_file()},
        "config": config.to_dict(),
    }


FILES = {
    "model.onnx": "the pruned model in ONNX (BatchNorm folded): `onnxruntime.InferenceSession('model.onnx')`",
    "model.ts": "the pruned model in TorchScript (frozen): `torch.jit.load('model.ts')`",
    "model.pt": "the pruned model as a checkpoint: `automl_prune.checkpoint.load_checkpoint('model.pt')` "
    "(trainable, rebuilds its architecture)",
    "baseline.onnx": "the dense model in ONNX, for comparison",
    "baseline.ts": "the dense model in TorchScript",
    "baseline.pt": "the dense model as a checkpoint",
    "plan.json": "the plan that shipped (keep ratio per group)",
    "pareto.json": "the accuracy-vs-cost front of the search: `automl-prune prune --plan pareto.json --point N` "
    "ships another point",
    "finalists.json": "the finalists measured on the runtime, with their prediction errors",
    "refine.json": "the refined plans' search-val scores at every rung of short fine-tunes (refine.png plots them)",
    "latency_model.json": "the latency model the search predicted with",
    "policy.pt": "the policy the agent learned: `--search.init_policy DIR` starts another search (e.g. another "
    "budget) from it",
    "result.json": "the search's result and every evaluation",
    "config.yaml": "the resolved config: `automl-prune search --config config.yaml` reruns the search",
}
"""Files a run directory may hold, with how to use each (listed in the report)."""


def _inputs(input_shape: tuple[int, ...], data: DataSplits, meta: dict[str, Any]) -> dict[str, Any]:
    """How to feed the model: input shape, dtype, normalisation and the class order."""
    return {
        "shape": ["batch", *input_shape[1:]],
        "dtype": "float32",
        "classes": data.num_classes,
        "class_names": list(data.class_names),
        "mean": list(data.mean),
        "std": list(data.std),
        "dataset": meta.get("dataset", data.name),
    }


def _floats(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def _noise_tail(t: dict[str, Any]) -> str:
    return " (the measurement stayed noisy; `automl-prune report --run DIR` measures again)" if t.get("noisy") else ""


def _budget_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for t in report["budget"]["terms"]:
        verdict = "**met**" if t["met"] else f"**missed by {abs(t['margin']):.1%}**"
        where = f"{t.get('runtime', 'torch')}, {t.get('device', 'cpu')}, batch {t.get('batch_size', 1)}"
        if t["term"] == "latency_ms":
            pred = (
                f"; predicted {t['predicted']:.4g} ms by the latency model (error {_pct(t['prediction_error'])})"
                if t.get("predicted") is not None
                else ""
            )
            if t.get("measured_at_search") is not None:
                pred += f"; {t['measured_at_search']:.4g} ms when measured as a finalist"
            lines.append(
                f"- latency <= {t['limit']:g} ms ({where}): {verdict}: measured {t['measured']:.4g} ms "
                f"end to end{pred}{_noise_tail(t)}"
            )
        elif t["term"] == "speedup":
            lines.append(
                f"- speed-up >= {t['limit']:g}x over the baseline ({where}): {verdict}: measured "
                f"x{t['measured']:.2f} (interleaved rounds){_noise_tail(t)}"
            )
        else:
            given = f"{t['limit_given']:.0%} of the baseline = " if t["limit_given"] <= 1 else ""
            lines.append(
                f"- {t['term']} <= {given}{t['limit']:,.0f}: {verdict}: the pruned model has {t['measured']:,} "
                f"({t['measured'] / report['baseline'][t['term']]:.1%} of the baseline)"
            )
            continue
        then, now = t.get("baseline_at_search"), t.get("baseline_measured")
        if then and now and abs(now / then - 1) > DRIFT:
            lines.append(
                f"- note: the baseline measures {now:.4g} ms now against {then:.4g} ms when the search fitted its "
                f"latency model ({now / then - 1:+.0%}): the machine's speed changed in between, which moves the "
                "absolute figures by as much (speed-ups are measured in interleaved rounds and hold)"
            )
    return lines


def _latency_rows(report: dict[str, Any]) -> list[str]:
    base, new = report["baseline"], report["pruned"]
    rows = []
    for size in base["latency_ms"]:
        b, p = base["latency"][size], new["latency"][size]
        flag = " NOISY" if b["noisy"] or p["noisy"] else ""
        rows.append(
            f"| {size} | {b['median_ms']:.4g} ({b['p10_ms']:.4g}-{b['p90_ms']:.4g}) | "
            f"{p['median_ms']:.4g} ({p['p10_ms']:.4g}-{p['p90_ms']:.4g}) | x{report['speedup'][size]:.2f}{flag} |"
        )
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md`` from :func:`measure_run`'s dict."""
    import yaml

    base, new = report["baseline"], report["pruned"]
    m = report["machine"]
    verdict = "met" if report["budget_met"] else "NOT met"
    rows = [
        (
            "test accuracy",
            f"{base['test_accuracy']:.4f}",
            f"{new['test_accuracy']:.4f}",
            f"{(new['test_accuracy'] - base['test_accuracy']) * 100:+.2f} pp",
        ),
        ("parameters", f"{base['params']:,}", f"{new['params']:,}", f"x{base['params'] / new['params']:.2f} smaller"),
        ("FLOPs (MACs)", f"{base['flops']:,}", f"{new['flops']:,}", f"x{base['flops'] / new['flops']:.2f} smaller"),
    ]
    lines = [
        f"# automl-prune report: {report['model']} on {report['dataset']}",
        "",
        f"Budget {report['budget']['description']}: **{verdict}** by the measured figures.",
        "",
        *_budget_lines(report),
        "",
        f"Strategy `{report['strategy']}` ({report['search']['evaluations']} evaluations, "
        f"{report['search']['wall_time_s'] or 0:.0f} s), criterion `{report['criterion']}`, seed {report['seed']}, "
        f"channel widths in multiples of {report.get('round_to', 1)}. {report['created']}.",
        "",
        "| | baseline | pruned | change |",
        "|---|---:|---:|---:|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        *_chance_lines(report),
        "## Latency",
        "",
        f"Measured on the exported files in {m.get('runtime', 'torch')} on {m['device']} ({m['device_name']}), "
        f"{m['threads']} thread(s), torch {m['torch']}: median of interleaved rounds (baseline, pruned, baseline, "
        "...), p10-p90 of all runs in brackets, speed-up as the median of the per-round ratios.",
        "",
        "| batch | baseline ms | pruned ms | speed-up |",
        "|---:|---:|---:|---:|",
        *_latency_rows(report),
        "",
    ]
    if report.get("latency_noisy"):
        lines += [
            "Noisy measurements (repeated, and still too spread to be taken as fact): "
            + "; ".join(report["latency_noisy"])
            + ".",
            "",
        ]
    before = report.get("pruned_before_finetune_test_accuracy")
    if before is not None:
        ft = report.get("finetune")
        tail = f"after fine-tuning {ft['epochs']:g} epochs at lr {ft['lr']:g}" if ft else "(no fine-tune)"
        start = report.get("finetune_refined_start")
        if ft and start:
            tail += (
                f", from the refinement's weights after {start['steps']} steps ({start['search_val_accuracy']:.4f} "
                "on search-val; finetune.from_refinement)"
            )
        lines += [f"Test accuracy right after pruning: {before:.4f}; {new['test_accuracy']:.4f} {tail}.", ""]
    s = report["search"]
    if s.get("best_search_val_accuracy") is not None:
        scored = report.get("pruned_before_finetune_search_val_accuracy")
        same = (
            f" The model fine-tuned is the one the search scored: {scored:.4f} on the same search-val images "
            "right after pruning."
            if scored is not None
            else " The plan was cut afresh with the prune criterion, not as the search scored it."
            if report.get("pruned_as_scored") is False
            else ""
        )
        lines += [
            f"The shipped plan's search-val accuracy during the search (before the fine-tune): "
            f"{s['best_search_val_accuracy']:.4f} (dense: {s['dense_search_val_accuracy']:.4f}).{same}",
            "",
        ]
    lines += _refine_lines(report)
    lines += _finalist_lines(report)
    lines += [
        "## Channels kept per group",
        "",
        "| group | type | channels | kept | keep ratio |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {r['group']} | {r['type']} | {r['channels']} | {r['kept']} | {r['keep_ratio']:.2f} |"
            for r in report["layers"]
        ],
        "",
    ]
    if report["skipped_blocks"]:
        lines += [f"Blocks and layers removed: {', '.join(report['skipped_blocks'])}.", ""]
    lines += [
        "![kept channels per group](keep_ratios.png)",
        "",
        "## Search",
        "",
        "![search curve](search_curve.png)",
        "",
    ]
    if report["search"].get("failed_evaluations"):
        s = report["search"]
        lines += [
            f"**{s['failed_evaluations']} of {s['evaluations']} evaluations failed**; the first: {s['first_failure']}",
            "",
        ]
    faults = report["search"].get("worker_faults") or {}
    if any(faults.values()):
        lines += [
            f"Ray workers: {faults['resubmitted']} plan(s) resubmitted to another worker, {faults['restarts']} "
            f"worker restart(s), {faults['timeouts']} evaluation(s) timed out, {faults['failed']} plan(s) failed on "
            f"every attempt, {faults['lost']} worker(s) lost (each evaluation's attempts are in evaluations.jsonl).",
            "",
        ]
    lines += _pareto_lines(report)
    inputs = report.get("inputs")
    lines += ["## Files", ""]
    if inputs:
        lines += [
            f"Inputs: {inputs['dtype']} tensors of shape ({', '.join(map(str, inputs['shape']))}), preprocessed as "
            f"the `{inputs['dataset']}` dataset of automl-prune; outputs: {inputs['classes']} class logits.",
        ]
        if inputs.get("mean"):
            lines.append(
                f"Preprocessing: pixels scaled to [0, 1], then per channel (x - mean) / std with mean "
                f"{_floats(inputs['mean'])} and std {_floats(inputs['std'])}."
            )
        if inputs.get("class_names"):
            lines.append(
                "Class order (logit index: class): "
                + ", ".join(f"{i}: {name}" for i, name in enumerate(inputs["class_names"]))
                + "."
            )
        lines.append("")
    lines += [f"- `{name}`: {FILES[name]}" for name in report["files"]]
    if report.get("onnx_max_abs_diff") is not None:
        ts = report.get("torchscript_max_abs_diff")
        ts_text = f" and the TorchScript file to {ts:.1e}" if ts is not None else ""
        lines += [
            "",
            f"The ONNX export matches torch to {report['onnx_max_abs_diff']:.1e} (max abs difference on test images, "
            f"onnxruntime){ts_text}; an export that differed by more than {EXPORT_TOLERANCE:g} of the outputs' "
            "scale would not have been written.",
        ]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(report["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _refine_lines(report: dict[str, Any]) -> list[str]:
    """The refinement section: every refined plan's cheap score and its score at each rung."""
    r = report.get("refinement")
    if not r or not r.get("rungs_done"):
        return []
    steps = r["config"]["steps"][: r["rungs_done"]]
    present = {reference_rule(c.get("reference")) for c in r["candidates"]}
    rules = " and ".join(rule for rule in REFINE_RULES if rule in present)
    plural = "s" if " and " in rules else ""
    lines = [
        "## Refinement",
        "",
        f"The search's best distinct plans{f' and the {rules} plan{plural} at the budget' if rules else ''} "
        f"({len(r['candidates'])} plans) were fine-tuned briefly in rounds of successive halving "
        f"(cumulative steps {', '.join(map(str, steps))}; the better half going on), scored on the whole search-val "
        "split; the plan that ships is the best at the last rung (test images are never used to choose)."
        + (
            f" The {rules} plan{plural} ran every rung as the reference the searched plans had to beat."
            if rules
            else ""
        ),
        "",
        "| plan | FLOPs ratio | cheap score | " + " | ".join(f"{s} steps" for s in steps) + " | |",
        "|---:|---:|---:|" + "---:|" * len(steps) + "---|",
    ]
    for i, c in enumerate(r["candidates"]):
        scores = [f"{c['scores'][str(s)]:.4f}" if str(s) in c["scores"] else "" for s in steps]
        ratio = f"{c['flops_ratio']:.3f}" if c.get("flops_ratio") is not None else ""
        mark = ", ".join(
            [
                *([f"{reference_rule(c['reference'])} plan (reference)"] if c.get("reference") else []),
                *(["ships"] if i == r["chosen"] else []),
            ]
        )
        lines.append(f"| {i + 1} | {ratio} | {c['cheap_score']:.4f} | " + " | ".join(scores) + f" | {mark} |")
    return [*lines, "", "![cheap score against refined score](refine.png)", ""]


def _chance_lines(report: dict[str, Any]) -> list[str]:
    """A warning when the dense baseline itself is near chance (its pruned figures then mean little)."""
    chance = report.get("chance_accuracy")
    base = report["baseline"]["test_accuracy"]
    if chance is None or base >= min(2.0 * chance, 0.5 + 0.5 * chance):
        return []
    return [
        f"**Warning:** the dense baseline's test accuracy ({base:.4f}) is near chance ({chance:.4f}): it is not "
        "trained enough for pruning results to mean anything (train longer: --train.epochs, or give a trained "
        "--model.checkpoint).",
        "",
    ]


def _finalist_lines(report: dict[str, Any]) -> list[str]:
    finalists = report.get("finalists") or []
    if not finalists:
        return []
    lines = [
        "## Finalists",
        "",
        "The best distinct plans of the search, measured end to end on the runtime (interleaved with the "
        "baseline); the plan that shipped is the best one whose measurement met the budget.",
        "",
        "| # | search-val acc | FLOPs | predicted ms | measured ms (p10-p90) | error | meets | shipped |",
        "|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for i, f in enumerate(finalists):
        lat = f["latency"]
        pred = f"{f['predicted_ms']:.4g}" if f.get("predicted_ms") is not None else "n/a"
        err = _pct(f["prediction_error"]) if f.get("prediction_error") is not None else "n/a"
        lines.append(
            f"| {i + 1} | {f['accuracy']:.4f} | {f['flops']:,} | {pred} | {lat['median_ms']:.4g} "
            f"({lat['p10_ms']:.4g}-{lat['p90_ms']:.4g}){' NOISY' if f.get('noisy') else ''} | {err} | "
            f"{'yes' if f['meets'] else 'no'} | {'**yes**' if i == report.get('chosen_finalist') else ''} |"
        )
    return [*lines, ""]


def _pareto_lines(report: dict[str, Any]) -> list[str]:
    points = report.get("pareto") or []
    if not points:
        return []
    lines = [
        "## Pareto front",
        "",
        f"Plans of the search no other plan beats on both search-val accuracy and {report.get('pareto_cost')}; "
        "ship another one with `automl-prune prune --checkpoint baseline.pt --plan pareto.json --point N`.",
        "",
        "| point | search-val acc | FLOPs ratio | predicted ms | measured ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        pred = f"{p['predicted_ms']:.4g}" if p.get("predicted_ms") is not None else ""
        meas = f"{p['measured_ms']:.4g}" if p.get("measured_ms") is not None else ""
        lines.append(f"| {p['point']} | {p['accuracy']:.4f} | {p['flops_ratio']:.3f} | {pred} | {meas} |")
    return [*lines, "", "![pareto front](pareto.png)", ""]


def _plot_keep(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    idx = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.5), dpi=120)
    ax.bar(idx, [r["channels"] for r in layers], color="#c8d6e5", label="original")
    ax.bar(idx, [r["kept"] for r in layers], color="#2e86de", label="kept")
    for i, r in enumerate(layers):
        ax.text(i, r["kept"], f"{r['keep_ratio']:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(idx, [r["group"] for r in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(f"{report['model']}: channels kept per group ({report['strategy']})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "keep_ratios.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plot_search(history: list[dict[str, Any]], dense_acc: float | None, strategy: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations = [Evaluation(**h["evaluation"]) for h in history]
    steps = np.arange(1, len(evaluations) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    feasible = [(i, e.accuracy) for i, e in zip(steps, evaluations) if e.feasible and math.isfinite(e.accuracy)]
    infeasible = [(i, e.accuracy) for i, e in zip(steps, evaluations) if not e.feasible and math.isfinite(e.accuracy)]
    if feasible:
        ax.scatter(*zip(*feasible), s=12, alpha=0.6, label="evaluation (feasible)")
    if infeasible:
        ax.scatter(*zip(*infeasible), s=12, alpha=0.6, marker="x", color="grey", label="evaluation (over budget)")
    curve = best_so_far([(None, e) for e in evaluations])
    ax.step(steps, curve, where="post", color="black", lw=1.4, label="best so far")
    if dense_acc is not None:
        ax.axhline(dense_acc, ls="--", lw=1, color="green", label="dense model")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("search-val accuracy (no fine-tune)")
    ax.set_title(f"Search: {strategy}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "search_curve.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_run_report(run_dir: str | Path, config: Config, data: DataSplits) -> dict[str, Any]:
    """Measure the run and write ``report.json``, ``report.md``, ``keep_ratios.png`` and ``search_curve.png``."""
    out = Path(run_dir)
    report = measure_run(out, config, data)
    result = _read_json(out / "result.json")
    _plot_keep(report, out)
    _plot_search(result.get("history", []), report["search"]["dense_search_val_accuracy"], report["strategy"], out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    for line in _chance_lines(report)[:1]:
        logger.warning("%s", line.replace("**", ""))
    return report
