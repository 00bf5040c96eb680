"""Each registered strategy's hyper-parameters, declared once: ``search.<strategy>.<option>`` config keys.

A strategy with options has a dataclass here (names, types, defaults, limits, one-line help);
:class:`automl_prune.config.SearchSection` holds one of each, so every option is a config key
(``search.ddpg.warmup_episodes``), a flag (``--search.ddpg.warmup_episodes 100``), validated
like every other key, listed by ``automl-prune list strategies -v`` and stored in a run's
``config.yaml``. The strategy classes take the same names as keyword arguments (a test checks
that the defaults agree). This module imports nothing heavy, so the config can use it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from automl_prune.errors import InvalidValueError
from automl_prune.fields import opt

__all__ = [
    "ABCOptions",
    "DDPGOptions",
    "GlobalOptions",
    "OptunaOptions",
    "PPOOptions",
    "ReinforceOptions",
    "STRATEGY_OPTIONS",
    "StaticSkipOptions",
    "options_of",
    "split_variant",
]

OPTUNA_SAMPLERS = ("tpe", "cmaes", "random", "nsga2")
"""Optuna samplers the ``optuna`` strategy can run."""
GLOBAL_NORMALIZERS = ("mean", "sum", "max", "l2")
"""Within-group normalisations of the ``global`` ranking."""


@dataclass
class DDPGOptions:
    """AMC's DDPG (Stable-Baselines3) on LayerPrune-v0."""

    warmup_episodes: int | None = opt(
        None, "episodes of random actions before learning (null: a quarter of the evaluation budget)", ge=0
    )
    noise_sigma: float = opt(1.0, "initial width of the truncated-normal exploration noise (action units)", ge=0)
    noise_decay: float | None = opt(
        None, "per-episode decay of the noise (null: down to 5% of its width by the last episode)", gt=0, le=1
    )
    actor_learning_rate: float = opt(1e-4, "Adam learning rate of the actor", gt=0)
    critic_learning_rate: float = opt(1e-3, "Adam learning rate of the critic", gt=0)
    tau: float = opt(0.01, "soft-update coefficient of the target networks", gt=0, le=1)
    gamma: float = opt(1.0, "discount factor", ge=0, le=1)
    batch_size: int = opt(64, "minibatch size of a gradient step", ge=1)
    buffer_episodes: int = opt(100, "replay buffer capacity in episodes", ge=1)
    gradient_steps: int = opt(-1, "gradient steps after each episode (-1: one per transition, as AMC)", ge=-1)
    net_arch: list[int] = opt([300, 300], "hidden layer sizes of the actor and the critic", ge=1, repeat=True)
    final_reward_to_all: bool = opt(True, "give every transition the episode's final reward (AMC)")
    baseline_alpha: float | None = opt(
        0.5, "step size of the moving-average reward baseline (null: no baseline)", gt=0, le=1
    )


@dataclass
class PPOOptions:
    """PPO (Stable-Baselines3) on LayerPrune-v0."""

    episodes_per_rollout: int = opt(4, "episodes collected between two updates", ge=1)
    learning_rate: float = opt(3e-4, "Adam learning rate of the policy and value networks", gt=0)
    batch_size: int | None = opt(None, "minibatch size (null: half a rollout)", ge=2)
    n_epochs: int = opt(10, "passes over each rollout", ge=1)
    gamma: float = opt(1.0, "discount factor", ge=0, le=1)
    gae_lambda: float = opt(0.95, "GAE's bias/variance trade-off (1: Monte-Carlo returns)", ge=0, le=1)
    clip_range: float = opt(0.2, "PPO's clipping parameter", gt=0)
    ent_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    net_arch: list[int] = opt([64, 64], "hidden layer sizes of the policy and value networks", ge=1, repeat=True)


@dataclass
class _PolicyGradientOptions:
    """What the REINFORCE agents share (:class:`automl_prune.agents.policy_gradient.PolicyGradientStrategy`)."""

    learning_rate: float = opt(2e-2, "Adam learning rate of the policy", gt=0)
    episodes_per_update: int = opt(5, "episodes averaged per policy-gradient update", ge=1)
    baseline_decay: float = opt(0.9, "decay of the moving-average reward baseline", ge=0, lt=1)
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    policy_threads: int | None = opt(1, "torch threads of the policy's own updates (null: leave torch's)", ge=1)


