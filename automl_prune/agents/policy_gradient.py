"""REINFORCE machinery shared by the policy-gradient strategies (:mod:`.n2n`, :mod:`.static_skip`).

Both agents sample a whole plan per episode from a small recurrent policy, score it with
one evaluation and learn with REINFORCE (Williams, 1992): the gradient of
``-(R - b) * log pi(actions)``, where ``b`` is an exponential moving average of past
rewards, averaged over a few episodes per Adam step. Each runs until the session's
evaluation budget is spent: the loop stops once ``session.exhausted``, and an
:class:`~automl_prune.strategy.EvaluationBudgetExhausted` raised by an evaluation is left
to propagate to the base class, which ends the search.

Sampling uses a dedicated ``torch.Generator`` and the networks are initialised under a
seed derived from ``session.seed``, so the same seed gives the same plans.

The policies are tiny, so their forward and backward passes run with ``policy_threads``
intra-op threads (1 by default; torch's setting is restored around every evaluation): on
a shared CPU, spreading such small ops over several OpenMP threads can make one update
take seconds instead of milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from automl_prune.errors import InvalidValueError
from automl_prune.seeding import derive_seed, torch_generator
from automl_prune.strategy import SearchSession, Strategy
from automl_prune.threads import num_threads
from automl_prune.types import Evaluation, Plan

__all__ = [
    "Episode",
    "Sample",
    "MovingAverageBaseline",
    "PolicyGradientStrategy",
    "bernoulli",
    "categorical",
    "check_common",
    "init_output",
]

logger = logging.getLogger(__name__)


def init_output(layer: nn.Linear, bias: float = 0.0, gain: float = 0.01) -> None:
    """Small output weights so the initial distribution is set by ``bias`` alone."""
    nn.init.normal_(layer.weight, std=gain)
    nn.init.constant_(layer.bias, bias)


# ---------------------------------------------------------------------- REINFORCE helpers
class MovingAverageBaseline:
    """Exponential moving average of rewards: ``b <- decay * b + (1 - decay) * mean(R)``.

    Before the first update the baseline is the mean reward of the batch being scored.

    Args:
        decay: Weight of the old value, in ``[0, 1)``.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.value: float | None = None

    def advantages(self, rewards: Sequence[float]) -> np.ndarray:
        """``R - b`` for each reward, then fold the batch's mean into ``b``."""
        r = np.asarray(rewards, dtype=np.float64)
        mean = float(r.mean())
        baseline = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.decay * self.value + (1.0 - self.decay) * mean
        return r - baseline


@dataclass
class Sample:
    """One episode's plan, sampled from the policy, with the (differentiable) log-probability and entropy of its actions."""

    plan: Plan
    log_prob: torch.Tensor
    entropy: torch.Tensor


@dataclass
class Episode:
    """One sampled episode: its reward and the (differentiable) log-probability and entropy of its actions."""

    reward: float
    log_prob: torch.Tensor
    entropy: torch.Tensor


