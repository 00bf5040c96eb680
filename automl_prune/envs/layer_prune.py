"""``LayerPrune-v0``: AMC's layer-wise pruning environment.

One episode walks the prunable groups in forward order. The observation is the group's
normalised embedding (AMC, He et al. ECCV 2018): index, layer type, input and output
channels, stride, kernel size, input feature-map size, FLOPs, the share of the dense FLOPs the
decisions so far removed, the share in the layers after this group's root layer, and the
previous action (the last keep ratio). The action, in ``Box(-1, 1, (1,))``, is mapped to a keep
ratio by the search space and clipped into its budget-feasible interval, so every
episode ends inside the budget. The reward is 0 until the last step, then the evaluated
plan's reward; ``info`` carries the plan and the :class:`~automl_prune.types.Evaluation`.
A deferred env (``defer_evaluation=True``) leaves the last step's plan to its caller, which
scores several envs' plans at once (:class:`~automl_prune.agents.sb3.BatchedEvaluationVecEnv`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from automl_prune.search_spaces import SearchSpace
from automl_prune.types import Evaluation, Plan

KIND_CODE = {"conv": 0.0, "dwconv": 0.5, "linear": 1.0}
GROUP_FEATURES = ("index", "kind", "in_channels", "out_channels", "stride", "kernel", "feature_map", "flops")
"""Columns of :func:`group_embeddings` (a group's static embedding)."""
OBS_FEATURES = (*GROUP_FEATURES, "flops_reduced", "flops_rest", "previous_action")


def group_embeddings(space: SearchSpace) -> np.ndarray:
    """Static embedding of every prunable group, in group order (AMC's layer embedding).

    Columns: index, layer-type code, the root layer's input and output channels, stride,
    kernel size, input feature-map height and the FLOPs the group touches; every column
    except the type code (already in ``[0, 1]``) is divided by its maximum over the groups.

    Returns:
        Array of shape ``(space.dim, 8)`` with values in ``[0, 1]``.
    """
    raw = np.array(
        [
            [
                i,
                KIND_CODE[g.root.kind],
                g.root.in_channels,
                g.channels,
                g.root.stride[0],
                g.root.kernel[0],
                g.root.in_size[0],
                g.flops,
            ]
            for i, g in enumerate(space.graph.groups)
        ],
        dtype=np.float64,
    )
    scale = raw.max(axis=0)
    scale[scale == 0] = 1.0
    features = raw / scale
    features[:, 1] = raw[:, 1]
    return features


class LayerPruneEnv(gym.Env[np.ndarray, np.ndarray]):
    """One step per prunable group; action = keep ratio; reward at the end.

    Args:
        space: The search space (its evaluator defines the budget and the reward).
        evaluate: Function scoring a plan; defaults to ``space.evaluator.evaluate``
            (strategies pass their session's, so evaluations are counted).
        render_mode: Only ``None`` or ``"ansi"``.
        defer_evaluation: Leave the finished plan unscored: the last step's reward is 0 and
            ``info`` carries the plan with ``pending=True`` and no evaluation; the caller
            scores it and supplies the reward.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        space: SearchSpace,
        evaluate: Callable[[Plan], Evaluation] | None = None,
        render_mode: str | None = None,
        defer_evaluation: bool = False,
    ):
        self.space = space
        self.defer_evaluation = defer_evaluation
        self.evaluate_fn = evaluate or space.evaluator.evaluate
        self.render_mode = render_mode
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (len(OBS_FEATURES),), dtype=np.float32)
        self._static = group_embeddings(space)
        self._dense_flops = float(space.graph.flops)
        names = list(space.graph.layers)
        after = np.cumsum([info.flops for info in space.graph.layers.values()][::-1])[::-1]  # from each layer on
        after = np.append(after, 0.0)
        # AMC's "rest": FLOPs of the layers after the group's root layer, over the dense model's
        self._rest = [float(after[names.index(g.root.name) + 1]) / self._dense_flops for g in space.graph.groups]
        self._decided: list[float] = []
        self._last_action = 1.0
        self.last_plan: Plan | None = None
        self.last_evaluation: Evaluation | None = None

    def _observation(self) -> np.ndarray:
        index = len(self._decided)
        n = self.space.dim
        row = self._static[min(index, n - 1)]
        decided = self.space.plan_from_keeps(self._decided + [1.0] * (n - index))
        reduced = 1.0 - self.space.evaluator.cost(decided).flops / self._dense_flops
        rest = self._rest[index] if index < n else 0.0
        obs = np.concatenate([row, [reduced, rest, self._last_action]]).astype(np.float32)
        return np.clip(obs, 0.0, 1.0)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._decided = []
        self._last_action = 1.0
        return self._observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        index = len(self._decided)
        if index >= self.space.dim:
            raise RuntimeError("episode is over; call reset()")
        requested = self.space.action_to_keep(float(np.asarray(action).reshape(-1)[0]), index)
        keep = self.space.clip(index, requested, self._decided)
        self._decided.append(keep)
        self._last_action = keep
        info: dict[str, Any] = {"group": self.space.groups[index], "requested_keep": requested, "keep": keep}
        if len(self._decided) < self.space.dim:
            return self._observation(), 0.0, False, False, info
        plan = self.space.repair(
            self.space.plan_from_keeps(self._decided)
        )  # no-op unless latency noise broke the bounds
        if self.defer_evaluation:
            self.last_plan, self.last_evaluation = plan, None
            info.update(plan=plan, evaluation=None, pending=True)
            return self._observation(), 0.0, True, False, info
        evaluation = self.evaluate_fn(plan)
        self.last_plan, self.last_evaluation = plan, evaluation
        info.update(plan=plan, evaluation=evaluation)
        return self._observation(), float(evaluation.reward), True, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return " ".join(f"{g}:{k:.2f}" for g, k in zip(self.space.groups, self._decided))
