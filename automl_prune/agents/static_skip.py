"""SkipNet-style static skip search: a recurrent gate learns which blocks to remove.

:class:`StaticSkipStrategy` learns a static skip pattern on the ``SkipGate-v0`` env
(:class:`~automl_prune.envs.skip_gate.SkipGateEnv`) with a recurrent gate shared across
blocks (SkipNet's RNN gate, Wang et al., ECCV 2018), trained by REINFORCE
(:mod:`.policy_gradient`) on the env's reward, which subtracts ``compute_penalty`` times the
kept FLOPs fraction (SkipNet's hybrid RL stage). SkipNet's supervised pre-training of the
gates and its per-input routing do not apply to a static pruning plan and are left out.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from automl_prune.agents.policy_gradient import PolicyGradientStrategy, Sample, bernoulli, init_output
from automl_prune.envs.skip_gate import SkipGateEnv
from automl_prune.errors import InvalidValueError
from automl_prune.seeding import derive_seed
from automl_prune.strategy import SearchSession
from automl_prune.types import Evaluation

__all__ = ["RecurrentGatePolicy", "StaticSkipStrategy"]

logger = logging.getLogger(__name__)


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
        init_output(self.head, bias=math.log(initial_skip_prob / (1.0 - initial_skip_prob)))

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One step: the skip logit (a scalar tensor) and the new recurrent state."""
        h, c = self.cell(x.unsqueeze(0), state)
        return self.head(h)[0, 0], (h, c)


# ---------------------------------------------------------------------- SkipNet
class StaticSkipStrategy(PolicyGradientStrategy):
    """SkipNet-style REINFORCE on ``SkipGate-v0``: learn which blocks to remove (the same for every input).

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
            space has no removable blocks.
    """

    needs_skip_gates = True

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
                    "StaticSkipStrategy needs skip gates, but the search space was built without them; "
                    "build it with SearchSpace(evaluator, skip_gates=True)"
                )
            raise InvalidValueError(
                "StaticSkipStrategy needs removable blocks (identity-shortcut residual blocks or shape-preserving "
                "layers), and this model has none; use another strategy"
            )
        self._env = SkipGateEnv(space, evaluate=session.evaluate, compute_penalty=self.compute_penalty)
        self._reset_seed = derive_seed(session.seed, self._label(), "env")
        obs_size = int(np.prod(self._env.observation_space.shape))
        logger.info(
            "%s: %d skippable blocks, compute penalty %g", self._label(), len(space.blocks), self.compute_penalty
        )
        self._gate = RecurrentGatePolicy(obs_size, self.hidden_size, self.initial_skip_prob)
        return self._gate

    def _sample(self, generator: torch.Generator) -> Sample:
        """Gate every block from the policy; the plan is scored later, with the rest of the batch."""
        env, gate = self._env, self._gate
        if env is None or gate is None:
            raise InvalidValueError("the policy is built by search(); call it first")
        obs, _ = env.reset(seed=self._reset_seed)
        self._reset_seed = None  # seed the env once per search, as Gymnasium recommends
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        blocks = len(env.space.blocks)
        while True:
            logit, state = gate(torch.as_tensor(obs, dtype=torch.float32), state)
            action, lp, ent = bernoulli(logit, generator)
            log_prob, entropy = log_prob + lp, entropy + ent
            skip = bool(int(action.item()))
            if len(env.gates) == blocks - 1:  # the last gate: the episode's plan (the env would score it now)
                return Sample(env.plan_for([*env.gates, skip]), log_prob, entropy)
            obs, _, _, _, _ = env.step(np.int64(skip))

    def _reward(self, evaluation: Evaluation) -> float:
        assert self._env is not None
        return self._env.reward_of(evaluation)
