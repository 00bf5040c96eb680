"""Policy-gradient search strategies: N2N-style REINFORCE and a SkipNet-style gate learner.

Both agents sample a whole plan per episode from a small recurrent policy, score it with
one evaluation and learn with REINFORCE (Williams, 1992): the gradient of
``-(R - b) * log pi(actions)``, where ``b`` is an exponential moving average of past
rewards, averaged over a few episodes per Adam step. Each runs until the session's
evaluation budget is spent: the loop stops once ``session.exhausted``, and an
:class:`~automl_prune.strategy.EvaluationBudgetExhausted` raised by an evaluation is left
to propagate to the base class, which ends the search.

- :class:`ReinforceStrategy` follows N2N (Ashok et al., ICLR 2018). Stage 1, present only
  when the search space has skip gates, is a bidirectional LSTM over the embeddings of the
  skippable residual blocks that emits one Bernoulli "remove" probability per block (N2N's
  layer-removal policy; here only identity-shortcut blocks can be removed without breaking
  shapes). Stage 2 is a unidirectional LSTM walking the prunable groups in forward order
  that emits a categorical distribution over ``levels`` evenly spaced actions in
  ``[-1, 1]``, mapped to a keep ratio by :meth:`SearchSpace.action_to_keep` (N2N's
  layer-shrinkage policy). N2N trains the two stages one after the other; under one
  evaluation budget and a hard resource budget (removal alone rarely meets it) both are
  sampled in every episode and updated jointly from the same reward.
- :class:`SkipNetStrategy` learns a static skip pattern on the ``SkipGate-v0`` env
  (:class:`~automl_prune.envs.skip_gate.SkipGateEnv`) with a recurrent gate shared across
  blocks (SkipNet's RNN gate, Wang et al., ECCV 2018), trained by REINFORCE on the env's
  reward, which subtracts ``compute_penalty`` times the kept FLOPs fraction (SkipNet's
  hybrid RL stage). SkipNet's supervised pre-training of the gates and its per-input
  routing do not apply to a static pruning plan and are left out.

Budget feasibility is part of the environment, not the policy: a sampled keep ratio is
clipped into the group's AMC feasible interval (:meth:`SearchSpace.clip`) given the keep
ratios already decided and the sampled skip gates, and the REINFORCE gradient uses the
log-probability of the *sampled* (pre-clip) action. The interval's bounds are also fed to
the shrinkage LSTM, so the policy can learn where clipping will happen.

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
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from automl_prune.envs.layer_prune import GROUP_FEATURES, group_embeddings
from automl_prune.envs.skip_gate import SkipGateEnv
from automl_prune.errors import InvalidValueError
from automl_prune.search_spaces import SearchSpace
from automl_prune.seeding import derive_seed, torch_generator
from automl_prune.strategy import SearchSession, Strategy
from automl_prune.types import Plan

__all__ = [
    "BLOCK_FEATURES",
    "GROUP_FEATURES",
    "BlockRemovalPolicy",
    "MovingAverageBaseline",
    "RecurrentGatePolicy",
    "ReinforceStrategy",
    "ShrinkagePolicy",
    "SkipNetStrategy",
    "block_embeddings",
    "group_embeddings",
]

logger = logging.getLogger(__name__)

BLOCK_FEATURES = ("index", "flops_share", "params_share", "channels")
"""Static per-block features: position, share of the dense FLOPs/params the block holds, width."""

_STEP_FEATURES = ("in_skipped_block", "feasible_low", "feasible_high", "previous_keep")
"""Dynamic features appended to a group's embedding at each shrinkage step."""


# ---------------------------------------------------------------------- embeddings
def block_embeddings(space: SearchSpace) -> np.ndarray:
    """Static embedding of every skippable block of ``space``, in block order.

    Features are :data:`BLOCK_FEATURES`: the block's position, the fractions of the dense
    model's FLOPs and parameters removed by skipping it (each divided by its maximum over
    the blocks) and the output width of its first layer (divided by the widest block's).

    Args:
        space: A search space built with ``skip_gates=True``.

    Returns:
        Array of shape ``(len(space.blocks), len(BLOCK_FEATURES))``; empty when there are no blocks.
    """
    blocks = space.blocks
    if not blocks:
        return np.zeros((0, len(BLOCK_FEATURES)))
    graph = space.graph
    dense = graph.cost(Plan())
    rows = []
    for i, block in enumerate(blocks):
        skipped = graph.cost(Plan(skip={block: True}))
        layers = [info for name, info in graph.layers.items() if name.startswith(f"{block}.")]
        rows.append(
            [
                i / max(1, len(blocks) - 1),
                (dense.flops - skipped.flops) / max(1, dense.flops),
                (dense.params - skipped.params) / max(1, dense.params),
                float(layers[0].out_channels) if layers else 0.0,
            ]
        )
    features = np.array(rows, dtype=np.float64)
    scale = features[:, 1:].max(axis=0)
    scale[scale == 0] = 1.0
    features[:, 1:] /= scale
    return features


