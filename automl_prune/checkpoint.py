"""Checkpoints that rebuild their own architecture, dense or pruned.

A checkpoint holds the model spec, the input shape, the plan (if pruned) and the state
dict, all plain data, so it loads with ``torch.load(..., weights_only=True)`` and with this
package alone: the dense model is built from the spec, the plan's channel counts are cut
out of it, and the weights are loaded into that pruned architecture.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_prune.errors import CheckpointError
from automl_prune.io import atomic_path
from automl_prune.models import ModelSpec, build_model
from automl_prune.types import Plan
from automl_prune.weights import safe_load

logger = logging.getLogger(__name__)

FORMAT = "automl-prune/checkpoint"
VERSION = 1


@dataclass
class CheckpointInfo:
    """Everything in a checkpoint except the weights.

    Attributes:
        spec: The dense model it derives from.
        input_shape: Example input shape ``(1, C, H, W)``.
        plan: The plan it was pruned with (None for a dense model).
        round_to: Channel rounding used with the plan.
        meta: Free-form facts (dataset, epochs, seed, accuracy, ...), JSON-ready.
    """

    spec: ModelSpec
    input_shape: tuple[int, ...]
    plan: Plan | None = None
    round_to: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def example_inputs(self) -> torch.Tensor:
        """A zero batch of the checkpoint's input shape."""
        return torch.zeros(self.input_shape)


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, info: CheckpointInfo) -> Path:
    """Atomically write ``model``'s weights and ``info`` to ``path``."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_spec": info.spec.to_dict(),
        "input_shape": list(info.input_shape),
        "plan": info.plan.to_dict() if info.plan is not None else None,
        "round_to": info.round_to,
        "meta": info.meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """Read a checkpoint's info and weights without building the model.

    Raises:
        CheckpointError: Missing, corrupt, or not an automl-prune checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; train one with `automl-prune train`")
    payload = safe_load(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not an automl-prune checkpoint (no '{FORMAT}' header); weights trained elsewhere "
            "(a state_dict) are given with --model.weights FILE and --model.name ARCHITECTURE"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint '{path}' has version {payload.get('version')}, this package reads {VERSION}")
    plan = Plan.from_dict(payload["plan"]) if payload.get("plan") else None
    info = CheckpointInfo(
        spec=ModelSpec.from_dict(payload["model_spec"]),
        input_shape=tuple(int(d) for d in payload["input_shape"]),
        plan=plan,
        round_to=int(payload.get("round_to", 1)),
        meta=dict(payload.get("meta") or {}),
    )
    return info, payload["state_dict"]


def build_from_info(info: CheckpointInfo) -> nn.Module:
    """The (possibly pruned) architecture ``info`` describes, with fresh weights."""
    from automl_prune.graph import LayerGraph
    from automl_prune.pruning import rebuild_structure

    model = build_model(info.spec).eval()
    if info.plan is None or not info.plan.keep_ratios:
        return model
    graph = LayerGraph(model, info.example_inputs())
    return rebuild_structure(model, graph, info.plan, info.round_to)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, CheckpointInfo]:
    """Load a checkpoint into the architecture it describes (dense or pruned), in eval mode.

    Raises:
        CheckpointError: Missing, corrupt, or weights that do not fit the architecture.
    """
    info, state = read_checkpoint(path)
    model = build_from_info(info)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"weights in '{path}' do not match {info.spec.name} with its plan: {first}") from exc
    return model.eval(), info
