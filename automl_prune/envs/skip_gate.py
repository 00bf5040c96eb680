"""``SkipGate-v0``: decide, block by block, which removable blocks to remove.

Removable blocks are the identity-shortcut residual blocks and, in plain networks, the
shape-preserving layers (:attr:`automl_prune.graph.LayerGraph.blocks`).

One step per skippable block in forward order; action ``Discrete(2)`` (0 = keep, 1 = skip).
The observation is the block's embedding: index, its share of the dense FLOPs and
parameters, whether skipping it alone would already meet the budget, FLOPs removed so far
and FLOPs of the blocks still to decide. At the end the plan skips the chosen blocks;
when skipping alone does not meet the budget the keep ratios of the remaining groups are
scaled down uniformly (``SearchSpace.repair``) so the plan is inside the budget, and the
reward is the evaluated plan's reward minus ``compute_penalty`` times the kept FLOPs
fraction (SkipNet's compute term in its RL stage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from automl_prune.errors import InvalidValueError
from automl_prune.search_spaces import SearchSpace
from automl_prune.types import Evaluation, Plan


class SkipGateEnv(gym.Env[np.ndarray, np.int64]):
    """One step per removable block; action keep (0) or skip (1).

    Args:
        space: The search space (must have skip gates: ``SearchSpace(..., skip_gates=True)``).
        evaluate: Function scoring a plan; defaults to ``space.evaluator.evaluate``.
        compute_penalty: Weight of the kept-FLOPs fraction subtracted from the reward.
        render_mode: Only ``None`` or ``"ansi"``.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        space: SearchSpace,
        evaluate: Callable[[Plan], Evaluation] | None = None,
        compute_penalty: float = 0.0,
        render_mode: str | None = None,
    ):
        if not space.blocks:
            raise InvalidValueError(
                "SkipGate-v0 needs a model with removable blocks (identity-shortcut residual blocks or shape-preserving "
                "layers) and SearchSpace(skip_gates=True)"
            )
        self.space = space
        self.evaluate_fn = evaluate or space.evaluator.evaluate
        self.compute_penalty = compute_penalty
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (6,), dtype=np.float32)
        graph = space.graph
        dense = graph.cost(Plan())
        self._block_flops = np.array(
            [(dense.flops - graph.cost(Plan(skip={b: True})).flops) / dense.flops for b in space.blocks]
        )
        self._block_params = np.array(
            [(dense.params - graph.cost(Plan(skip={b: True})).params) / dense.params for b in space.blocks]
        )
        self._gates: list[bool] = []
        self.last_plan: Plan | None = None
        self.last_evaluation: Evaluation | None = None

    def _observation(self) -> np.ndarray:
        i = min(len(self._gates), len(self.space.blocks) - 1)
        removed = float(sum(f for f, g in zip(self._block_flops, self._gates) if g))
        rest = float(self._block_flops[len(self._gates) + 1 :].sum())
        obs = [
            i / max(1, len(self.space.blocks) - 1),
            self._block_flops[i],
            self._block_params[i],
            float(self._gates[-1]) if self._gates else 0.0,
            removed,
            rest,
        ]
        return np.clip(np.array(obs, dtype=np.float32), 0.0, 1.0)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._gates = []
        return self._observation(), {}

    @property
    def gates(self) -> list[bool]:
        """The gates chosen so far this episode."""
        return list(self._gates)

    def reward_of(self, evaluation: Evaluation) -> float:
        """The episode's reward for the evaluation of its plan: its reward minus the compute penalty."""
        return float(evaluation.reward) - self.compute_penalty * evaluation.flops_ratio

    def plan_for(self, gates: list[bool]) -> Plan:
        """The feasible plan for a full set of gates (keep ratios repaired into the budget)."""
        skip = dict(zip(self.space.blocks, gates))
        return self.space.repair(self.space.plan_from_keeps(np.ones(self.space.dim), skip))

    def step(self, action: np.int64) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if len(self._gates) >= len(self.space.blocks):
            raise RuntimeError("episode is over; call reset()")
        self._gates.append(bool(int(action)))
        info: dict[str, Any] = {"block": self.space.blocks[len(self._gates) - 1], "skip": self._gates[-1]}
        if len(self._gates) < len(self.space.blocks):
            return self._observation(), 0.0, False, False, info
        plan = self.plan_for(self._gates)
        evaluation = self.evaluate_fn(plan)
        self.last_plan, self.last_evaluation = plan, evaluation
        reward = self.reward_of(evaluation)
        info.update(plan=plan, evaluation=evaluation)
        return self._observation(), reward, True, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return " ".join(f"{b}:{'skip' if g else 'keep'}" for b, g in zip(self.space.blocks, self._gates))