def _skipped_member_fraction(space: SearchSpace, skip: Mapping[str, bool]) -> np.ndarray:
    """For each group, the fraction of its member layers that lie inside a skipped block."""
    prefixes = tuple(f"{b}." for b, on in skip.items() if on)
    if not prefixes:
        return np.zeros(space.dim)
    return np.array(
        [sum(m.startswith(prefixes) for m in g.members) / max(1, len(g.members)) for g in space.graph.groups]
    )


# ---------------------------------------------------------------------- policies
def _init_output(layer: nn.Linear, bias: float = 0.0, gain: float = 0.01) -> None:
    """Small output weights so the initial distribution is set by ``bias`` alone."""
    nn.init.normal_(layer.weight, std=gain)
    nn.init.constant_(layer.bias, bias)


class BlockRemovalPolicy(nn.Module):
    """N2N stage 1: a bidirectional LSTM over block embeddings, one remove logit per block.

    Args:
        in_features: Size of a block embedding.
        hidden_size: LSTM hidden size (per direction).
        initial_skip_prob: Probability of removing a block before any learning.
    """

    def __init__(self, in_features: int, hidden_size: int, initial_skip_prob: float):
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden_size, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden_size, 1)
        _init_output(self.head, bias=math.log(initial_skip_prob / (1.0 - initial_skip_prob)))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """Logits of removing each block.

        Args:
            blocks: Block embeddings, shape ``(n_blocks, in_features)``.

        Returns:
            Logits, shape ``(n_blocks,)``.
        """
        out, _ = self.lstm(blocks.unsqueeze(0))
        return self.head(out[0]).squeeze(-1)


class ShrinkagePolicy(nn.Module):
    """N2N stage 2: an LSTM cell stepped over the groups, a categorical over keep levels per group.

    Args:
        in_features: Size of one step's input.
        hidden_size: LSTM hidden size.
        levels: Number of discrete actions.
    """

    def __init__(self, in_features: int, hidden_size: int, levels: int):
        super().__init__()
        self.cell = nn.LSTMCell(in_features, hidden_size)
        self.head = nn.Linear(hidden_size, levels)
        _init_output(self.head)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One step: logits over the levels and the new recurrent state.

        Args:
            x: Step input, shape ``(in_features,)``.
            state: Previous ``(h, c)`` (None at the first group).

        Returns:
            ``(logits of shape (levels,), (h, c))``.
        """
        h, c = self.cell(x.unsqueeze(0), state)
        return self.head(h)[0], (h, c)


class RecurrentGatePolicy(nn.Module):
    """SkipNet's recurrent gate: one LSTM cell shared by all blocks, one skip logit per step.

    Args:
        in_features: Size of the env observation.
        hidden_size: LSTM hidden size.
        initial_skip_prob: Probability of skipping a block before any learning.
    """

    def __init__(self, in_features: int, hidden_size: int, initial_skip_prob: float):
        super().__init__()
        self.cell = nn.LSTMCell(in_features, hidden_size)
        self.head = nn.Linear(hidden_size, 1)
        _init_output(self.head, bias=math.log(initial_skip_prob / (1.0 - initial_skip_prob)))

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One step: the skip logit (a scalar tensor) and the new recurrent state."""
        h, c = self.cell(x.unsqueeze(0), state)
        return self.head(h)[0, 0], (h, c)


# ---------------------------------------------------------------------- REINFORCE helpers
@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: leave torch's setting), then restore it."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
class _Episode:
    """One sampled episode: its reward and the (differentiable) log-probability and entropy of its actions."""

    reward: float
    log_prob: torch.Tensor
    entropy: torch.Tensor