def bernoulli(logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample Bernoulli actions; return (actions in {0, 1}, summed log-prob, summed entropy)."""
    with torch.no_grad():
        actions = (torch.rand(logits.shape, generator=generator) < torch.sigmoid(logits)).to(logits.dtype)
    log_prob = actions * F.logsigmoid(logits) + (1.0 - actions) * F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    entropy = -(p * F.logsigmoid(logits) + (1.0 - p) * F.logsigmoid(-logits))
    return actions, log_prob.sum(), entropy.sum()


def categorical(logits: torch.Tensor, generator: torch.Generator) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Sample one categorical action; return (index, log-prob, entropy)."""
    log_p = F.log_softmax(logits, dim=-1)
    with torch.no_grad():
        index = int(torch.multinomial(log_p.exp(), 1, generator=generator).item())
    return index, log_p[index], -(log_p.exp() * log_p).sum()


def check_common(
    learning_rate: float,
    episodes_per_update: int,
    baseline_decay: float,
    hidden_size: int,
    entropy_coef: float,
    initial_skip_prob: float,
    policy_threads: int | None,
) -> None:
    if not learning_rate > 0:
        raise InvalidValueError(f"learning_rate must be > 0, got {learning_rate}")
    if episodes_per_update < 1:
        raise InvalidValueError(f"episodes_per_update must be >= 1, got {episodes_per_update}")
    if not 0.0 <= baseline_decay < 1.0:
        raise InvalidValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
    if hidden_size < 1:
        raise InvalidValueError(f"hidden_size must be >= 1, got {hidden_size}")
    if entropy_coef < 0:
        raise InvalidValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
    if not 0.0 < initial_skip_prob < 1.0:
        raise InvalidValueError(f"initial_skip_prob must be in (0, 1), got {initial_skip_prob}")
    if policy_threads is not None and policy_threads < 1:
        raise InvalidValueError(f"policy_threads must be >= 1 or None, got {policy_threads}")


class PolicyGradientStrategy(Strategy):
    """Shared REINFORCE loop: sample a batch of episodes, take one Adam step, repeat.

    Attributes:
        episode_rewards: Reward of every completed episode of the last search, in order
            (the learning curve; for :class:`StaticSkipStrategy` it includes the compute penalty).
        policy: The policy network(s) of the last search.
    """

    learns_policy = True

    def __init__(
        self,
        learning_rate: float,
        episodes_per_update: int,
        baseline_decay: float,
        hidden_size: int,
        entropy_coef: float,
        initial_skip_prob: float,
        policy_threads: int | None,
    ):
        check_common(
            learning_rate,
            episodes_per_update,
            baseline_decay,
            hidden_size,
            entropy_coef,
            initial_skip_prob,
            policy_threads,
        )
        self.policy_threads = policy_threads
        self.learning_rate = learning_rate
        self.episodes_per_update = episodes_per_update
        self.baseline_decay = baseline_decay
        self.hidden_size = hidden_size
        self.entropy_coef = entropy_coef
        self.initial_skip_prob = initial_skip_prob
        self.episode_rewards: list[float] = []
        self.policy: nn.Module | None = None
        self._baseline = MovingAverageBaseline(baseline_decay)  # a subclass may start a new one (a new stage)

    def _label(self) -> str:
        return self.name or type(self).__name__

    def policy_state(self) -> dict[str, Any] | None:
        """The policy network(s) after the last search."""
        return None if self.policy is None else {"policy": self.policy.state_dict()}

    def _policy_threads(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the policy's own (tiny) torch ops run."""
        return num_threads(self.policy_threads)

    def _build(self, session: SearchSession) -> nn.Module:
        raise NotImplementedError

    def _sample(self, generator: torch.Generator) -> Sample:
        """One episode's plan from the current policy (not yet scored)."""
        raise NotImplementedError

    def _reward(self, evaluation: Evaluation) -> float:
        """The episode's reward for its plan's evaluation."""
        return float(evaluation.reward)

    def _run(self, session: SearchSession) -> None:
        self.episode_rewards = []
        label = self._label()
        with torch.random.fork_rng(devices=[]), self._policy_threads():
            torch.manual_seed(derive_seed(session.seed, label, "init"))
            policy = self._build(session)
        if self.initial_policy is not None:
            try:
                policy.load_state_dict(self.initial_policy["policy"])
            except (RuntimeError, KeyError) as exc:
                raise InvalidValueError(
                    f"search.init_policy does not fit this {label} policy (other sizes, levels or a model with other "
                    f"blocks?): {str(exc).splitlines()[0]}"
                ) from None
            logger.info("%s: starting from the given policy", label)
        self.policy = policy
        generator = torch_generator(derive_seed(session.seed, label, "sample"))
        optimizer = torch.optim.Adam(policy.parameters(), lr=self.learning_rate)
        self._baseline = MovingAverageBaseline(self.baseline_decay)
        update = 0
        while not session.exhausted:
            # The update's episodes are sampled first and scored together: in parallel on the search's Ray
            # workers when it has them (the policy only changes at the update, so nothing waits on a score).
            with self._policy_threads():
                samples = [self._sample(generator) for _ in range(min(self.episodes_per_update, session.remaining))]
            evaluations = session.evaluate_many([s.plan for s in samples])
            batch = [Episode(self._reward(e), s.log_prob, s.entropy) for s, e in zip(samples, evaluations, strict=True)]
            self.episode_rewards.extend(e.reward for e in batch)
            advantages = self._baseline.advantages([e.reward for e in batch])
            with self._policy_threads():
                loss = torch.stack(
                    [
                        -float(a) * e.log_prob - self.entropy_coef * e.entropy
                        for a, e in zip(advantages, batch, strict=True)
                    ]
                ).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            update += 1
            best = session.best()
            logger.info(
                "%s update %d: mean reward %.4f, baseline %.4f, best %.4f (%d/%d evaluations)",
                label,
                update,
                float(np.mean([e.reward for e in batch])),
                self._baseline.value,
                best[1].reward if best else float("nan"),
                session.used,
                session.max_evaluations,
            )
