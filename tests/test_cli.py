"""The automl-prune command, run as a user would (subprocess, real exit codes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import cli as run


def test_list_shows_registries() -> None:
    assert "resnet20" in run("list", "models").stdout
    assert "fashion-mnist" in run("list", "datasets").stdout
    assert "l1" in run("list", "criteria").stdout
    configs = run("list", "configs").stdout
    assert "smoke" in configs and "fashion-mnist/resnet20" in configs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["graph", "--model", "resnet21"], "unknown model 'resnet21'"),
        (["train", "--data.dataset", "mnist2", "--out", "x"], "unknown dataset 'mnist2'"),
        (["train", "--data.data_dir", "/nonexistent/dir", "--out", "x"], "/nonexistent/dir"),
        (["search", "--search.evaluations", "0"], "--search.evaluations must be an integer >= 1, got '0'"),
        (["search", "--budget.flops", "-1"], "--budget.flops must be a number > 0"),
        (["search", "--search.bn_recalibration", "maybe"], "--search.bn_recalibration must be true or false"),
        (["search", "--search.evalutions", "3"], "did you mean '--search.evaluations'"),
        (["search", "--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
        (["search", "--search.strategy", "dqn"], "unknown strategy 'dqn'"),
        (["compare", "--compare.seeds", "0,x"], "--compare.seeds must be a list of integers"),
        (["search", "--budget.device", "cuda"], "budget.device is cuda but CUDA is not available here"),
        (["compare", "--compare.seeds", "0,0"], "--compare.seeds must not repeat an entry"),
        (
            ["search", "--report.latency_batch_sizes", "0"],
            "--report.latency_batch_sizes must be a list of integers >= 1",
        ),
        (["search", "--train.epochs", "inf"], "--train.epochs must be a number > 0"),
        (["train", "--model.checkpoint", "x.pt"], "`automl-prune train` does not use --model.checkpoint"),
        (["prune", "--checkpoint", "x.pt", "--budget.latency_ms", "1"], "`automl-prune prune` does not use"),
        (
            ["search", "--resume", "/nonexistent", "--search.evaluations", "3"],
            "config flags other than where it computes (--parallel.cpus_per_worker, --parallel.gpus_per_worker, "
            "--parallel.ray_address, --parallel.task_timeout, --parallel.worker_timeout); got --search.evaluations",
        ),
        (["train", "--search.evaluations", "3"], "`automl-prune train` does not use --search.evaluations"),
        (["export", "--checkpoint", "/nonexistent.pt", "--out", "x"], "does not exist"),
        (["search", "--budget.runtime", "tensorrt"], "--budget.runtime must be one of onnxruntime, torchscript, torch"),
        (["search", "--budget.speedup", "0.5"], "--budget.speedup must be a number >= 1"),
        (["latency", "--artifact", "model.tflite"], "give one ending in .onnx"),
        (["latency", "--artifact", "m.onnx", "--model", "resnet20"], "--artifact measures an exported file as is"),
        (["prune", "--checkpoint", "x.pt", "--point", "-1"], "must be >= 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # in this process (an interpreter and torch's import cost about 3 s per case); the entry point's own
    # exit codes and streams are checked in a subprocess by the test below and throughout the suite
    import logging

    from automl_prune.cli import main

    progress = logging.getLogger("automl_prune.progress")
    monkeypatch.setattr(progress, "handlers", list(progress.handlers))  # main() points it at the captured stderr
    monkeypatch.setattr(progress, "propagate", progress.propagate)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    stderr = capsys.readouterr().err
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_bad_input_from_the_entry_point_is_one_line_and_exit_2() -> None:
    for args, message in (
        (["search", "--search.evaluations", "0"], "must be an integer >= 1"),  # argparse-level
        (["graph", "--model", "resnet21"], "unknown model 'resnet21'"),  # raised inside a command
    ):
        proc = run(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_bad_config_file_names_the_key_and_the_nearest_valid_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget:\n  flop: 0.3\n")
    proc = run("search", "--config", str(bad), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "budget.flop" in proc.stderr and "did you mean 'budget.flops'" in proc.stderr
    bad.write_text("search:\n  evaluations: many\n")
    proc = run("search", "--config", str(bad), check=False)
    assert proc.returncode == 2 and "'search.evaluations'" in proc.stderr and "integer" in proc.stderr


def test_print_config_round_trips(tmp_path: Path) -> None:
    from automl_prune.config import resolve

    printed = run("search", "--config", "configs/smoke.yaml", "--budget.latency_ms", "2", "--print-config").stdout
    (tmp_path / "c.yaml").write_text(printed)
    config = resolve(tmp_path / "c.yaml")
    assert config == resolve("configs/smoke.yaml", {"budget.latency_ms": "2"})
    assert config.budget.latency_ms == 2.0 and config.budget.flops is None  # flags replace the budget terms


def test_compare_refuses_a_directory_holding_a_different_comparison(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 5\n")
    (out / "comparison.md").write_text("# an earlier comparison\n")
    proc = run("compare", "--compare.strategies", "random", "--out", str(out), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds a different run" in proc.stderr and "--overwrite" in proc.stderr
