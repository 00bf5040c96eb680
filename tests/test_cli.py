"""The automl-prune command, run as a user would (subprocess, real exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "automl_prune.cli", *args], capture_output=True, text=True, env=os.environ.copy()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_list_shows_registries() -> None:
    assert "resnet20" in run("list", "models").stdout
    assert "fashion-mnist" in run("list", "datasets").stdout
    assert "l1" in run("list", "criteria").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["graph", "--model", "resnet21"], "unknown model 'resnet21'"),
        (["train", "--dataset", "mnist2", "--out", "x"], "unknown dataset 'mnist2'"),
        (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/dir", "--out", "x"], "/nonexistent/dir"),
        (["export", "--checkpoint", "/nonexistent.pt", "--out", "x"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_flag_value_exits_2() -> None:
    proc = run("pipeline", "--flops", "1.5", check=False)
    assert proc.returncode == 2 and "fraction in (0, 1]" in proc.stderr


@pytest.mark.slow
def test_train_prune_finetune_export_latency_workflow(tmp_path: Path) -> None:
    """Each stage alone on the real digits set: train -> prune (plan file) -> finetune -> export -> latency."""
    common = ["--dataset", "digits", "--seed", "0"]
    run("train", "--model", "fashion_cnn", *common, "--epochs", "4", "--out", str(tmp_path / "base"))
    ckpt = tmp_path / "base" / "model.pt"
    again = run("train", "--model", "fashion_cnn", *common, "--epochs", "4", "--out", str(tmp_path / "base"))
    assert "(cached)" in again.stdout

    plan = {"keep_ratios": {"features.0": 0.5, "features.4": 0.5, "features.8": 0.5}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run(
        "prune",
        "--checkpoint",
        str(ckpt),
        "--plan",
        str(tmp_path / "plan.json"),
        *common,
        "--out",
        str(tmp_path / "pruned"),
    )
    bad = {"keep_ratios": {"features.0": 0.5, "nope": 0.5}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    proc = run(
        "prune",
        "--checkpoint",
        str(ckpt),
        "--plan",
        str(tmp_path / "bad.json"),
        "--out",
        str(tmp_path / "x"),
        check=False,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr

    run(
        "finetune",
        "--checkpoint",
        str(tmp_path / "pruned" / "model.pt"),
        *common,
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "ft"),
    )
    out = run("export", "--checkpoint", str(tmp_path / "ft" / "model.pt"), "--out", str(tmp_path / "export")).stdout
    assert "ONNX max |diff|" in out
    for name in ("model.pt", "model.ts", "model.onnx"):
        assert (tmp_path / "export" / name).stat().st_size > 0

    from automl_prune.checkpoint import load_checkpoint

    model, info = load_checkpoint(tmp_path / "export" / "model.pt")
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64]
    assert info.meta["finetune"]["test_after"] > 0.5

    lat = run("latency", "--checkpoint", str(tmp_path / "export" / "model.pt"), "--runs", "10", "--threads", "1").stdout
    assert "predicted ms (LUT)" in lat


@pytest.mark.slow
def test_pipeline_prints_table_and_exports(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run(
        "pipeline",
        "--dataset",
        "digits",
        "--epochs",
        "8",
        "--batch-size",
        "32",
        "--finetune-epochs",
        "2",
        "--threads",
        "2",
        "--out",
        str(out),
    )
    assert "pruned + fine-tuned" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0.47 <= summary["pruned + fine-tuned"]["flops"] / summary["baseline"]["flops"] <= 0.53
    assert summary["onnx_max_abs_diff"] < 1e-4
    assert summary["baseline"]["test_accuracy"] > 0.85
    for name in ("model.pt", "model.ts", "model.onnx", "plan.json"):
        assert (out / name).is_file()
