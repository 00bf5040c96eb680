"""Data-free criteria: they read only the weights of the group being scored.

Weights are read from the model being pruned; when an upstream group was pruned before,
a filter's row no longer holds the removed input channels (the scores then describe the
filters as they will be kept).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from automl_prune.criteria.base import (
    Criterion,
    combine,
    group_channels,
    group_name,
    member_weights,
    norm_scales,
)
from automl_prune.errors import InvalidValueError

logger = logging.getLogger(__name__)


class NormCriterion(Criterion):
    """Filter norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

    Per layer the score of a filter is its Lp norm; over a coupled group (e.g. all convs
    feeding one residual add) the raw norms of the member layers (the conv/linear layers
    whose outputs the group prunes) are averaged.

    Args:
        p: The norm's order (1 or 2).
    """

    reference = "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017"

    def __init__(self, p: int = 1):
        self.p = p
        self.name = f"l{p}"

    def __call__(self, group: Any) -> torch.Tensor:
        rows = member_weights(group)
        return combine([(w.norm(p=self.p, dim=1), at) for _, w, at in rows], "none", group_channels(group))


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
        return torch.rand(group_channels(group), generator=self.generator)


class FPGMCriterion(Criterion):
    """Filter pruning via geometric median (He et al., CVPR 2019).

    Filters close to the geometric median of their layer are the ones the other filters
    can best stand in for, so they go first, whatever their norm. As in the paper the
    distance to the geometric median is approximated by the sum of Euclidean distances of
    a filter to all other filters of the layer: the score of filter ``j`` is
    ``sum_k ||W_j - W_k||_2`` (low = redundant). Over a coupled group each member layer's
    scores are divided by their sum (layers differ in weight scale) and then averaged.

    Args:
        p: Order of the distance (2 = Euclidean, as in the paper).
    """

    name = "fpgm"
    reference = "He et al., Filter Pruning via Geometric Median for Deep CNN Acceleration, CVPR 2019"

    def __init__(self, p: float = 2.0):
        self.p = p

    def __call__(self, group: Any) -> torch.Tensor:
        per_layer = []
        for _, rows, at in member_weights(group):
            rows = rows.double()
            per_layer.append((torch.cdist(rows, rows, p=self.p).sum(1), at))
        return combine(per_layer, "sum", group_channels(group))


class SlimmingCriterion(Criterion):
    """Network slimming (Liu et al., ICCV 2017): the BatchNorm scale ``|gamma|`` of each channel.

    The score of a channel is ``|gamma|`` of the BatchNorm that normalises it; over a
    coupled group it is the mean of ``|gamma|`` over all BatchNorm layers whose channels the
    group prunes (e.g. every BN feeding one residual add). The criterion works best on a
    model trained with the L1 penalty on gammas (``TrainConfig(bn_l1=...)``), but it is
    meaningful for any BN model.

    Raises:
        InvalidValueError: The model has no affine BatchNorm, or a group has none (slimming
            cannot rank it; use ``l1`` instead). Never falls back silently.
    """

    name = "slimming"
    reference = "Liu et al., Learning Efficient Convolutional Networks through Network Slimming, ICCV 2017"

    def prepare(self, model: nn.Module, graph: Any, data: Any = None) -> None:
        if not any(isinstance(m, _BatchNorm) and m.weight is not None for m in model.modules()):
            raise InvalidValueError(
                "criterion 'slimming' ranks channels by BatchNorm scales, but the model has no affine BatchNorm "
                "layer; use a weight criterion such as 'l1' (or 'fpgm') instead"
            )

    def __call__(self, group: Any) -> torch.Tensor:
        per_layer = norm_scales(group)
        if not per_layer:
            raise InvalidValueError(
                f"criterion 'slimming' needs a BatchNorm after the layers of group '{group_name(group)}', "
                "but the group has no affine BatchNorm; use 'l1' (or another weight criterion) for this model"
            )
        return combine(per_layer, "none", group_channels(group))
