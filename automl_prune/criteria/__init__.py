"""Importance criteria: which channels of a group to keep.

A criterion is a callable ``(group) -> 1-D tensor`` with one score per channel of a
Torch-Pruning group (the shape of Torch-Pruning's ``Importance``); higher scores are kept.
Scoring a whole group keeps residual-coupled layers consistent. Data-driven criteria
collect what they need in :meth:`Criterion.prepare` and free it in :meth:`Criterion.release`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from automl_prune.registry import Registry

logger = logging.getLogger(__name__)


class Criterion:
    """Base class: scores the channels of a pruning group.

    Attributes:
        name: Registry name.
        needs_data: True when :meth:`prepare` must be given batches.
        needs_grad: True when it back-propagates through the model.
        reference: The paper it implements.
    """

    name: str = ""
    needs_data: bool = False
    needs_grad: bool = False
    reference: str = ""

    def prepare(self, model: nn.Module, graph: Any, data: Any = None) -> None:  # noqa: B027 - optional hook
        """Collect what scoring needs (activations, gradients) from ``model`` on ``data``."""

    def release(self) -> None:  # noqa: B027 - optional hook
        """Free what :meth:`prepare` collected."""

    def __call__(self, group: Any) -> torch.Tensor:
        """One score per channel of ``group`` (higher = more important)."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


def member_weights(group: Any) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, out-channel-major weight rows) for each conv/linear whose outputs ``group`` prunes.

    Rows are reordered so that row ``j`` belongs to the group's channel ``j``.
    """
    rows = []
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if dep.handler.__name__ != "prune_out_channels":
            continue
        index = torch.as_tensor(list(idxs), dtype=torch.long)
        rows.append((module, module.weight.detach().flatten(1)[index]))
    return rows


class NormCriterion(Criterion):
    """Filter norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

    Per layer the score of a filter is its Lp norm; over a coupled group (e.g. all convs
    feeding one residual add) the scores of the member layers are averaged.
    """

    reference = "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017"

    def __init__(self, p: int = 1):
        self.p = p
        self.name = f"l{p}"

    def __call__(self, group: Any) -> torch.Tensor:
        rows = member_weights(group)
        return torch.stack([w.norm(p=self.p, dim=1) for _, w in rows]).mean(0)


class RandomCriterion(Criterion):
    """Random scores: the control every comparison of criteria needs.

    Args:
        seed: Seed of its own generator (scores do not depend on the global RNG).
    """

    name = "random"
    reference = "control"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


CRITERIA: Registry[Any] = Registry("criterion")
CRITERIA.register("l1", lambda **kw: NormCriterion(1, **kw), "L1 norm of each filter (Li et al., ICLR 2017)")
CRITERIA.register("l2", lambda **kw: NormCriterion(2, **kw), "L2 norm of each filter (Li et al., ICLR 2017)")
CRITERIA.register("random", RandomCriterion, "random scores, the control for every comparison")


def get_criterion(name: str, **kwargs: Any) -> Criterion:
    """Instantiate the criterion registered as ``name`` with ``kwargs``.

    Raises:
        UnknownNameError: Listing the valid names.
    """
    return CRITERIA.get(name)(**kwargs)
