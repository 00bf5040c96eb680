"""N2N-style REINFORCE (Ashok et al., ICLR 2018): a layer-removal and a layer-shrinkage policy.

Stage 1, present only when the search space has skip gates, is a bidirectional LSTM over the
embeddings of the removable blocks that emits one Bernoulli "remove" probability per block
(N2N's layer-removal policy). Removable are what the dependency graph shows can go without
breaking shapes (:class:`~automl_prune.graph.LayerGraph`): residual blocks with an identity
shortcut, and in plain networks the layers with equal input and output shapes. Stage 2 is a
unidirectional LSTM walking the prunable groups in forward order that emits a categorical
distribution over ``levels`` evenly spaced actions in ``[-1, 1]``, mapped to a keep ratio by
:meth:`SearchSpace.action_to_keep` (N2N's layer-shrinkage policy).
As in N2N the two stages are trained one after the other (``two_stage``, the default): the
first ``removal_share`` of the evaluation budget trains the removal policy alone (each plan
removes the sampled blocks and shrinks the rest uniformly into the budget, as removal alone
rarely meets a hard budget); the removal of the best plan found then stays fixed and the rest of
the budget trains the shrinkage policy on that reduced architecture, with a fresh reward
baseline. ``two_stage=False`` samples both in every episode and updates them jointly.
N2N scores students after a short distillation from the teacher: give the evaluator
``fitness_finetune_steps`` and ``distill_weight`` (``search.fitness_finetune_steps``,
``finetune.distill_weight``; ``configs/n2n.yaml``) and ``reward="n2n"``.
REINFORCE machinery: :mod:`.policy_gradient`.

Budget feasibility is part of the environment, not the policy: a sampled keep ratio is
clipped into the group's AMC feasible interval (:meth:`SearchSpace.clip`) given the keep
ratios already decided and the sampled skip gates, and the REINFORCE gradient uses the
log-probability of the *sampled* (pre-clip) action. The interval's bounds are also fed to
the shrinkage LSTM, so the policy can learn where clipping will happen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from automl_prune.agents.policy_gradient import (
    MovingAverageBaseline,
    PolicyGradientStrategy,
    Sample,
    bernoulli,
    categorical,
    init_output,
)
from automl_prune.envs.layer_prune import GROUP_FEATURES, group_embeddings
from automl_prune.errors import InvalidValueError
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import SearchSession
from automl_prune.types import Plan

__all__ = [
    "BLOCK_FEATURES",
    "GROUP_FEATURES",
    "BlockRemovalPolicy",
    "ReinforceStrategy",
    "ShrinkagePolicy",
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
        removed = graph.removal_filter(Plan(skip={block: True}))
        layers = [info for name, info in graph.layers.items() if removed(name)]
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
    """For each group, the fraction of its member layers that a removed block or layer takes away."""
    if not any(skip.values()):
        return np.zeros(space.dim)
    removed = space.graph.removal_filter(Plan(skip=dict(skip)))
    return np.array([sum(map(removed, g.members)) / max(1, len(g.members)) for g in space.graph.groups])


# ---------------------------------------------------------------------- policies
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
        init_output(self.head, bias=math.log(initial_skip_prob / (1.0 - initial_skip_prob)))

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
        init_output(self.head)

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


# ---------------------------------------------------------------------- N2N
class ReinforceStrategy(PolicyGradientStrategy):
    """N2N-style two-stage REINFORCE: LSTM policies for block removal and per-group shrinkage.

    Its own reward (``search.reward`` unset) is N2N's ``n2n`` (:mod:`automl_prune.reward`).

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

    The reward is the evaluation's reward: N2N's ``C (2 - C) * acc / acc_teacher`` (``n2n``)
    when the search runs through the config with ``search.reward`` unset (:attr:`default_reward`).

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
        two_stage: Train removal first, then shrinkage on the best reduced architecture (default
            True, as N2N); False samples and updates both in every episode.
        removal_share: Share of the evaluation budget spent on stage 1 when ``two_stage``
            (default 0.3; at least one update).
        policy_threads: Intra-op torch threads for the policy's passes (default 1; None keeps
            torch's setting).

    Raises:
        InvalidValueError: For out-of-range hyper-parameters.
    """

    default_reward = "n2n"

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
        two_stage: bool = True,
        removal_share: float = 0.3,
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
        if not 0.0 < removal_share < 1.0:
            raise InvalidValueError(f"removal_share must be in (0, 1), got {removal_share}")
        self.levels = levels
        self.remove_blocks = remove_blocks
        self.two_stage = two_stage
        self.removal_share = removal_share
        self.stage_switch: int | None = None  # evaluations spent when stage 2 began (two-stage searches)
        self._session: SearchSession | None = None
        self._fixed_skip: dict[str, bool] | None = None
        self._actions = np.linspace(-1.0, 1.0, levels)
        self._space: SearchSpace | None = None
        self._shrink: ShrinkagePolicy | None = None
        self._remove: BlockRemovalPolicy | None = None
        self._group_features = torch.zeros(0)
        self._block_features = torch.zeros(0)

    def _build(self, session: SearchSession) -> nn.Module:
        space = session.space
        self._space = space
        self._session = session
        self._fixed_skip = None
        self.stage_switch = None
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
        if self._fixed_skip is not None:  # two-stage search, stage 2: removal fixed by stage 1
            skip = dict(self._fixed_skip)
        elif self._remove is not None:
            skip, lp, ent = self._sample_skip(generator)
            log_prob, entropy = log_prob + lp, entropy + ent
        in_skipped = _skipped_member_fraction(space, skip)
        decided: list[float] = []
        previous = 1.0
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        for i in range(space.dim):
            low, high = space.feasible_interval(decided, skip)
            step = torch.tensor([in_skipped[i], low, high, previous], dtype=torch.float32)
            logits, state = shrink(torch.cat([self._group_features[i], step]), state)
            level, lp, ent = categorical(logits, generator)
            log_prob, entropy = log_prob + lp, entropy + ent
            requested = space.action_to_keep(float(self._actions[level]), i)
            keep = float(min(high, max(low, space.snap(requested, i))))  # == space.clip(i, requested, decided, skip)
            decided.append(keep)
            previous = keep
        return space.plan_from_keeps(decided, skip), log_prob, entropy

    def _stage(self) -> int:
        """1 while a two-stage search trains removal, else 2 (moving to 2 fixes the best removal found)."""
        session = self._session
        if not self.two_stage or self._remove is None or session is None:
            return 2
        if self._fixed_skip is not None:
            return 2
        stage1 = max(self.episodes_per_update, round(self.removal_share * session.max_evaluations))
        if session.used < stage1:
            return 1
        best = session.best()
        self._fixed_skip = dict(best[0].skip) if best else {}
        self.stage_switch = session.used
        self._baseline = MovingAverageBaseline(self.baseline_decay)  # stage 2's rewards are on another scale
        removed = sorted(b for b, on in self._fixed_skip.items() if on)
        logger.info(
            "%s: stage 2 after %d evaluations: shrinkage on the architecture without %s",
            self._label(),
            session.used,
            ", ".join(removed) or "any removed block",
        )
        return 2

    def _sample(self, generator: torch.Generator) -> Sample:
        if self._stage() == 1:
            return self._sample_removal(generator)
        return Sample(*self.sample_plan(generator))

    def _sample_skip(self, generator: torch.Generator) -> tuple[dict[str, bool], torch.Tensor, torch.Tensor]:
        """Removal decisions from the removal policy: (skip gates, log-prob, entropy).

        Gates that leave no feasible keep ratios are replaced by keeping every block (the
        log-probability is still the sampled gates').
        """
        space, remove = self._space, self._remove
        assert space is not None and remove is not None
        gates, log_prob, entropy = bernoulli(remove(self._block_features), generator)
        skip = {b: bool(g) for b, g in zip(space.blocks, gates.tolist(), strict=True)}
        if not space.is_feasible(space.plan_from_keeps(space.min_keep, skip)):
            logger.debug("sampled skip gates leave no feasible keep ratios; keeping every block")
            skip = {}
        return skip, log_prob, entropy

    def _sample_removal(self, generator: torch.Generator) -> Sample:
        """Stage 1: sampled removal, the rest shrunk uniformly into the budget; only removal learns."""
        space = self._space
        assert space is not None
        skip, log_prob, entropy = self._sample_skip(generator)
        return Sample(space.repair(space.plan_from_keeps(np.ones(space.dim), skip)), log_prob, entropy)
