"""The README's commands, run exactly as written, in order, in a fresh working directory.

The run is a module fixture: the first test asserts that every block succeeds, and the others check
what the README says the blocks leave behind (the main job, the latency budget, the comparison,
each stage alone), so that the suite runs each documented command once rather than again in
tests of its own.

The blocks use the session's cache, which holds the default baseline kept in tests/data/baselines
(conftest.KEPT_BASELINES): the first block runs as it does for a user the second time, without the
95 s of training that the smoke run and the fixtures already put under test. The first run with an
empty cache is timed in BENCHMARKS.md ("The main job end to end").
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import cli

from automl_prune.checkpoint import load_checkpoint
from automl_prune.compare import _dirname
from automl_prune.graph import LayerGraph, count_cost
from automl_prune.io import write_json
from automl_prune.types import Plan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
PNG = b"\x89PNG\r\n\x1a\n"


def runnable_blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash and python block to run here.

    Left out: the test command itself (this test runs inside it) and the manual install
    (``pip install ... -e``), which ``scripts/setup.sh`` runs on every CI run (checked below).
    """
    return [
        (lang, code)
        for lang, code in FENCE.findall(README)
        if "scripts/test.sh" not in code and not code.startswith("pip install")
    ]


def test_the_manual_install_is_what_setup_runs() -> None:
    (manual,) = [code for _, code in FENCE.findall(README) if code.startswith("pip install")]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert manual.strip() == 'pip install --constraint constraints/cpu.txt -e ".[dev]"'
    assert "CONSTRAINTS=${AUTOML_PRUNE_CONSTRAINTS:-constraints/cpu.txt}" in setup
    assert '--constraint "$CONSTRAINTS" -e ".[dev]"' in setup


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "bash scripts/test.sh"
    assert "```bash\nbash scripts/test.sh\n```" in README


def test_readme_has_the_sections_a_user_needs() -> None:
    for heading in (
        "## Quick start",
        "## Target a deployment budget",
        "## Launch a (distributed) search",
        "## Compare strategies",
        "## Configs",
        "## Each stage alone",
    ):
        assert heading in README
    assert len(runnable_blocks()) >= 6