def _bernoulli(logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample Bernoulli actions; return (actions in {0, 1}, summed log-prob, summed entropy)."""
    with torch.no_grad():
        actions = (torch.rand(logits.shape, generator=generator) < torch.sigmoid(logits)).to(logits.dtype)
    log_prob = actions * F.logsigmoid(logits) + (1.0 - actions) * F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    entropy = -(p * F.logsigmoid(logits) + (1.0 - p) * F.logsigmoid(-logits))
    return actions, log_prob.sum(), entropy.sum()


def _categorical(logits: torch.Tensor, generator: torch.Generator) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Sample one categorical action; return (index, log-prob, entropy)."""
    log_p = F.log_softmax(logits, dim=-1)
    with torch.no_grad():
        index = int(torch.multinomial(log_p.exp(), 1, generator=generator).item())
    return index, log_p[index], -(log_p.exp() * log_p).sum()


def _check_common(
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


class _PolicyGradientStrategy(Strategy):
    """Shared REINFORCE loop: sample a batch of episodes, take one Adam step, repeat.

    Attributes:
        episode_rewards: Reward of every completed episode of the last search, in order
            (the learning curve; for :class:`SkipNetStrategy` it includes the compute penalty).
        policy: The policy network(s) of the last search.
    """

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
        _check_common(
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

    def _label(self) -> str:
        return self.name or type(self).__name__

    def _policy_threads(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the policy's own (tiny) torch ops run."""
        return _torch_threads(self.policy_threads)

    def _build(self, session: SearchSession) -> nn.Module:
        raise NotImplementedError

    def _episode(self, session: SearchSession, generator: torch.Generator) -> _Episode:
        raise NotImplementedError

    def _run(self, session: SearchSession) -> None:
        self.episode_rewards = []
        label = self._label()
        with torch.random.fork_rng(devices=[]), self._policy_threads():
            torch.manual_seed(derive_seed(session.seed, label, "init"))
            policy = self._build(session)
        self.policy = policy
        generator = torch_generator(derive_seed(session.seed, label, "sample"))
        optimizer = torch.optim.Adam(policy.parameters(), lr=self.learning_rate)
        baseline = MovingAverageBaseline(self.baseline_decay)
        update = 0
        while not session.exhausted:
            batch: list[_Episode] = []
            for _ in range(self.episodes_per_update):
                if session.exhausted:
                    break
                episode = self._episode(session, generator)  # raises EvaluationBudgetExhausted when spent
                batch.append(episode)
                self.episode_rewards.append(episode.reward)
            if not batch:
                break
            advantages = baseline.advantages([e.reward for e in batch])
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
                baseline.value,
                best[1].reward if best else float("nan"),
                session.used,
                session.max_evaluations,
            )


# ---------------------------------------------------------------------- N2N
class ReinforceStrategy(_PolicyGradientStrategy):
    """N2N-style two-stage REINFORCE: LSTM policies for block removal and per-group shrinkage.

    Each episode samples, when the space has skip gates, one remove/keep decision per
    skippable block from a bidirectional LSTM over the block embeddings (stage 1), then
    walks the groups in forward order with an LSTM cell (stage 2). At group ``i`` the
    cell reads the group's static embedding (:func:`group_embeddings`), the fraction of
    its layers inside removed blocks, the feasible keep interval ``[low, high]`` given the
    decisions so far and the skip gates (:meth:`SearchSpace.feasible_interval`), and the
    previous group's applied keep ratio; it emits a categorical over ``levels`` actions
    ``-1 + 2 k / (levels - 1)``, which :meth:`SearchSpace.action_to_keep` maps to a keep
    ratio in ``[min_keep, 1]``. The keep ratio is then clipped into ``[low, high]``
    (exactly :meth:`SearchSpace.clip`), so every plan meets the budget. Clipping is treated
    as part of the environment: the gradient uses the log-probability of the sampled
    level. A categorical over levels is used rather than a continuous (Beta or squashed
    Gaussian) head because its log-probabilities are exact, it can put mass on the
    interval ends that clipping produces, and it matches discrete spaces (``levels=``)
    directly.

    The reward is the evaluation's reward (configure the evaluator with ``reward="n2n"``
    for N2N's ``C (2 - C) * acc / acc_teacher``).

    Args:
        levels: Number of discrete shrinkage actions per group, >= 2 (default 10: keep
            ratios ``min_keep + k (1 - min_keep) / 9``).
        hidden_size: Hidden size of both LSTMs (default 64).
        learning_rate: Adam learning rate (default 0.02: enough to move the policy within a
            few hundred evaluations).
        episodes_per_update: Episodes (plans evaluated) averaged per policy update (default 5).
        baseline_decay: Decay of the exponential moving-average reward baseline (default 0.9).
        entropy_coef: Weight of an entropy bonus (default 0: plain REINFORCE).
        initial_skip_prob: Probability of removing each block before any learning (stage 1;
            default 0.3, so most blocks start kept and shrinkage does most of the early work).
        remove_blocks: Run stage 1 when the space has skip gates (default True); False shrinks only.
        policy_threads: Intra-op torch threads for the policy's passes (default 1; None keeps
            torch's setting).

    Raises:
        InvalidValueError: For out-of-range hyper-parameters.
    """

    def __init__(
        self,
        levels: int = 10,
        hidden_size: int = 64,
        learning_rate: float = 2e-2,
        episodes_per_update: int = 5,
        baseline_decay: float = 0.9,
        entropy_coef: float = 0.0,
        initial_skip_prob: float = 0.3,
        remove_blocks: bool = True,
        policy_threads: int | None = 1,
    ):
        super().__init__(
            learning_rate,
            episodes_per_update,
            baseline_decay,
            hidden_size,
            entropy_coef,
            initial_skip_prob,
            policy_threads,
        )
        if levels < 2:
            raise InvalidValueError(f"levels must be >= 2, got {levels}")
        self.levels = levels
        self.remove_blocks = remove_blocks
        self._actions = np.linspace(-1.0, 1.0, levels)
        self._space: SearchSpace | None = None
        self._shrink: ShrinkagePolicy | None = None
        self._remove: BlockRemovalPolicy | None = None
        self._group_features = torch.zeros(0)
        self._block_features = torch.zeros(0)

    def _build(self, session: SearchSession) -> nn.Module:
        space = session.space
        self._space = space
        self._group_features = torch.as_tensor(group_embeddings(space), dtype=torch.float32)
        self._shrink = ShrinkagePolicy(len(GROUP_FEATURES) + len(_STEP_FEATURES), self.hidden_size, self.levels)
        policy = nn.ModuleDict({"shrink": self._shrink})
        self._remove = None
        if self.remove_blocks and space.blocks:
            self._block_features = torch.as_tensor(block_embeddings(space), dtype=torch.float32)
            self._remove = BlockRemovalPolicy(len(BLOCK_FEATURES), self.hidden_size, self.initial_skip_prob)
            policy["remove"] = self._remove
        logger.info(
            "%s: %d groups, %d skippable blocks (stage 1 %s), %d shrinkage levels",
            self._label(),
            space.dim,
            len(space.blocks),
            "on" if self._remove is not None else "off",
            self.levels,
        )
        return policy

    def sample_plan(self, generator: torch.Generator) -> tuple[Plan, torch.Tensor, torch.Tensor]:
        """Sample one budget-feasible plan from the current policy (valid during/after a search).

        Args:
            generator: Source of randomness.

        Returns:
            ``(plan, log-prob of the sampled actions, entropy)``; the last two carry gradients.
        """
        space, shrink = self._space, self._shrink
        if space is None or shrink is None:
            raise InvalidValueError("the policy is built by search(); call it first")
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        skip: dict[str, bool] = {}
        if self._remove is not None:
            gates, lp, ent = _bernoulli(self._remove(self._block_features), generator)
            log_prob, entropy = log_prob + lp, entropy + ent
            skip = {b: bool(g) for b, g in zip(space.blocks, gates.tolist(), strict=True)}
            if not space.is_feasible(space.plan_from_keeps(space.min_keep, skip)):
                logger.debug("sampled skip gates leave no feasible keep ratios; keeping every block")
                skip = {}
        in_skipped = _skipped_member_fraction(space, skip)
        decided: list[float] = []
        previous = 1.0
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        for i in range(space.dim):
            low, high = space.feasible_interval(decided, skip)
            step = torch.tensor([in_skipped[i], low, high, previous], dtype=torch.float32)
            logits, state = shrink(torch.cat([self._group_features[i], step]), state)
            level, lp, ent = _categorical(logits, generator)
            log_prob, entropy = log_prob + lp, entropy + ent
            requested = space.action_to_keep(float(self._actions[level]), i)
            keep = float(min(high, max(low, space.snap(requested, i))))  # == space.clip(i, requested, decided, skip)
            decided.append(keep)
            previous = keep
        return space.plan_from_keeps(decided, skip), log_prob, entropy

    def _episode(self, session: SearchSession, generator: torch.Generator) -> _Episode:
        with self._policy_threads():
            plan, log_prob, entropy = self.sample_plan(generator)
        evaluation = session.evaluate(plan)
        return _Episode(float(evaluation.reward), log_prob, entropy)


# ---------------------------------------------------------------------- SkipNet
class SkipNetStrategy(_PolicyGradientStrategy):
    """SkipNet-style REINFORCE on ``SkipGate-v0``: learn which residual blocks to remove.

    A recurrent gate shared by all blocks (an LSTM cell, as SkipNet's RNN gate) reads the
    env's observation of each block in turn and emits a Bernoulli skip probability. At the
    end of an episode the env repairs the keep ratios of the other groups into the budget,
    evaluates the plan and returns its reward minus ``compute_penalty`` times the kept FLOPs
    fraction; the gate learns from that reward by REINFORCE with a moving-average baseline.

    Args:
        compute_penalty: Weight of the kept-FLOPs fraction subtracted from the reward
            (SkipNet's compute term; default 0.1).
        hidden_size: Hidden size of the gate's LSTM cell (default 32).
        learning_rate: Adam learning rate (default 0.02).
        episodes_per_update: Episodes (plans evaluated) averaged per policy update (default 5).
        baseline_decay: Decay of the exponential moving-average reward baseline (default 0.9).
        entropy_coef: Weight of an entropy bonus (default 0: plain REINFORCE).
        initial_skip_prob: Probability of skipping each block before any learning (default 0.5).
        policy_threads: Intra-op torch threads for the policy's passes (default 1; None keeps
            torch's setting).

    Raises:
        InvalidValueError: For out-of-range hyper-parameters, and from ``search`` when the
            space has no skippable residual blocks.
    """

    def __init__(
        self,
        compute_penalty: float = 0.1,
        hidden_size: int = 32,
        learning_rate: float = 2e-2,
        episodes_per_update: int = 5,
        baseline_decay: float = 0.9,
        entropy_coef: float = 0.0,
        initial_skip_prob: float = 0.5,
        policy_threads: int | None = 1,
    ):
        super().__init__(
            learning_rate,
            episodes_per_update,
            baseline_decay,
            hidden_size,
            entropy_coef,
            initial_skip_prob,
            policy_threads,
        )
        if not compute_penalty >= 0:
            raise InvalidValueError(f"compute_penalty must be >= 0, got {compute_penalty}")
        self.compute_penalty = compute_penalty
        self._env: SkipGateEnv | None = None
        self._gate: RecurrentGatePolicy | None = None
        self._reset_seed: int | None = None

    def _build(self, session: SearchSession) -> nn.Module:
        space = session.space
        if not space.blocks:
            if space.graph.blocks:
                raise InvalidValueError(
                    "SkipNetStrategy needs skip gates, but the search space was built without them; "
                    "build it with SearchSpace(evaluator, skip_gates=True)"
                )
            raise InvalidValueError(
                "SkipNetStrategy needs skippable residual blocks (identity shortcuts), and this model has none; "
                "use a residual model and SearchSpace(evaluator, skip_gates=True), or another strategy"
            )
        self._env = SkipGateEnv(space, evaluate=session.evaluate, compute_penalty=self.compute_penalty)
        self._reset_seed = derive_seed(session.seed, self._label(), "env")
        obs_size = int(np.prod(self._env.observation_space.shape))
        logger.info(
            "%s: %d skippable blocks, compute penalty %g", self._label(), len(space.blocks), self.compute_penalty
        )
        self._gate = RecurrentGatePolicy(obs_size, self.hidden_size, self.initial_skip_prob)
        return self._gate

    def _episode(self, session: SearchSession, generator: torch.Generator) -> _Episode:
        env, gate = self._env, self._gate
        if env is None or gate is None:
            raise InvalidValueError("the policy is built by search(); call it first")
        obs, _ = env.reset(seed=self._reset_seed)
        self._reset_seed = None  # seed the env once per search, as Gymnasium recommends
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        while True:
            with self._policy_threads():
                logit, state = gate(torch.as_tensor(obs, dtype=torch.float32), state)
                action, lp, ent = _bernoulli(logit, generator)
                log_prob, entropy = log_prob + lp, entropy + ent
            obs, reward, terminated, truncated, _ = env.step(np.int64(int(action.item())))  # evaluates at the end
            if terminated or truncated:
                return _Episode(float(reward), log_prob, entropy)
