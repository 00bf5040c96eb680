"""The main job end to end, run as a user runs it: `automl-prune search --config configs/smoke.yaml`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli

from automl_prune.checkpoint import load_checkpoint
from automl_prune.config import resolve
from automl_prune.graph import count_cost
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.measure.latency import measure_latency
from automl_prune.pipeline import load_data

OUTPUTS = (
    "config.yaml",
    "evaluations.jsonl",
    "plan.json",
    "result.json",
    "baseline.pt",
    "model.pt",
    "model.ts",
    "model.onnx",
    "export.json",
    "report.json",
    "report.md",
    "keep_ratios.png",
    "search_curve.png",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = cli("search", "--config", "configs/smoke.yaml", "--out", str(out))
    return out, proc.stdout


@pytest.mark.slow
def test_smoke_run_leaves_every_output(smoke: tuple[Path, str]) -> None:
    out, stdout = smoke
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("keep_ratios.png", "search_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in range(1, 6):
        assert f"[{stage}/5]" in stdout
    assert "budget FLOPs: met" in stdout
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(1, 13))  # smoke.yaml: 12 evaluations
    # the stored config reproduces the run
    assert resolve(out / "config.yaml") == resolve("configs/smoke.yaml")


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(smoke: tuple[Path, str]) -> None:
    import onnxruntime as ort

    out, _ = smoke
    data = load_data(resolve("configs/smoke.yaml"))
    model, _ = load_checkpoint(out / "model.pt")
    images = data.test.images[:256]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    assert logits.shape == (256, 10)
    assert np.abs(logits - expected).max() < 1e-3
    assert (logits.argmax(1) == expected.argmax(1)).mean() > 0.99
    ts = torch.jit.load(str(out / "model.ts"))
    assert torch.allclose(ts(images[:8]), model(images[:8]), atol=1e-5)


@pytest.mark.slow
def test_reported_figures_match_a_remeasurement(smoke: tuple[Path, str]) -> None:
    out, _ = smoke
    config = resolve(out / "config.yaml")
    report = json.loads((out / "report.json").read_text())
    data = load_data(config)
    base, base_info = load_checkpoint(out / "baseline.pt")
    pruned, info = load_checkpoint(out / "model.pt")
    x = base_info.example_inputs()
    for label, model in (("baseline", base), ("pruned", pruned)):
        figures = report[label]
        assert figures["test_accuracy"] == evaluate_accuracy(model, data.test, limit=config.report.test_size)
        cost = count_cost(model, x)
        assert (figures["flops"], figures["params"]) == (cost.flops, cost.params)
        again = measure_latency(model, (1, *x.shape[1:]), runs=20).median_ms
        # latency is noisy; an order-of-magnitude mistake (or the wrong model timed) fails this
        assert 1 / 3 < figures["latency_ms"]["1"] / again < 3, (figures["latency_ms"], again)
    assert set(report["baseline"]["latency_ms"]) == {"1", "64"}
    # the plan in the report is the plan of the checkpoint and of plan.json
    plan = json.loads((out / "plan.json").read_text())
    assert info.plan is not None and info.plan.to_dict() == plan
    kept = {row["group"]: row["kept"] for row in report["layers"]}
    convs = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert list(kept.values()) == convs
    # the budget verdict follows from the measured figures
    (term,) = report["budget"]["terms"]
    assert term["term"] == "flops" and term["measured"] == report["pruned"]["flops"]
    assert term["met"] == (report["pruned"]["flops"] <= 0.5 * report["baseline"]["flops"]) is True
    assert report["budget_met"] is True
    md = (out / "report.md").read_text()
    assert "**met**" in md and f"{report['pruned']['flops']:,}" in md and "![search curve](search_curve.png)" in md
    # the search was real: the fine-tuned model is far above chance and close to the baseline
    assert report["pruned"]["test_accuracy"] > 0.6
    assert report["pruned"]["test_accuracy"] > report["baseline"]["test_accuracy"] - 0.1


@pytest.mark.slow
def test_report_command_remeasures_a_finished_run(smoke: tuple[Path, str]) -> None:
    out, _ = smoke
    before = json.loads((out / "report.json").read_text())
    proc = cli("report", "--run", str(out))
    after = json.loads((out / "report.json").read_text())
    assert "budget FLOPs: met" in proc.stdout
    assert after["pruned"]["test_accuracy"] == before["pruned"]["test_accuracy"]
    assert after["layers"] == before["layers"]


@pytest.mark.slow
def test_the_stored_config_reproduces_the_search(smoke: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = smoke
    again = tmp_path / "again"
    cli("search", "--config", str(out / "config.yaml"), "--search.only", "--out", str(again))
    assert json.loads((again / "plan.json").read_text()) == json.loads((out / "plan.json").read_text())
    first = [json.loads(line)["evaluation"]["accuracy"] for line in (out / "evaluations.jsonl").open()]
    second = [json.loads(line)["evaluation"]["accuracy"] for line in (again / "evaluations.jsonl").open()]
    assert first == second


@pytest.mark.slow
def test_a_different_run_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    quick = ["search", "--config", "configs/smoke.yaml", "--search.only", "--search.evaluations", "3"]
    cli(*quick, "--out", str(out))
    proc = cli(*quick[:-1], "4", "--out", str(out), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "options differ: search.evaluations" in proc.stderr and "--overwrite" in proc.stderr
    cli(*quick[:-1], "4", "--out", str(out), "--overwrite")
    assert len((out / "evaluations.jsonl").read_text().splitlines()) == 4
    assert resolve(out / "config.yaml").search.evaluations == 4
    # a search-only run has nothing to report on, and says what to do instead
    proc = cli("report", "--run", str(out), check=False)
    assert proc.returncode == 2 and "search-only run" in proc.stderr and "automl-prune prune --plan" in proc.stderr
    # --resume with --print-config prints the stored config and runs nothing
    printed = cli("search", "--resume", str(out), "--print-config").stdout
    assert "evaluations: 4" in printed


@pytest.mark.slow
def test_latency_budget_end_to_end(tmp_path: Path) -> None:
    """A CPU latency budget: the report measures the final model and says whether it meets the budget."""
    from automl_prune.models import ModelSpec, build_model

    dense_ms = measure_latency(build_model(ModelSpec("fashion_cnn", 1, 10)), (1, 1, 28, 28), threads=1).median_ms
    limit = round(0.7 * dense_ms, 4)
    out = tmp_path / "latency"
    args = ["search", "--config", "configs/smoke.yaml", "--budget.latency_ms", str(limit), "--budget.threads", "1"]
    proc = cli(*args, "--search.reward", "acc_latency", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    (term,) = report["budget"]["terms"]  # the flag replaced smoke.yaml's FLOPs term
    assert term["term"] == "latency_ms" and term["limit"] == limit and term["batch_size"] == 1
    assert report["machine"]["threads"] == 1
    assert term["measured"] == report["pruned"]["latency_ms"]["1"]
    assert term["met"] == (term["measured"] <= limit)
    assert term["predicted"] is not None and abs(term["prediction_error"]) < 1.0
    md = (out / "report.md").read_text()
    if term["met"]:
        assert "budget latency: met" in proc.stdout and "**met**" in md
    else:
        assert f"missed by {term['margin']:.1%}" in md and "MISSED" in proc.stdout
    # the search's prediction kept the plan inside the budget
    result = json.loads((out / "result.json").read_text())
    assert result["best"]["latency_ms"] <= limit and result["best"]["feasible"]
