"""Gymnasium environments over a model's pruning decisions, registered with ``gymnasium.register``.

- ``LayerPrune-v0``: AMC's layer-by-layer environment (one step per prunable group).
- ``SkipGate-v0``: one step per skippable residual block, keep or skip.

Both are built with ``gymnasium.make(ENV_ID, evaluator=..., space=...)``.
"""

from __future__ import annotations

import gymnasium

ENV_IDS = ("LayerPrune-v0", "SkipGate-v0")

_ENTRY_POINTS = {
    "LayerPrune-v0": "automl_prune.envs.layer_prune:LayerPruneEnv",
    "SkipGate-v0": "automl_prune.envs.skip_gate:SkipGateEnv",
}

for _env_id, _entry in _ENTRY_POINTS.items():
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=_entry)


def list_envs() -> list[tuple[str, str]]:
    """(id, description) of every registered env of this package."""
    return [
        ("LayerPrune-v0", "AMC: one step per prunable group, action = keep ratio in Box(-1, 1), budget-clipped"),
        ("SkipGate-v0", "one step per identity-shortcut residual block, action Discrete(2): keep / skip"),
    ]
