"""Strategy options: declared once per strategy, config keys and flags, validated, listed and stored with the run."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import yaml
from cli_helpers import DIGITS_QUICK, cli

from automl_prune.config import OPTIONS, resolve
from automl_prune.strategy import STRATEGIES, make_strategy
from automl_prune.strategy_options import STRATEGY_OPTIONS


def test_each_strategy_declares_its_options_once_and_its_class_agrees() -> None:
    assert set(STRATEGY_OPTIONS) | {"uniform", "random"} == set(STRATEGIES.names())
    for name, options in STRATEGY_OPTIONS.items():
        signature = inspect.signature(STRATEGIES.get(name).__init__).parameters
        for f in dataclasses.fields(options):
            assert f.name in signature, (name, f.name)
            default = signature[f.name].default
            declared = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if isinstance(default, tuple):
                default = list(default)
            if default is None and declared == {}:  # a mapping argument defaults to None, meaning {}
                default = {}
            assert default == declared, (name, f.name)
            assert f"search.{name}.{f.name}" in OPTIONS
        # every option of the config reaches the strategy object under its own name
        strategy = make_strategy(name, resolve(None).search.options_of(name))
        assert type(strategy) is STRATEGIES.get(name)


def test_options_from_flags_and_files_reach_the_strategy(tmp_path: Path) -> None:
    config = resolve(
        None,
        {
            "search.ddpg.warmup_episodes": "7",
            "search.ddpg.net_arch": "32,32",
            "search.optuna.sampler": "cmaes",
            "search.global.normalizer": "max",
            "search.abc.n_sources": "4",
        },
    )
    ddpg = make_strategy("ddpg", config.search.options_of("ddpg"))
    assert ddpg.warmup_episodes == 7 and ddpg.net_arch == [32, 32]
    assert make_strategy("optuna", config.search.options_of("optuna")).sampler_name == "cmaes"
    assert make_strategy("global", config.search.options_of("global")).normalizer == "max"
    abc = make_strategy("abc", config.search.options_of("abc"), workers=2)
    assert abc.n_sources == 4 and abc.batch_size == 2  # parallel workers still set the batch
    # a YAML file nests them under search.<strategy>, and config.yaml round-trips
    (tmp_path / "c.yaml").write_text("search:\n  reinforce:\n    levels: 5\n  global:\n    criterion: fpgm\n")
    config = resolve(tmp_path / "c.yaml")
    assert config.search.reinforce.levels == 5 and config.search.options_of("global")["criterion"] == "fpgm"
    assert config.to_dict()["search"]["global"]["criterion"] == "fpgm"
    (tmp_path / "round.yaml").write_text(config.to_yaml())
    assert resolve(tmp_path / "round.yaml") == config


def test_a_strategy_option_flag_reaches_the_search_and_the_stored_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = cli(
        "-v",
        "search",
        *DIGITS_QUICK,
        "--search.strategy",
        "ddpg",
        "--search.evaluations",
        "6",
        "--search.ddpg.warmup_episodes",
        "3",
        "--search.ddpg.net-arch",
        "16,16",
        "--search.only",
        "--search.refine_top",
        "0",
        "--out",
        str(out),
    )
    assert "ddpg: 3 warm-up episodes" in proc.stderr
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["search"]["ddpg"]["warmup_episodes"] == 3 and stored["search"]["ddpg"]["net_arch"] == [16, 16]
    assert resolve(out / "config.yaml").search.ddpg.warmup_episodes == 3  # the run reproduces


def test_bad_strategy_options_fail_with_one_line(tmp_path: Path) -> None:
    proc = cli("search", "--search.ddpg.warmup_episode", "3", "--out", str(tmp_path / "a"), check=False)
    assert proc.returncode == 2 and "did you mean '--search.ddpg.warmup_episodes'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "c.yaml").write_text("search:\n  abc:\n    n_source: 4\n")
    proc = cli("search", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "search.abc.n_source" in proc.stderr and "search.abc.n_sources" in proc.stderr
    proc = cli("search", "--search.abc.n_sources", "1", "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode == 2 and "--search.abc.n_sources must be an integer >= 2" in proc.stderr
    proc = cli("search", "--search.optuna.sampler", "grid", "--out", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "one of tpe, cmaes, random, nsga2" in proc.stderr
    # a value only the strategy can judge is refused before any data is loaded or model trained
    proc = cli(
        "search",
        "--search.strategy",
        "global",
        "--search.global.criterion",
        "taylor",
        "--out",
        str(tmp_path / "e"),
        check=False,
    )
    assert proc.returncode == 2 and "search.global:" in proc.stderr and "data-free criterion" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_list_strategies_verbose_shows_every_option_with_its_default() -> None:
    out = cli("list", "strategies", "-v").stdout
    for path in OPTIONS:
        if path.startswith("search.") and path.count(".") == 2:
            assert path in out, path
    assert "search.optuna.sampler" in out and "tpe" in out and "one of tpe, cmaes, random, nsga2" in out
    assert "search.ddpg" not in cli("list", "strategies").stdout  # the short listing stays short


def test_nsga2_from_the_command_line_writes_its_pareto_front(tmp_path: Path) -> None:
    """Optuna's NSGA-II chosen by flag: the run's front (accuracy against FLOPs) is written, plotted, non-dominated."""
    import json

    out = tmp_path / "nsga2"
    cli(
        "search",
        *DIGITS_QUICK,
        "--search.strategy",
        "optuna",
        "--search.optuna.sampler",
        "nsga2",
        "--search.optuna.sampler_kwargs",
        "{population_size: 4}",
        "--search.evaluations",
        "12",
        "--search.only",
        "--search.refine_top",
        "0",
        "--out",
        str(out),
    )
    front = json.loads((out / "pareto.json").read_text())
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    logged = [json.loads(line)["evaluation"] for line in (out / "evaluations.jsonl").read_text().splitlines()]
    feasible = [(e["flops"], e["accuracy"]) for e in logged if e["feasible"]]
    points = [(p["cost"], p["accuracy"]) for p in front["points"]]
    assert points and len(logged) == 12
    for cost, acc in points:  # nothing evaluated beats a front point on both
        assert not any(c <= cost and a >= acc and (c, a) != (cost, acc) for c, a in feasible)
    for cost, acc in feasible:  # and every evaluated plan is matched or beaten by the front
        assert any(c <= cost and a >= acc for c, a in points)
    assert yaml.safe_load((out / "config.yaml").read_text())["search"]["optuna"]["sampler"] == "nsga2"
