"""Distillation, the model that ships as scored, and refinement of finalists by short fine-tunes (Ray Tune)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import DIGITS_QUICK, cli, command

from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.graph import LayerGraph
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.pipeline import start_from_refinement
from automl_prune.refine import Candidate, RefineConfig, refine
from automl_prune.training import TrainConfig, distillation_loss, train
from automl_prune.types import Budget


def test_distillation_loss_is_lowest_for_the_teachers_own_outputs(trained_cnn, fashion_small) -> None:
    model = trained_cnn.model
    x = fashion_small.search_val.images[:256]
    with torch.no_grad():
        logits = model.eval()(x)
    own = distillation_loss(logits, logits, 4.0).item()
    shuffled = distillation_loss(
        logits, logits[torch.randperm(len(logits), generator=torch.Generator().manual_seed(0))], 4.0
    )
    assert own == pytest.approx(0.0, abs=1e-5)
    assert shuffled.item() > 0.1  # a trained model's outputs differ between images


def test_distillation_needs_a_teacher_and_valid_settings(trained_cnn, fashion_small) -> None:
    model = trained_cnn.model
    with pytest.raises(InvalidValueError, match="teacher"):
        train(model, fashion_small, TrainConfig(epochs=0.01, distill_weight=0.5))
    with pytest.raises(InvalidValueError, match="distill_weight must be in"):
        TrainConfig(distill_weight=1.5)
    with pytest.raises(InvalidValueError, match="distill_temperature"):
        RefineConfig(distill_temperature=0)
    with pytest.raises(InvalidValueError, match="increasing"):
        RefineConfig(steps=(50, 20))


def test_a_distilled_fine_tune_recovers_a_pruned_model(trained_cnn, fashion_small) -> None:
    """Distillation from the dense model trains the pruned student (on real data, short)."""
    import copy

    from automl_prune.pruning import apply

    model = trained_cnn.model
    graph = LayerGraph(model, torch.zeros(1, 1, 28, 28))
    pruned = apply(model, graph.uniform_plan(0.3), "l1", graph=graph)
    before = evaluate_accuracy(pruned, fashion_small.test)
    student = copy.deepcopy(pruned)
    config = TrainConfig(epochs=0.2, lr=0.01, distill_weight=0.7, eval_every_epoch=False, seed=0)
    after = evaluate_accuracy(train(student, fashion_small, config, teacher=model).model, fashion_small.test)
    assert after > before + 0.05


def _candidates(evaluator: Evaluator, graph: LayerGraph) -> list[Candidate]:
    plans = [graph.uniform_plan(k) for k in (0.35, 0.5, 0.7)]
    return [Candidate(p, evaluator.evaluate(p)) for p in plans]


@pytest.mark.slow
def test_refinement_picks_by_the_refined_score_logs_every_rung_and_resumes(
    trained_cnn, fashion_small, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model = trained_cnn.model
    evaluator = Evaluator(model, fashion_small, Budget(flops=0.9), EvaluatorConfig(eval_size=500))
    candidates = _candidates(evaluator, evaluator.graph)
    starts = [evaluator.build(c.plan) for c in candidates]
    config = RefineConfig(top=3, steps=(10, 30), seed=0)
    result = refine(candidates, starts, fashion_small.train, fashion_small.search_val, config, tmp_path)
    saved = json.loads((tmp_path / "refine.json").read_text())
    assert saved["rungs_done"] == 2
    first = [c.scores.get(10) for c in result.candidates]
    assert all(s is not None for s in first)  # every candidate ran the first rung
    survivors = [i for i, c in enumerate(result.candidates) if 30 in c.scores]
    assert len(survivors) == config.survivors(3) == 2
    ranked = sorted(range(3), key=lambda i: (-first[i], i))
    assert sorted(survivors) == sorted(ranked[:2])  # the better half went on
    best = max(survivors, key=lambda i: result.candidates[i].scores[30])
    assert result.chosen == best and saved["chosen"] == best
    assert (tmp_path / "refine.png").stat().st_size > 0
    # the refined score is the fine-tuned model's search-val accuracy: higher than the cheap score here
    assert result.score > result.candidates[best].cheap
    # resuming skips the finished rungs (no Tune experiment runs again)
    rung_dirs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "refine").iterdir()}
    again = refine(
        _candidates(evaluator, evaluator.graph), starts, fashion_small.train, fashion_small.search_val, config, tmp_path
    )
    assert again.chosen == result.chosen and again.score == result.score
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "refine").iterdir()} == rung_dirs
    # the final fine-tune can go on from the shipped plan's weights after its last rung
    pruned = evaluator.build(result.plan)
    start = start_from_refinement(pruned, result.plan, result, fashion_small)
    assert start is not None and start["steps"] == 30
    assert start["search_val_accuracy"] == pytest.approx(result.score, abs=1e-9)
    other = next(c.plan for c in result.candidates if c.plan != result.plan)
    assert start_from_refinement(evaluator.build(other), other, result, fashion_small) is None
    shutil.rmtree(result.checkpoints[result.chosen])  # gone: the fine-tune starts from the pruned model
    with caplog.at_level(logging.WARNING, logger="automl_prune.pipeline"):
        assert start_from_refinement(evaluator.build(result.plan), result.plan, result, fashion_small) is None
    assert "checkpoint of the shipped plan is gone" in caplog.text


def test_the_reference_plan_runs_every_rung_and_ships_only_when_it_leads(trained_cnn, fashion_small) -> None:
    """Successive halving drops searched plans only; the uniform reference reaches the last rung even when last."""
    from automl_prune.refine import Refinement

    evaluator = Evaluator(trained_cnn.model, fashion_small, Budget(flops=0.9), EvaluatorConfig(eval_size=500))
    candidates = _candidates(evaluator, evaluator.graph)  # three searched plans
    reference = Candidate(evaluator.graph.uniform_plan(0.3), evaluator.evaluate(evaluator.graph.uniform_plan(0.3)))
    reference.reference = "uniform"
    refinement = Refinement(RefineConfig(top=3, steps=(50, 150, 450)), [*candidates, reference])
    assert refinement.next_rung() == [0, 1, 2, 3]
    for c, score in zip(refinement.candidates, (0.80, 0.70, 0.75, 0.60)):  # the reference is last after 50 steps
        c.scores[50] = score
    refinement.rungs_done = 1
    assert refinement.next_rung() == [0, 2, 3]  # two of three searched plans go on, and the reference
    for i, score in ((0, 0.85), (2, 0.84), (3, 0.83)):
        refinement.candidates[i].scores[150] = score
    refinement.rungs_done = 2
    assert refinement.next_rung() == [0, 3]
    refinement.candidates[0].scores[450] = 0.86
    refinement.candidates[3].scores[450] = 0.88
    refinement.rungs_done = 3
    refinement.choose()
    assert refinement.chosen == 3 and refinement.score == 0.88  # the rule leads at the last rung: it ships
    refinement.candidates[0].scores[450] = 0.89
    refinement.choose()
    assert refinement.chosen == 0  # a searched plan that beats it ships
    assert [c["reference"] for c in refinement.to_dict()["candidates"]] == ["", "", "", "uniform"]


def test_a_refinement_recorded_with_a_true_false_reference_still_resumes(trained_cnn, fashion_small, tmp_path) -> None:
    """refine.json held ``reference: true`` while the uniform plan was the only reference: it reads as that rule."""
    from automl_prune.refine import REFINE_FILE, Refinement, load_refinement

    evaluator = Evaluator(trained_cnn.model, fashion_small, Budget(flops=0.9), EvaluatorConfig(eval_size=500))
    config = RefineConfig(top=3, steps=(50, 150))
    candidates = _candidates(evaluator, evaluator.graph)
    candidates[2].reference = "uniform"
    for c, score in zip(candidates, (0.70, 0.60, 0.65)):
        c.scores[50] = score
    checkpoint = tmp_path / "rung0_plan0"
    checkpoint.mkdir()
    saved = Refinement(config, candidates, 1, 0, {0: str(checkpoint)}).to_dict()
    for c in saved["candidates"]:
        c["reference"] = bool(c["reference"])  # as the earlier version wrote it
    (tmp_path / REFINE_FILE).write_text(json.dumps(saved))
    fresh = _candidates(evaluator, evaluator.graph)
    fresh[2].reference = "uniform"
    loaded = load_refinement(tmp_path / REFINE_FILE, config, fresh)
    assert loaded.rungs_done == 1 and [c.scores for c in loaded.candidates] == [{50: 0.70}, {50: 0.60}, {50: 0.65}]
    assert loaded.next_rung() == [0, 2]  # the better searched plan and the reference go on
    fresh = _candidates(evaluator, evaluator.graph)
    fresh[2].reference = "global"  # another rule: refined again
    assert load_refinement(tmp_path / REFINE_FILE, config, fresh).rungs_done == 0


def _interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], limit: float = 300) -> str:
    """Send SIGINT once ``ready()`` holds; return the command's stderr (it must have stopped within a minute)."""
    deadline = time.time() + limit
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)[1]


