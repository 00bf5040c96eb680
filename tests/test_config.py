"""Configs: the shipped files, validation, flags over files, the budget rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from automl_prune.config import OPTIONS, Config, check_names, find_config, from_dict, packaged_configs, resolve
from automl_prune.errors import InvalidValueError, UnknownNameError

CONFIGS = sorted(Path("configs").rglob("*.yaml"))


def test_default_yaml_is_the_embedded_default() -> None:
    assert resolve("configs/default.yaml") == Config() == resolve(None)
    # and it spells out every key, so it documents them all
    data = yaml.safe_load(Path("configs/default.yaml").read_text())

    def keys(mapping: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in mapping.items():
            is_group = isinstance(v, dict) and f"{prefix}{k}" not in OPTIONS  # model.kwargs is a key holding {}
            out |= keys(v, f"{prefix}{k}.") if is_group else {f"{prefix}{k}"}
        return out

    assert keys(data) == set(OPTIONS)
    # and each key's comment is the key's help text (the `--help` of its flag), so the two never drift apart
    stack: list[str] = []
    comments: dict[str, str | None] = {}
    for line in Path("configs/default.yaml").read_text().splitlines():
        m = re.match(r"^( *)([\w-]+):(.*?)(?:  # (.*))?$", line)
        if m:
            stack = [*stack[: len(m.group(1)) // 2], m.group(2)]
            comments[".".join(stack)] = m.group(4)
    assert {k: comments.get(k) for k in OPTIONS} == {k: o.help for k, o in OPTIONS.items()}


def test_configs_by_name_are_the_packaged_files() -> None:
    packaged = packaged_configs()
    assert {"default", "smoke", "latency_cpu", "compare", "cluster", "fashion-mnist/resnet20"} <= set(packaged)
    # the checkout's configs/ is the package's directory: one copy of each file
    assert {p.resolve() for p in CONFIGS} == {p.resolve() for p in packaged.values()}
    assert resolve("smoke") == resolve("configs/smoke.yaml") == resolve("smoke.yaml")
    assert resolve("fashion-mnist/resnet20").model.name == "resnet20"
    assert find_config("configs/latency_cpu.yaml").is_file()


def test_configs_by_name_work_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve("configs/smoke.yaml") == resolve("smoke")  # the docs' spelling, away from the checkout
    (tmp_path / "smoke.yaml").write_text("search:\n  evaluations: 7\n")
    assert resolve("smoke.yaml").search.evaluations == 7  # a file that exists wins over a packaged name
    with pytest.raises(InvalidValueError, match=r"'smok' does not exist .*did you mean smoke"):
        resolve("smok")


def test_ready_configs_cover_the_zoo_on_both_datasets() -> None:
    names = {p.relative_to("configs").as_posix() for p in CONFIGS}
    for model in ("fashion_cnn", "resnet20", "resnet56", "vgg16_bn", "mobilenetv2"):
        assert f"fashion-mnist/{model}.yaml" in names and f"cifar10/{model}.yaml" in names
    assert {"default.yaml", "smoke.yaml", "latency_cpu.yaml", "compare.yaml", "cluster.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to("configs").as_posix())
def test_every_shipped_config_resolves_and_names_exist(path: Path) -> None:
    config = resolve(path)
    check_names(config)
    if path.parent.name in ("fashion-mnist", "cifar10"):
        assert config.model.name == path.stem
        assert config.data.dataset == {"fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}[path.parent.name]
    assert from_dict(config.to_dict()) == config  # what a run directory stores reproduces it


def test_flags_override_the_file_and_lists_parse(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("search:\n  evaluations: 7\n  strategy: ppo\ncompare:\n  seeds: [4, 5]\n")
    config = resolve(file, {"search.evaluations": "9", "compare.strategies": "abc,random", "search.skip_gates": "true"})
    assert (config.search.evaluations, config.search.strategy) == (9, "ppo")
    assert config.compare.strategies == ["abc", "random"] and config.compare.seeds == [4, 5]
    assert config.search.skip_gates is True
    assert resolve(None, {"threads": "null"}).threads is None
    assert resolve(None, {"budget.flops": "3.7e6"}).budget.flops == 3.7e6  # absolute; YAML alone reads a string
    file.write_text("budget:\n  params: 2e4\n")
    assert resolve(file).budget.params == 2e4


def test_budget_terms_of_a_layer_replace_the_layer_below(tmp_path: Path) -> None:
    assert resolve(None, {"budget.latency_ms": "2"}).budget.flops is None
    both = resolve(None, {"budget.latency_ms": "2", "budget.flops": "0.4"}).budget
    assert (both.flops, both.latency_ms) == (0.4, 2.0)
    file = tmp_path / "c.yaml"
    file.write_text("budget:\n  params: 0.3\n")
    from_file = resolve(file).budget
    assert (from_file.flops, from_file.params) == (None, 0.3)
    # a flag that sets no term (device) keeps the file's terms
    assert resolve(file, {"budget.device": "cpu"}).budget.params == 0.3
    with pytest.raises(InvalidValueError, match="the budget has no term"):
        resolve(None, {"budget.flops": "null"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("serch:\n  evaluations: 3\n", "unknown key in .*: 'serch'; did you mean 'search'"),
        ("search:\n  evaluatons: 3\n", "'search.evaluatons'; did you mean 'search.evaluations'"),
        ("search:\n  evaluations: 2.5\n", "'search.evaluations' in .* must be an integer >= 1, got 2.5"),
        ("search:\n  min_keep: 0\n", "'search.min_keep' in .* must be a number > 0 and <= 1"),
        ("budget:\n  device: tpu\n", "'budget.device' in .* must be one of cpu, cuda"),
        ("search:\n  skip_gates: 3\n", "'search.skip_gates' in .* must be true or false"),
        ("search: 3\n", "'search' must be a mapping"),
        ("- a\n- b\n", "must hold a mapping of sections"),
        ("search: [unclosed\n", "is not valid YAML"),
        ("compare:\n  seeds: []\n", "'compare.seeds' in .* must be a list of integers"),
    ],
)
def test_bad_config_files_fail_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(InvalidValueError, match=message):
        resolve(file)


def test_bad_flags_fail_with_the_flag_named() -> None:
    with pytest.raises(InvalidValueError, match="--search.evaluations must be an integer >= 1, got 'ten'"):
        resolve(None, {"search.evaluations": "ten"})
    with pytest.raises(InvalidValueError, match="unknown option 'budget.latency'; did you mean 'budget.latency_ms'"):
        resolve(None, {"budget.latency": "3"})
    with pytest.raises(UnknownNameError, match="unknown strategy 'amc'.*ddpg"):
        check_names(resolve(None, {"search.strategy": "amc"}))


def test_the_wheel_ships_the_configs(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("automl_prune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"automl_prune/configs/{n}.yaml" for n in packaged_configs()} <= names


@pytest.mark.parametrize("value", ["1.5", "2", "999", "2500.5"])
def test_budget_counts_above_one_are_whole_and_sensible(value: str) -> None:
    with pytest.raises(InvalidValueError, match=r"fraction of the dense model in \(0, 1\].*whole count >= 1000"):
        resolve(None, {"budget.flops": value})
    assert resolve(None, {"budget.params": "3.7e6"}).budget.params == 3.7e6
    assert resolve(None, {"budget.flops": "1"}).budget.flops == 1.0  # the dense model's FLOPs


def test_yaml_errors_give_line_and_column_and_duplicates_are_refused(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("search:\n  evaluations: 5\n  evaluations: 7\n")
    with pytest.raises(
        InvalidValueError, match=r"at line 3, column 3: key 'evaluations' is given twice \(the first at line 2\)"
    ):
        resolve(dup)
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  evaluations: [1, 2\nbudget: {}\n")
    with pytest.raises(InvalidValueError, match=r"'.*bad.yaml' is not valid YAML at line 3, column 7"):
        resolve(bad)


def test_booleans_are_not_keep_ratios() -> None:
    from automl_prune.types import Plan

    with pytest.raises(InvalidValueError, match="keep ratio of 'conv1' must be a number"):
        Plan({"conv1": True})


def test_the_reward_is_the_strategys_own_unless_set() -> None:
    from automl_prune.pipeline import evaluator_config_of

    assert Config().search.reward is None and Config().reward_of() == "acc"  # ddpg: AMC's error reward
    n2n = from_dict({"search": {"strategy": "reinforce"}})
    assert n2n.reward_of() == "n2n" and evaluator_config_of(n2n).reward == "n2n"  # N2N's reward
    assert evaluator_config_of(n2n, "uniform").reward == "acc"  # compare: one reward for every entry
    chosen = from_dict({"search": {"strategy": "reinforce", "reward": "acc_log_flops"}})
    assert chosen.reward_of() == "acc_log_flops" and chosen.reward_of("uniform") == "acc_log_flops"


def test_the_static_skip_search_is_named_for_what_it_is(tmp_path: Path) -> None:
    config = from_dict({"search": {"strategy": "static_skip", "static_skip": {"compute_penalty": 0.3}}})
    check_names(config)
    # a run directory written before the rename still loads its options
    old = from_dict({"search": {"skipnet": {"compute_penalty": 0.2}}}, "runs/old/config.yaml")
    assert old.search.static_skip.compute_penalty == 0.2
    with pytest.raises(UnknownNameError, match="now 'static_skip'.*`automl-prune skipnet`"):
        check_names(from_dict({"search": {"strategy": "skipnet"}}))


def test_the_refinement_rules_are_a_list_of_known_rules_and_may_be_empty(tmp_path: Path) -> None:
    assert Config().search.refine_rules == ["uniform", "global"]
    assert resolve(None, {"search.refine_rules": "[]"}).search.refine_rules == []
    assert resolve(None, {"search.refine_rules": "global"}).search.refine_rules == ["global"]
    with pytest.raises(
        InvalidValueError,
        match="refine_rules must be a list of names among uniform, global \\(or \\[\\] for none\\), got 'uniform,random'",
    ):
        resolve(None, {"search.refine_rules": "uniform,random"})
    # a run directory written while the uniform plan was the one reference (a true/false key) still loads
    assert from_dict({"search": {"refine_uniform": True}}, "runs/old/config.yaml").search.refine_rules == ["uniform"]
    assert from_dict({"search": {"refine_uniform": False}}, "runs/old/config.yaml").search.refine_rules == []
    with pytest.raises(InvalidValueError, match="'search.refine_uniform' \\(now 'search.refine_rules'\\) must be true"):
        from_dict({"search": {"refine_uniform": "yes please"}}, "c.yaml")