@dataclass
class ReinforceOptions(_PolicyGradientOptions):
    """N2N's two-stage REINFORCE (LSTM policies)."""

    levels: int = opt(10, "discrete keep levels of the shrinkage policy", ge=2)
    hidden_size: int = opt(64, "LSTM hidden size", ge=1)
    initial_skip_prob: float = opt(0.3, "initial probability of removing a residual block", gt=0, lt=1)
    remove_blocks: bool = opt(True, "run N2N's block-removal stage before shrinkage")
    two_stage: bool = opt(True, "train removal first, then shrinkage on the best reduced architecture (N2N)")
    removal_share: float = opt(0.3, "share of the evaluations spent on the removal stage", gt=0, lt=1)


@dataclass
class StaticSkipOptions(_PolicyGradientOptions):
    """Static skip search: SkipNet's recurrent gate picks one set of blocks to remove for every input."""

    compute_penalty: float = opt(0.1, "reward penalty per unit of kept FLOPs fraction", ge=0)
    hidden_size: int = opt(32, "gate LSTM hidden size", ge=1)
    initial_skip_prob: float = opt(0.5, "initial skip probability of a block", gt=0, lt=1)


@dataclass
class ABCOptions:
    """ABCPruner's artificial bee colony over discrete keep levels."""

    n_sources: int = opt(8, "food sources (the colony size; also the employed bees per cycle)", ge=2)
    n_onlookers: int | None = opt(None, "onlooker bees per cycle (null: n_sources)", ge=0)
    limit: int = opt(10, "trials without improvement after which a source is abandoned (scout phase)", ge=1)
    levels: int = opt(10, "keep levels k/levels of a continuous search space", ge=2)
    coordinates: int = opt(2, "groups moved per neighbour (1: classic ABC)", ge=1)
    gbest_weight: float = opt(0.0, "C of the gbest-guided move (GABC; 0: ABCPruner's plain move)", ge=0, le=10)
    fitness: str = opt("accuracy", "what the colony maximises", choices=("accuracy", "reward"))


@dataclass
class OptunaOptions:
    """Optuna ask/tell."""

    sampler: str = opt("tpe", "Optuna sampler (nsga2: accuracy against cost, a Pareto front)", choices=OPTUNA_SAMPLERS)
    sampler_kwargs: dict[str, Any] = opt(
        {}, "keyword arguments of the sampler (a mapping, e.g. {n_startup_trials: 20})"
    )


@dataclass
class GlobalOptions:
    """Global pruning: one threshold over every channel's normalised score."""

    criterion: str = opt("l1", "data-free criterion that ranks the channels (see `list criteria`)")
    normalizer: str = opt("mean", "within-group normalisation of the scores", choices=GLOBAL_NORMALIZERS)
    fill_attempts: int = opt(64, "most channels tried when filling the budget left after the threshold (0: off)", ge=0)


STRATEGY_OPTIONS: dict[str, type] = {
    "ddpg": DDPGOptions,
    "ppo": PPOOptions,
    "reinforce": ReinforceOptions,
    "static_skip": StaticSkipOptions,
    "abc": ABCOptions,
    "optuna": OptunaOptions,
    "global": GlobalOptions,
}
"""Options class of each strategy that has options (``uniform`` and ``random`` have none)."""


def options_of(options: Any) -> dict[str, Any]:
    """An options dataclass as keyword arguments of its strategy (lists copied)."""
    return {f.name: _copy(getattr(options, f.name)) for f in dataclasses.fields(options)}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


_VARIANT = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$", re.S)


def split_variant(text: str) -> tuple[str, dict[str, str]]:
    """``"ddpg(warmup_episodes=100, noise_sigma=0.5)"`` -> ``("ddpg", {"warmup_episodes": "100", ...})``.

    Raises:
        InvalidValueError: Not ``name`` or ``name(key=value, ...)``.
    """
    match = _VARIANT.match(str(text))
    bad = InvalidValueError(
        f"compare.strategies entry '{text}' must be a strategy name or name(key=value, ...), "
        "e.g. ddpg(warmup_episodes=100)"
    )
    if match is None:
        raise bad
    options: dict[str, str] = {}
    for part in split_top_level(match.group(2) or ""):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or key.strip() in options:
            raise bad
        options[key.strip()] = value.strip()
    return match.group(1), options


def split_top_level(text: str) -> list[str]:
    """``text`` split on commas outside brackets (``"a,b(c=1,d=2),[1,2]"`` -> 3 parts); blanks dropped."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]