MAIN_JOB = [
    "search", *DIGITS_QUICK, "--model.name", "fashion_cnn", "--search.strategy", "random",
    "--search.evaluations", "10", "--search.refine_top", "3", "--report.latency_rounds", "2",
]  # fmt: skip


@pytest.mark.slow
def test_the_main_job_refines_then_fine_tunes_the_model_it_scored(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # a first rung long enough (seconds) that the Ctrl-C below lands while it runs: with 10 steps the rung
    # could end, and be recorded, between the trial's start and the signal on a fast machine
    flags = ["--search.refine_steps", "40,50", "--finetune.epochs", "0.3", "--finetune.distill_weight", "0.5"]
    # Ctrl-C while a rung runs: Tune stops its trials and the job stops too (it used to go on with the
    # trials that had ended, or fail as if every trial had); the resume runs the unfinished rung again
    proc = subprocess.Popen(command(*MAIN_JOB, *flags, "--out", str(out)), stderr=subprocess.PIPE, text=True)
    stderr = _interrupt_when(proc, lambda: any((out / "refine").glob("rung1_*/*/params.json")))
    assert proc.returncode == 130, stderr
    assert f"automl-prune search --resume {out}" in stderr
    assert not (out / "refine.json").exists() and not (out / "model.pt").exists()
    cli("search", "--resume", str(out))

    refinement = json.loads((out / "refine.json").read_text())
    assert refinement["rungs_done"] == 2
    result = json.loads((out / "result.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    chosen = refinement["candidates"][refinement["chosen"]]
    assert plan == chosen["plan"] and result["refined_score"] == refinement["refined_score"]
    report = json.loads((out / "report.json").read_text())
    # what was exported is what the search scored: same accuracy on the same search-val images
    assert report["pruned_as_scored"] is True
    assert report["pruned_before_finetune_search_val_accuracy"] == pytest.approx(chosen["cheap_score"], abs=1e-9)
    assert report["finetune"]["distill_weight"] == 0.5
    # the fine-tune went on from the shipped plan's weights after the last rung: same score on the same images
    start = report["finetune_refined_start"]
    assert start["steps"] == 50 and start["refined_score"] == refinement["refined_score"]
    assert start["search_val_accuracy"] == pytest.approx(refinement["refined_score"], abs=1e-9)
    md = (out / "report.md").read_text()
    assert "## Refinement" in md and "refine.png" in md and "the one the search scored" in md
    assert "from the refinement's weights after 50 steps" in md
    # the uniform and global plans at the budget ran every rung beside the finalists (search.refine_rules)
    references = {c["reference"]: c for c in refinement["candidates"] if c["reference"]}
    assert set(references) == {"uniform", "global"}
    assert all(set(c["scores"]) == {"40", "50"} for c in references.values())
    assert references["uniform"]["plan"] != references["global"]["plan"]
    assert "uniform plan (reference)" in md and "global plan (reference)" in md
    assert "The uniform and global plans ran every rung as the reference" in md
    assert len(refinement["candidates"]) <= 3 + 2
    # a run stopped after its refinement (no report yet) resumes without refining again
    (out / "report.json").unlink()
    proc = cli("-v", "search", "--resume", str(out))
    assert "rungs already done" in proc.stderr
    assert json.loads((out / "refine.json").read_text()) == refinement


@pytest.mark.slow
def test_the_first_ctrl_c_after_the_refinement_stops_the_job(tmp_path: Path) -> None:
    """Tune's SIGINT handler outlives its run; it is put back, so a Ctrl-C in the final fine-tune is not swallowed."""
    out = tmp_path / "run"
    flags = ["--search.refine_steps", "10", "--finetune.epochs", "200", "--out", str(out)]
    proc = subprocess.Popen(command(*MAIN_JOB, *flags), stderr=subprocess.PIPE, text=True)
    stderr = _interrupt_when(proc, lambda: (out / "refine.json").is_file())
    assert proc.returncode == 130, stderr
    assert f"automl-prune search --resume {out}" in stderr and not (out / "model.pt").exists()


def test_refine_settings_are_validated_from_the_command_line(tmp_path: Path) -> None:
    proc = cli("search", "--search.refine_steps", "100,50", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "search.refine_steps must be increasing" in proc.stderr
    proc = cli("search", "--finetune.distill_weight", "2", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "finetune.distill_weight" in proc.stderr
    proc = cli("finetune", "--checkpoint", "x.pt", "--finetune.distill_weight", "0.5", check=False)
    assert proc.returncode == 2 and "--teacher" in proc.stderr


def test_fitness_steps_distil_from_the_dense_model(trained_cnn, fashion_small) -> None:
    """The evaluator's fitness fine-tune uses the same student loss: with distillation, scores change."""
    model = trained_cnn.model
    plan = LayerGraph(model, torch.zeros(1, 1, 28, 28)).uniform_plan(0.3)
    plain = Evaluator(model, fashion_small, Budget(flops=0.9), EvaluatorConfig(eval_size=500, finetune_steps=10))
    distilled = Evaluator(
        model, fashion_small, Budget(flops=0.9), EvaluatorConfig(eval_size=500, finetune_steps=10, distill_weight=0.9)
    )
    images = fashion_small.search_val.images[:256]
    a, b = plain.build(plan), distilled.build(plan)
    with torch.no_grad():  # the same batches, another loss: other weights, other outputs
        assert not torch.allclose(a(images), b(images), atol=1e-4)
    assert distilled.evaluate(plan).accuracy > 0.3  # still a classifier (chance is 0.1)