@dataclass(frozen=True)
class Block:
    """One README block as it ran."""

    number: int
    lang: str
    code: str
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class ReadmeRun:
    """The working directory the blocks ran in and each block's result, up to the first failure."""

    cwd: Path
    blocks: list[Block]

    def block(self, starts_with: str) -> Block:
        """The block whose code starts with ``starts_with`` (it must have run and succeeded)."""
        found = next((b for b in self.blocks if b.code.startswith(starts_with)), None)
        if found is None or found.returncode != 0:
            pytest.fail(f"the README block starting {starts_with!r} did not run or failed (see the test above)")
        return found


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> ReadmeRun:
    """Every runnable README block, in order, in a fresh directory, stopping at the first that fails."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "configs").symlink_to(ROOT / "configs")
    (cwd / "scripts").symlink_to(ROOT / "scripts")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    times = os.environ.get("AUTOML_PRUNE_README_TIMES")  # benchmarks/suite_time.py: each block's wall time
    timed: list[dict] = []
    blocks: list[Block] = []
    for number, (lang, code) in enumerate(runnable_blocks(), 1):
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        timed.append({"number": number, "code": code, "seconds": time.perf_counter() - start})
        if times:
            write_json(Path(times), timed)
        blocks.append(Block(number, lang, code, proc.returncode, proc.stdout, proc.stderr))
        if proc.returncode != 0:
            break
    return ReadmeRun(cwd, blocks)


@pytest.mark.slow
def test_readme_commands_run_as_written(readme: ReadmeRun) -> None:
    for b in readme.blocks:
        assert b.returncode == 0, (
            f"README block {b.number} ({b.lang}) failed with exit {b.returncode}:\n{b.code}\n"
            f"stdout:\n{b.stdout[-3000:]}\nstderr:\n{b.stderr[-3000:]}"
        )
    assert len(readme.blocks) == len(runnable_blocks())
    # what the README says the main job leaves behind
    for name in (
        "report.md",
        "report.json",
        "model.pt",
        "model.ts",
        "model.onnx",
        "keep_ratios.png",
        "search_curve.png",
        "refine.json",
        "refine.png",
    ):
        assert (readme.cwd / "runs" / "search" / name).is_file(), name


@pytest.mark.slow
def test_the_main_job_refines_then_ships_the_model_it_scored(readme: ReadmeRun) -> None:
    readme.block("bash scripts/run.sh")
    out = readme.cwd / "runs" / "search"
    refinement = json.loads((out / "refine.json").read_text())
    result = json.loads((out / "result.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    chosen = refinement["candidates"][refinement["chosen"]]
    assert plan == chosen["plan"] and result["refined_score"] == refinement["refined_score"]
    assert len(refinement["candidates"]) >= 2  # successive halving had more than one plan to choose from
    report = json.loads((out / "report.json").read_text())
    # what was exported is what the search scored: same accuracy on the same search-val images
    assert report["pruned_as_scored"] is True
    assert report["pruned_before_finetune_search_val_accuracy"] == pytest.approx(chosen["cheap_score"], abs=1e-9)
    md = (out / "report.md").read_text()
    assert "## Refinement" in md and "refine.png" in md and "the one the search scored" in md
    assert (out / "refine.png").read_bytes().startswith(PNG)
    # `--resume` of the finished run redoes nothing: the files are those of the run
    resumed = readme.block("automl-prune search --resume runs/search")
    assert json.loads((out / "refine.json").read_text()) == refinement, resumed.stderr[-2000:]


@pytest.mark.slow
def test_the_latency_budget_is_met_by_measurement(readme: ReadmeRun) -> None:
    """`search --config latency_cpu`: latency model, measured finalists, a report that measures the files."""
    block = readme.block("automl-prune search --config latency_cpu")
    out = readme.cwd / "runs" / "latency"
    report = json.loads((out / "report.json").read_text())
    (term,) = report["budget"]["terms"]
    assert term["term"] == "speedup" and term["limit"] == 2.0 and term["batch_size"] == 1
    assert term["runtime"] == "onnxruntime" and report["machine"]["threads"] == 1
    assert term["measured"] == report["speedup"]["1"] >= 2.0
    assert term["met"] is True and report["budget_met"] is True  # the block exited 0: a miss exits 3
    md = (out / "report.md").read_text()
    assert "budget speed-up: met" in block.stdout and "**met**" in md
    # the search predicted with a latency model fitted on measured plans, and measured its finalists
    fitted = json.loads((out / "latency_model.json").read_text())
    assert fitted["runtime"] == "onnxruntime" and fitted["plans"] >= 25 and fitted["threads"] == 1
    finalists = json.loads((out / "finalists.json").read_text())
    chosen = finalists["finalists"][finalists["chosen"]]
    assert chosen["plan"] == json.loads((out / "plan.json").read_text())
    assert all(f["prediction_error"] is not None for f in finalists["finalists"])
    assert finalists["met"] and chosen["meets"] and chosen["measured_speedup"] >= 2.0
    result = json.loads((out / "result.json").read_text())
    assert result["chosen"]["measured_latency_ms"] == pytest.approx(chosen["measured_ms"])
    assert "## Finalists" in md and "## Pareto front" in md
    front = json.loads((out / "pareto.json").read_text())
    assert [p for p in front["points"] if p["measured_ms"]]  # the front ranks the finalists by their measurements
    # another point of the front ships without searching again (the README's `prune --point 0`)
    readme.block("automl-prune prune --checkpoint runs/latency/baseline.pt")
    _, info = load_checkpoint(readme.cwd / "runs" / "cheapest" / "model.pt")
    assert info.plan is not None and info.plan.to_dict() == front["points"][0]["plan"]
    proc = cli("prune", "--checkpoint", str(out / "baseline.pt"), "--plan", str(out / "pareto.json"), check=False)
    assert proc.returncode == 2 and "choose one with --point" in proc.stderr


@pytest.mark.slow
def test_the_comparison_runs_every_strategy_on_every_seed(readme: ReadmeRun) -> None:
    """`compare` with ten strategy entries, two seeds, on two Ray workers: each (entry, seed) a Tune trial."""
    block = readme.block("automl-prune compare --config compare")
    out = readme.cwd / "runs" / "compare"
    labels = re.search(r'--compare.strategies "([^"]+)"', block.code).group(1).split(",")
    rows = {r["strategy"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == set(labels)
    for name, row in rows.items():
        assert int(row["seeds"]) == 2
        assert int(row["evaluations"]) == (1 if name in ("uniform", "global") else 20), name
        assert 0.2 < float(row["best_mean"]) <= 1.0  # twice chance: scored before any fine-tune at 25% FLOPs
        assert float(row["best_flops_ratio"]) <= 0.25 + 1e-9
        assert 1 <= float(row["evals_to_99"]) <= int(row["evaluations"])
    assert float(rows["random"]["best_mean"]) >= float(rows["uniform"]["best_mean"]) - 0.05
    # Tune's own files per trial: one row per evaluation, best so far never drops, TensorBoard events
    for label, row in rows.items():
        for seed in (0, 1):
            trial = out / "trials" / "compare" / _dirname(label, seed)
            progress = list(csv.DictReader((trial / "progress.csv").open()))
            assert [int(r["evaluations"]) for r in progress] == list(range(1, int(row["evaluations"]) + 1))
            best = [float(r["best_accuracy"]) for r in progress]
            assert best == sorted(best)
            assert (trial / "result.json").is_file() and list(trial.glob("events.out.tfevents.*"))
    markdown = (out / "comparison.md").read_text()
    assert all(name in markdown for name in rows) and "best_so_far.png" in markdown
    for plot in ("best_so_far.png", "accuracy_vs_flops.png"):
        data = (out / plot).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


@pytest.mark.slow
def test_each_stage_alone_reuses_the_baseline_and_ships_the_plans_structure(readme: ReadmeRun) -> None:
    """The README's stage commands: train (cached) -> prune -> finetune -> export -> latency -> report."""
    block = readme.block("automl-prune list strategies")
    cwd = readme.cwd
    assert "(cached)" in block.stdout  # `train` with the search's settings reuses the baseline the search trained
    assert "ONNX max |diff|" in block.stdout
    assert "latency on onnxruntime" in block.stdout and "speed-up over dense" in block.stdout
    assert "median ms" in block.stdout
    for name in ("model.pt", "model.ts", "model.onnx"):
        assert (cwd / "runs" / "export" / name).stat().st_size > 0
    # the plan sets the structure, the criterion picks the channels: fpgm's model has the main job's widths
    # (which l1 chose) and other weights
    shipped, _ = load_checkpoint(cwd / "runs" / "search" / "model.pt")
    pruned, info = load_checkpoint(cwd / "runs" / "pruned" / "model.pt")
    assert info.plan.to_dict() == json.loads((cwd / "runs" / "search" / "plan.json").read_text())
    convs = [[m for m in model.modules() if isinstance(m, torch.nn.Conv2d)] for model in (shipped, pruned)]
    assert [c.out_channels for c in convs[0]] == [c.out_channels for c in convs[1]]
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(*convs, strict=True))
    _, tuned = load_checkpoint(cwd / "runs" / "export" / "model.pt")
    assert tuned.meta["finetune"]["test_after"] > 0.8  # half an epoch on Fashion-MNIST from the pruned model
    # a plan naming a group the model lacks is one line and exit 2; what `latency` offers beyond the README's lines
    (cwd / "bad.json").write_text(json.dumps({"keep_ratios": {"features.0": 0.5, "nope": 0.5}}))
    proc = cli("prune", "--checkpoint", str(cwd / "runs/base/model.pt"), "--plan", str(cwd / "bad.json"),
               "--out", str(cwd / "x"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "nope" in proc.stderr and not (cwd / "x").exists()
    # a run's plan is cut at the channel multiple its run scored it at (result.json), not this runtime's default
    base, base_info = load_checkpoint(cwd / "runs" / "base" / "model.pt")
    graph = LayerGraph(base, base_info.example_inputs())
    plan = Plan.uniform(graph.group_names(), 0.4)
    assert all(graph.kept_channels(plan, 4) != graph.kept_channels(plan, m) for m in (8, 16))  # widths that tell
    (cwd / "run4").mkdir()
    (cwd / "run4" / "plan.json").write_text(json.dumps(plan.to_dict()))
    (cwd / "run4" / "result.json").write_text(json.dumps({"round_to": 4}))
    cli("prune", "--checkpoint", str(cwd / "runs/base/model.pt"), "--plan", str(cwd / "run4" / "plan.json"),
        "--out", str(cwd / "x4"))  # fmt: skip
    cut, cut_info = load_checkpoint(cwd / "x4" / "model.pt")
    assert cut_info.round_to == 4 and count_cost(cut, base_info.example_inputs()) == graph.cost(plan, 4)
    exported = str(cwd / "runs" / "export" / "model.pt")
    rebuilt = cli("latency", "--checkpoint", exported, "--rounds", "3", "--threads", "2", "--rebuild", "--plans", "5")
    assert "latency model fitted on 6 measured plans" in rebuilt.stdout and "predicted ms" in rebuilt.stdout
    ts = cli("latency", "--checkpoint", exported, "--runtime", "torchscript", "--rounds", "3").stdout
    assert "latency on torchscript" in ts
