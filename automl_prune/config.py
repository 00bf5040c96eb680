"""Run configuration: one typed, validated tree shared by config files and command-line flags.

A config is a YAML mapping of sections (``model``, ``data``, ``train``, ``budget``,
``search``, ``prune``, ``finetune``, ``parallel``, ``compare``, ``gates``, ``report``) plus a few
top-level keys (``seed``, ``threads``, ``device``, ``amp``, ``cache_dir``). Files give only what differs from the
defaults below (the packaged ``default`` config, ``configs/default.yaml``, spells them out; a
config is given by path or by the name of a packaged one: ``--config smoke``). Every key ``a.b`` is also
the command-line flag ``--a.b`` (``--budget.flops 0.4``, ``--search.strategy ppo``), and
flags override the file.

Rules:

- Unknown keys are rejected with the key's name and the nearest valid one.
- Values are checked for type and range; a bad one is reported as one line naming it.
- Several files may be given; each is a layer over the one before, and flags come last.
- Budget terms (``flops``, ``params``, ``latency_ms``, ``speedup``) given by a layer (a file, or the
  flags) replace the terms of the layer below: ``--budget.latency_ms 2`` on top of the
  default 50%-FLOPs budget gives a latency-only budget. Give both to combine them.

:func:`resolve` builds a :class:`Config` from a file and flags; :meth:`Config.to_dict` is
what a run directory stores (``config.yaml``), and a run is reproduced with
``automl-prune search --config RUN/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from automl_prune.errors import InvalidValueError
from automl_prune.fields import opt as _opt
from automl_prune.strategy_options import (
    STRATEGY_OPTIONS,
    ABCOptions,
    DDPGOptions,
    GlobalOptions,
    OptunaOptions,
    PPOOptions,
    ReinforceOptions,
    StaticSkipOptions,
    options_of,
    split_top_level,
    split_variant,
)

logger = logging.getLogger(__name__)

BUDGET_TERMS = ("flops", "params", "latency_ms", "speedup")
RUNTIME_NAMES = ("onnxruntime", "torchscript", "torch")
"""The registered runtimes (kept equal to :data:`automl_prune.runtimes.RUNTIMES` by a test)."""
REFINE_RULES = ("uniform", "global")
"""The rules whose plan can run every refinement rung as a reference (``search.refine_rules``)."""


@dataclass
class ModelSection:
    """The dense model to prune."""

    name: str = _opt("fashion_cnn", "zoo name, tv:NAME or package.module:factory (see `list models`)")
    checkpoint: str | None = _opt(None, "a dense automl-prune checkpoint to prune instead of training `name`")
    weights: str | None = _opt(
        None,
        "trained weights of `name` (a state_dict file, or a checkpoint dict holding one under state_dict, "
        "model_state_dict, model, net or weights) to prune instead of training it",
    )
    kwargs: dict[str, Any] = _opt({}, "keyword arguments of the model's factory (a mapping, e.g. {width: 2})")


@dataclass
class DataSection:
    """The dataset and its splits."""

    dataset: str = _opt("fashion-mnist", "dataset name (see `list datasets`)")
    data_dir: str | None = _opt(None, "directory holding the dataset's files")
    val_size: int | None = _opt(None, "search-val images held out of train (default: the dataset's)", ge=1)
    image_size: int | None = _opt(None, "resize images to this square size", ge=8)


@dataclass
class TrainSection:
    """Training of the dense baseline (cached by everything that determines it)."""

    epochs: float = _opt(3.0, "epochs (fractions allowed)", gt=0)
    lr: float = _opt(0.1, "peak learning rate (SGD, cosine schedule)", gt=0)
    batch_size: int = _opt(128, "mini-batch size", ge=1)
    weight_decay: float = _opt(5e-4, "L2 weight decay", ge=0)
    bn_l1: float = _opt(0.0, "network-slimming L1 penalty on BatchNorm scales", ge=0)


@dataclass
class BudgetSection:
    """The deployment budget: any of FLOPs, parameters and latency, and where the model runs."""

    flops: float | None = _opt(
        0.5, "FLOPs (MACs) limit: fraction of the dense model in (0, 1], or a whole count >= 1000", gt=0, count=True
    )
    params: float | None = _opt(None, "parameter limit: fraction in (0, 1], or a whole count >= 1000", gt=0, count=True)
    latency_ms: float | None = _opt(None, "latency limit in ms on `runtime` and `device` at `batch_size`", gt=0)
    speedup: float | None = _opt(None, "minimum speed-up over the dense model on `runtime` (e.g. 1.6)", ge=1)
    runtime: str = _opt("onnxruntime", "runtime the model ships in and latency is measured on", choices=RUNTIME_NAMES)
    device: str = _opt("cpu", "device the model runs on", choices=("cpu", "cuda"))
    batch_size: int = _opt(1, "batch size of the latency budget", ge=1)
    threads: int | None = _opt(None, "intra-op threads of the runtime (default: torch's)", ge=1)


@dataclass
class SearchSection:
    """How plans are searched and scored."""

    strategy: str = _opt("ddpg", "search strategy (see `list strategies`)")
    evaluations: int = _opt(100, "evaluation budget of the search", ge=1)
    reward: str | None = _opt(
        None, "reward (see `list rewards`); default: the strategy's own (n2n for reinforce, acc for the others)"
    )
    eval_size: int = _opt(2000, "search-val images scored per plan", ge=1)
    bn_recalibration: bool = _opt(True, "re-estimate BN statistics before scoring (adaptive BN)")
    recalibration_batches: int = _opt(8, "training batches for the BN re-estimation", ge=1)
    min_keep: float = _opt(0.2, "smallest keep ratio of any group", gt=0, le=1)
    skip_gates: bool = _opt(
        False, "also search which blocks to remove (identity-shortcut residual blocks, shape-preserving plain layers)"
    )
    fitness_finetune_steps: int = _opt(0, "SGD steps on each pruned model before scoring it (0 = off)", ge=0)
    criterion: str | None = _opt(None, "criterion used when scoring plans (default: prune.criterion)")
    latency_plans: int = _opt(24, "plans measured on the runtime to fit the latency model (latency budgets)", ge=3)
    finalists: int = _opt(8, "best distinct plans measured end to end before one ships (latency budgets)", ge=0)
    latency_margin: float = _opt(
        0.05, "search against a latency limit this much tighter than the budget (headroom for noise)", ge=0, le=0.5
    )
    refine_top: int = _opt(
        8, "best distinct plans fine-tuned briefly in rounds of successive halving before one ships (0 = off)", ge=0
    )
    refine_steps: list[int] = _opt(
        [50, 150, 450], "cumulative fine-tune steps at each refinement rung (the better half goes on)", ge=1
    )
    refine_rules: list[str] = _opt(
        ["uniform", "global"],
        "rules whose plan at the budget runs every refinement rung beside the finalists and ships if none beats it "
        "([] = none)",
        choices=REFINE_RULES,
        empty=True,
    )
    only: bool = _opt(False, "stop after the search (plan.json, result.json): no prune, fine-tune or report")
    init_policy: str | None = _opt(
        None,
        "a run directory (or its policy.pt) whose learned policy this search starts from (ddpg, ppo, reinforce, "
        "static_skip: the same strategy and model family, e.g. another budget)",
    )
    ddpg: DDPGOptions = field(default_factory=DDPGOptions)
    ppo: PPOOptions = field(default_factory=PPOOptions)
    reinforce: ReinforceOptions = field(default_factory=ReinforceOptions)
    static_skip: StaticSkipOptions = field(default_factory=StaticSkipOptions)
    abc: ABCOptions = field(default_factory=ABCOptions)
    optuna: OptunaOptions = field(default_factory=OptunaOptions)
    global_: GlobalOptions = field(default_factory=GlobalOptions, metadata={"key": "global"})

    def options_of(self, strategy: str) -> dict[str, Any]:
        """The options of ``strategy`` (``search.<strategy>.*``) as its keyword arguments; {} if it has none."""
        if strategy not in STRATEGY_OPTIONS:
            return {}
        return options_of(getattr(self, _ATTRIBUTE.get(f"search.{strategy}", strategy)))


@dataclass
class PruneSection:
    """How the chosen plan is cut out of the dense model."""

    criterion: str = _opt("l1", "importance criterion (see `list criteria`)")
    round_to: int | None = _opt(
        None, "round kept channel counts to a multiple of this (default: what the runtime is fast at)", ge=1
    )
    criterion_batches: int = _opt(8, "search-val batches given to data-driven criteria", ge=1)


@dataclass
class FinetuneSection:
    """Fine-tuning of the pruned model (best epoch on search-val kept)."""

    epochs: float = _opt(1.0, "epochs (fractions allowed; 0 = no fine-tune)", ge=0)
    lr: float = _opt(0.01, "peak learning rate", gt=0)
    batch_size: int = _opt(128, "mini-batch size", ge=1)
    weight_decay: float = _opt(5e-4, "L2 weight decay", ge=0)
    distill_weight: float = _opt(
        0.0,
        "weight of distillation from the dense model (soft targets) in every fine-tune: the final one, "
        "refinement rungs and fitness_finetune_steps (0 = labels only)",
        ge=0,
        le=1,
    )
    distill_temperature: float = _opt(4.0, "softmax temperature of the distillation term", gt=0)
    from_refinement: bool = _opt(
        True,
        "start from the shipped plan's weights after its last refinement rung, its steps kept (false: from the "
        "pruned model as the search scored it)",
    )


@dataclass
class ParallelSection:
    """Parallel evaluation on Ray."""

    workers: int = _opt(1, "parallel evaluation workers (searches at once for `compare`)", ge=1)
    cpus_per_worker: int = _opt(1, "CPUs (and torch threads) per Ray worker", ge=1)
    gpus_per_worker: float = _opt(0.0, "GPU fraction per Ray worker", ge=0)
    ray_address: str | None = _opt(None, "join an existing Ray cluster (HOST:PORT or auto)")
    task_timeout: float = _opt(600.0, "seconds one evaluation may run on a worker before it is resubmitted", gt=0)
    worker_timeout: float = _opt(120.0, "seconds without any live worker before the search stops (resumable)", gt=0)


@dataclass
class CompareSection:
    """Strategy comparison on equal budgets (`automl-prune compare`)."""

    strategies: list[str] = _opt(
        ["ddpg", "ppo", "reinforce", "abc", "optuna", "random", "uniform", "global"], "strategies to compare"
    )
    seeds: list[int] = _opt([0, 1, 2], "search seeds, the same for every strategy", ge=0)


@dataclass
class GatesSection:
    """Dynamic SkipNet (`automl-prune skipnet`): per-input skip gates on the residual blocks, mean FLOPs <= budget.flops."""

    pretrain_steps: int = _opt(100, "steps of supervised pre-training with soft gates", ge=0)
    rl_steps: int = _opt(400, "steps of hybrid RL: sampled hard gates (REINFORCE) plus the supervised loss", ge=0)
    lr: float = _opt(0.05, "SGD learning rate of the gates", gt=0)
    network_lr_scale: float = _opt(0.1, "learning rate of the network relative to the gates' (0 freezes it)", ge=0)
    batch_size: int = _opt(128, "mini-batch size", ge=2)
    compute_weight: float = _opt(
        2.0, "weight of the FLOPs share in the reward (SkipNet's alpha); the threshold then meets budget.flops", ge=0
    )
    dual_lr: float = _opt(
        0.0, "step of a dual-ascent adjustment of compute_weight towards budget.flops (0: fixed)", ge=0
    )
    hidden: int = _opt(16, "width of each gate's hidden layer", ge=1)
    latency_images: int = _opt(200, "test images timed one at a time (batch 1) for the latency comparison", ge=1)


@dataclass
class ReportSection:
    """What the final report measures."""

    latency_batch_sizes: list[int] = _opt([1, 64], "batch sizes whose latency is measured end to end", ge=1)
    latency_rounds: int = _opt(5, "interleaved rounds per latency measurement (runs per round adapt to speed)", ge=2)
    test_size: int | None = _opt(None, "test images scored (default: the whole test split)", ge=1)


@dataclass
class Config:
    """A whole run's configuration (see the module docstring)."""

    seed: int = _opt(0, "seed of data splits, initialisation, batch order and the search", ge=0)
    threads: int | None = _opt(None, "torch CPU threads (default: all)", ge=1)
    amp: bool = _opt(True, "bfloat16 mixed precision for training and scoring on CUDA (no effect on the CPU)")
    device: str = _opt(
        "auto",
        "where training, fine-tuning, scoring and Ray workers compute: auto (cuda when available), cpu, cuda or cuda:N",
    )
    cache_dir: str | None = _opt(None, "cache of baselines and latency tables (default $AUTOML_PRUNE_CACHE)")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    search: SearchSection = field(default_factory=SearchSection)
    prune: PruneSection = field(default_factory=PruneSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    compare: CompareSection = field(default_factory=CompareSection)
    gates: GatesSection = field(default_factory=GatesSection)
    report: ReportSection = field(default_factory=ReportSection)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what ``config.yaml`` holds), nested by section."""
        return _as_dict(self)

    def to_yaml(self) -> str:
        """The config as YAML, loadable by :func:`resolve`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def scoring_criterion(self) -> str:
        """The criterion used to score plans during the search."""
        return self.search.criterion or self.prune.criterion

    def reward_of(self, strategy: str | None = None) -> str:
        """The reward plans are scored with: ``search.reward``, else ``strategy``'s own.

        Args:
            strategy: The strategy whose own reward applies when ``search.reward`` is unset
                (default ``search.strategy``); ``compare`` passes ``"uniform"`` so that every
                strategy it compares is scored with one reward.
        """
        if self.search.reward is not None:
            return self.search.reward
        from automl_prune.strategy import STRATEGIES

        return str(STRATEGIES.get(strategy or self.search.strategy).default_reward)


