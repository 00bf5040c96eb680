"""Importance criteria: which channels of a group to keep.

A criterion is a callable ``(group) -> 1-D tensor`` with one score per channel of a
Torch-Pruning group (the shape of Torch-Pruning's ``Importance``); higher scores are kept.
Scoring a whole group keeps residual-coupled layers consistent: every criterion scores each
layer the group touches and combines the per-layer scores (see each class). Data-driven
criteria collect what they need in :meth:`Criterion.prepare` (on the dense model, from the
batches passed to :func:`automl_prune.pruning.apply`) and free it in
:meth:`Criterion.release`; reconstruction criteria also refit weights in
:meth:`Criterion.after_prune`.

Registered criteria (``automl-prune list criteria``):

* data-free: ``l1``, ``l2``, ``fpgm``, ``slimming``, ``random``;
* data-driven: ``apoz``, ``hrank``, ``entropy``, ``taylor``, ``snip``;
* reconstruction-based (data-driven): ``thinet``, ``lasso``.
"""

from __future__ import annotations

import logging
from typing import Any

from automl_prune.criteria.base import Criterion, GroupLayout, LayerSlice, build_layouts, member_weights
from automl_prune.criteria.weight import FPGMCriterion, NormCriterion, RandomCriterion, SlimmingCriterion
from automl_prune.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "CRITERIA",
    "Criterion",
    "FPGMCriterion",
    "GroupLayout",
    "LayerSlice",
    "NormCriterion",
    "RandomCriterion",
    "SlimmingCriterion",
    "build_layouts",
    "get_criterion",
    "member_weights",
]

_ACT = "automl_prune.criteria.activation"
_REC = "automl_prune.criteria.reconstruction"

CRITERIA: Registry[Any] = Registry("criterion")
CRITERIA.register("l1", lambda **kw: NormCriterion(1, **kw), "L1 norm of each filter (Li et al., ICLR 2017)")
CRITERIA.register("l2", lambda **kw: NormCriterion(2, **kw), "L2 norm of each filter (Li et al., ICLR 2017)")
CRITERIA.register(
    "fpgm",
    FPGMCriterion,
    "filters nearest the layer's geometric median go first: most redundant, not smallest (He et al., CVPR 2019)",
)
CRITERIA.register(
    "slimming", SlimmingCriterion, "|gamma| of the BatchNorm after each channel; BN models only (Liu et al., ICCV 2017)"
)
CRITERIA.register("random", RandomCriterion, "random scores, the control for every comparison")
CRITERIA.register(
    "apoz",
    f"{_ACT}:APoZCriterion",
    "data-driven: 1 - average percentage of zeros after ReLU (Hu et al., Network Trimming 2016)",
)
CRITERIA.register(
    "hrank",
    f"{_ACT}:HRankCriterion",
    "data-driven: average rank of each channel's feature maps (Lin et al., CVPR 2020)",
)
CRITERIA.register(
    "entropy",
    f"{_ACT}:EntropyCriterion",
    "data-driven: entropy of each channel's pooled-response histogram (Luo & Wu, 2017)",
)
CRITERIA.register(
    "taylor",
    f"{_ACT}:TaylorCriterion",
    "data-driven, gradients: |activation x gradient| of the loss, first-order Taylor (Molchanov et al., ICLR 2017/CVPR 2019)",
)
CRITERIA.register(
    "snip",
    f"{_ACT}:SNIPCriterion",
    "data-driven, gradients: |w x dL/dw| summed per filter (Lee et al., SNIP, ICLR 2019)",
)
CRITERIA.register(
    "thinet",
    f"{_REC}:ThiNetCriterion",
    "data-driven: greedy input channels of the next layer that best rebuild its output, + rescaling (Luo et al., ICCV 2017)",
)
CRITERIA.register(
    "lasso",
    f"{_REC}:LassoCriterion",
    "data-driven: LASSO channel selection + least-squares refit of the next layer (He, Zhang & Sun, ICCV 2017)",
)


def get_criterion(name: str, **kwargs: Any) -> Criterion:
    """Instantiate the criterion registered as ``name`` with ``kwargs``.

    Raises:
        UnknownNameError: Listing the valid names.
    """
    return CRITERIA.get(name)(**kwargs)