def _key(f: dataclasses.Field[Any]) -> str:
    """A field's config key (its name, unless it declares another: ``global_`` is ``global``)."""
    return str(f.metadata.get("key", f.name))


def _as_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[_key(f)] = _as_dict(value)
        else:
            out[_key(f)] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
    return out


# --------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Option:
    """One config key: its dotted path, type and limits."""

    path: str
    type: Any
    default: Any
    help: str
    limits: Mapping[str, Any]

    @property
    def flag(self) -> str:
        """The command-line flag of this key."""
        return f"--{self.path}"

    @property
    def takes(self) -> str:
        """What values the key takes, in words (``an integer >= 1 (or null)``)."""
        return _describe(self)


_GROUPS: list[str] = []
"""Every dotted path holding a mapping of keys (``search``, ``search.ddpg``), in declaration order."""
_ATTRIBUTE: dict[str, str] = {}
"""Dotted path -> attribute name, where they differ (``search.global`` -> ``global_``)."""


def _options(cls: type, prefix: str = "") -> list[Option]:
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in fields(cls):
        path = f"{prefix}{_key(f)}"
        if _key(f) != f.name:
            _ATTRIBUTE[path] = f.name
        if dataclasses.is_dataclass(hints[f.name]):
            _GROUPS.append(path)
            out.extend(_options(hints[f.name], f"{path}."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        limits = {k: v for k, v in f.metadata.items() if k not in ("help", "key")}
        out.append(Option(path, hints[f.name], default, f.metadata.get("help", ""), limits))
    return out


OPTIONS: dict[str, Option] = {o.path: o for o in _options(Config)}
"""Every config key by dotted path."""
GROUPS: tuple[str, ...] = tuple(_GROUPS)
"""Every dotted path that holds a mapping of keys: the sections and the strategies' options (``search.ddpg``)."""


def options_for(sections: tuple[str, ...] | None = None, top_level: tuple[str, ...] = ()) -> list[Option]:
    """The options of some sections (all when None) and some top-level keys."""
    return [
        o
        for o in OPTIONS.values()
        if ("." not in o.path and o.path in top_level)
        or ("." in o.path and (sections is None or o.path.split(".")[0] in sections))
    ]


def _nearest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def unknown_key_error(key: str, where: str = "config key") -> InvalidValueError:
    """The error for an unknown dotted key, naming the nearest valid one."""
    candidates = list(OPTIONS) + list(GROUPS)
    return InvalidValueError(f"unknown {where} '{key}'{_nearest(key, candidates)}")


# --------------------------------------------------------------------------- values
def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _describe(option: Option) -> str:
    tp, optional = _base_type(option.type)
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        text = "a list of " + ("integers" if inner is int else "names")
    elif typing.get_origin(tp) is dict:
        text = "a mapping of names to values (YAML, e.g. {width: 2})"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]
    limits = option.limits
    if "choices" in limits:
        listed = ", ".join(limits["choices"])
        text = f"a list of names among {listed}" if typing.get_origin(tp) is list else f"one of {listed}"
    if limits.get("empty"):
        text += " (or [] for none)"
    bounds = []
    if "gt" in limits:
        bounds.append(f"> {limits['gt']:g}")
    if "ge" in limits:
        bounds.append(f">= {limits['ge']:g}")
    if "lt" in limits:
        bounds.append(f"< {limits['lt']:g}")
    if "le" in limits:
        bounds.append(f"<= {limits['le']:g}")
    if bounds:
        text += " " + " and ".join(bounds)
    return text + (" (or null)" if optional else "")


def _parse_text(text: str, tp: Any) -> Any:
    """A command-line string as the value YAML would give for type ``tp``."""
    if tp is str:
        return None if text in ("null", "none", "None", "~") else text
    if typing.get_origin(tp) is dict:
        return yaml.safe_load(text) if text.strip() else {}
    if typing.get_origin(tp) is list:
        stripped = text.strip()
        if stripped.startswith("["):
            return yaml.safe_load(stripped)
        items = split_top_level(stripped)  # "ddpg,ddpg(warmup_episodes=10,noise_sigma=0.5)" is two entries
        inner = typing.get_args(tp)[0]
        if inner is int:
            return [yaml.safe_load(t) for t in items]
        return items
    return yaml.safe_load(text) if text.strip() else text


def check_value(option: Option, value: Any, name: str | None = None) -> Any:
    """Validate (and normalise) one value of ``option``.

    Args:
        option: The key.
        value: A YAML value, or a command-line string (parsed first).
        name: How to name the key in errors (default ``config key 'a.b'``).

    Raises:
        InvalidValueError: Wrong type or out of range, naming the key and what it takes.
    """
    label = name or f"config key '{option.path}'"
    tp, optional = _base_type(option.type)
    raw = value
    if isinstance(value, str) and tp is not str:
        try:
            value = _parse_text(value, tp)
        except yaml.YAMLError:
            raise InvalidValueError(f"{label} must be {_describe(option)}, got {raw!r}") from None
    elif isinstance(value, str) and tp is str:
        value = _parse_text(value, tp) if name and name.startswith("--") else value
    if value is None:
        if optional:
            return None
        raise InvalidValueError(f"{label} must be {_describe(option)}, got null")
    bad = InvalidValueError(f"{label} must be {_describe(option)}, got {raw!r}")
    if isinstance(value, str) and tp in (int, float):  # YAML 1.1 reads 3.7e6 (no exponent sign) as a string
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            raise bad from None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise bad
    elif typing.get_origin(tp) is dict:
        if not isinstance(value, Mapping) or any(not isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    elif typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, list) or (not value and not option.limits.get("empty")):
            raise bad
        if inner is int and any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise bad
        if inner is str:
            if any(not isinstance(v, (str, int)) for v in value):
                raise bad
            value = [str(v) for v in value]
        if "ge" in option.limits and any(v < option.limits["ge"] for v in value):
            raise bad
        if "choices" in option.limits and any(v not in option.limits["choices"] for v in value):
            raise bad
        if not option.limits.get("repeat") and len(set(value)) != len(value):
            raise InvalidValueError(f"{label} must not repeat an entry, got {raw!r}")
        return value
    limits = option.limits
    if "choices" in limits and value not in limits["choices"]:
        raise bad
    if ("gt" in limits and not value > limits["gt"]) or ("ge" in limits and not value >= limits["ge"]):
        raise bad
    if ("lt" in limits and not value < limits["lt"]) or ("le" in limits and not value <= limits["le"]):
        raise bad
    if limits.get("count") and value > 1 and (value != int(value) or value < MIN_COUNT):
        raise InvalidValueError(
            f"{label} must be a fraction of the dense model in (0, 1] (e.g. 0.5) or a whole count >= {MIN_COUNT} "
            f"(e.g. 3.7e6), got {raw!r}"
        )
    return value


MIN_COUNT = 1000
"""Smallest absolute FLOPs or parameter count a budget takes (a larger value is a count, not a fraction)."""


# --------------------------------------------------------------------------- building
RENAMED_GROUPS = {"search.skipnet": "search.static_skip"}
"""Config groups under a former name (run directories written before the rename still load)."""
REPLACED_KEYS: dict[str, tuple[str, Callable[[bool], Any]]] = {
    "search.refine_uniform": ("search.refine_rules", lambda on: ["uniform"] if on else []),
}
"""Former true/false keys, each with the key that replaced it and the value it means there (old runs still load)."""


def _flatten(data: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as {dotted key: value}, rejecting unknown keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in RENAMED_GROUPS:
            logger.info("%s: '%s' is now '%s'", source, path, RENAMED_GROUPS[path])
            path = RENAMED_GROUPS[path]
        if path in REPLACED_KEYS:
            path, value = _replaced(path, value, source)
        if path in GROUPS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise InvalidValueError(f"{source}: '{path}' must be a mapping of its keys, got {value!r}")
            flat.update(_flatten(value, source, f"{path}."))
        elif path in OPTIONS:
            flat[path] = value
        else:
            raise unknown_key_error(path, f"key in {source}:")
    return flat


def _replaced(path: str, value: Any, source: str) -> tuple[str, Any]:
    """A former key's (true/false) value as the key that replaced it and its value there."""
    new, convert = REPLACED_KEYS[path]
    if not isinstance(value, bool):
        raise InvalidValueError(f"{source}: '{path}' (now '{new}') must be true or false, got {value!r}")
    logger.info("%s: '%s: %s' is now '%s: %s'", source, path, str(value).lower(), new, convert(value))
    return new, convert(value)


def _apply(values: dict[str, Any], layer: dict[str, Any]) -> None:
    """Put one layer's (already validated) values over ``values``, with the budget rule."""
    if any(f"budget.{t}" in layer for t in BUDGET_TERMS):
        for term in BUDGET_TERMS:
            values[f"budget.{term}"] = None
    values.update(layer)


def _defaults() -> dict[str, Any]:
    """{dotted key: default value} of every key (lists copied, so a config never shares one)."""
    return {o.path: list(o.default) if isinstance(o.default, list) else o.default for o in OPTIONS.values()}


def _build(values: dict[str, Any]) -> Config:
    config = Config()
    for path, value in values.items():
        target: Any = config
        *parents, leaf = path.split(".")
        for i, p in enumerate(parents):
            target = getattr(target, _ATTRIBUTE.get(".".join(parents[: i + 1]), p))
        setattr(target, leaf, value)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' is given twice (the first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def packaged_configs() -> dict[str, Path]:
    """The configs shipped with the package, by name (``smoke``, ``fashion-mnist/resnet20``, ...)."""
    root = Path(__file__).resolve().parent / "configs"
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def config_summary(path: Path) -> str:
    """The first sentence of a config file's leading comment (what it is for)."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
        if words[-1].endswith((".", ":")):
            break
    text = " ".join(w for w in words if w)
    return text.split(". ")[0].rstrip(".:") + ("." if text else "")


def find_config(name: str | os.PathLike[str]) -> Path:
    """A config by path, or by the name of a packaged config (``smoke``, ``fashion-mnist/resnet20``).

    A path that exists wins; otherwise a name (with or without ``.yaml``, or a path ending in
    ``configs/NAME.yaml``, as the docs write them) is looked up among :func:`packaged_configs`.

    Raises:
        InvalidValueError: Neither a file nor a packaged config, naming the nearest packaged ones.
    """
    p = Path(name)
    if p.exists():
        return p
    packaged = packaged_configs()
    text = p.as_posix().removesuffix(".yaml").removesuffix(".yml")
    key = text.split("configs/", 1)[1] if "configs/" in text else text
    if key in packaged:
        return packaged[key]
    near = difflib.get_close_matches(key, list(packaged), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise InvalidValueError(
        f"config file '{p}' does not exist and is not a packaged config{hint} "
        "(`automl-prune list configs` shows the packaged ones)"
    )


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file as validated {dotted key: value}; ``path`` may name a packaged config.

    Raises:
        InvalidValueError: Missing file, invalid YAML, not a mapping, unknown keys, bad values.
    """
    p = find_config(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InvalidValueError(f"config file '{p}' does not exist") from None
    except IsADirectoryError:
        raise InvalidValueError(f"config file '{p}' is a directory; give a .yaml file") from None
    except UnicodeDecodeError:
        raise InvalidValueError(f"config file '{p}' is not UTF-8 text; give a YAML file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidValueError(f"config file '{p}' is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidValueError(f"config file '{p}' must hold a mapping of sections, got {type(data).__name__}")
    flat = _flatten(data, f"'{p}'")
    return {k: check_value(OPTIONS[k], v, f"'{k}' in '{p}'") for k, v in flat.items()}


def resolve(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then the file(s) at ``path`` (each over the one before), then ``overrides``.

    ``overrides`` maps dotted keys to values or to flag text (``"0.5"``, ``"true"``, ``"a,b"``).

    Raises:
        InvalidValueError: Unknown keys, wrong types, out-of-range values, or a budget with
            no term at all.
    """
    values = _defaults()
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    for p in paths:
        _apply(values, load_file(p))
    if overrides:
        layer = {}
        for key, value in overrides.items():
            if key not in OPTIONS:
                raise unknown_key_error(key, "option")
            layer[key] = check_value(OPTIONS[key], value, f"--{key}")
        _apply(values, layer)
    config = _build(values)
    if all(getattr(config.budget, t) is None for t in BUDGET_TERMS):
        raise InvalidValueError(
            "the budget has no term: set budget.flops, budget.params, budget.latency_ms or budget.speedup "
            "(e.g. --budget.flops 0.5)"
        )
    steps = config.search.refine_steps
    if not steps or steps != sorted(steps):
        raise InvalidValueError(
            f"search.refine_steps must be increasing cumulative step counts (e.g. 50,150,450), got {steps}"
        )
    return config


def from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """A config from :meth:`Config.to_dict` output (e.g. a run directory's ``config.yaml``)."""
    flat = _flatten(data, source)
    values = _defaults()
    values.update({k: check_value(OPTIONS[k], v, f"'{k}' in {source}") for k, v in flat.items()})
    return _build(values)


def check_names(config: Config) -> None:
    """Fail early, listing valid names, when a strategy, reward, criterion or dataset is unknown.

    Raises:
        UnknownNameError: The first unknown name.
    """
    from automl_prune.criteria import CRITERIA
    from automl_prune.data import DATASETS
    from automl_prune.reward import REWARDS
    from automl_prune.strategy import STRATEGIES

    STRATEGIES.get(config.search.strategy)
    for text in config.compare.strategies:
        STRATEGIES.get(split_variant(text)[0])
    REWARDS.get(config.reward_of())
    CRITERIA.get(config.prune.criterion)
    CRITERIA.get(config.scoring_criterion)
    DATASETS.get(config.data.dataset)
