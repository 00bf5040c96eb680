"""Data-driven criteria: statistics of the channels' outputs (and gradients) on real batches.

All of them run the *dense* model in eval mode on the batches given to
:func:`automl_prune.pruning.apply` (as many as are passed) and measure, for every layer
whose outputs a group prunes (its *members*), the channel's output feature map:

* the output of the BatchNorm that directly follows the layer, when there is one, else
  the layer's own output;
* activation statistics (APoZ, HRank, entropy) look at that output after a ReLU. This is
  the true post-activation for conv-BN-ReLU (and for ReLU6, whose zeros are the same);
  for a layer whose output is not rectified directly (the last conv of a residual branch,
  a MobileNetV2 projection) it is the rectified output of that branch.

The scores of one group are the mean over its member layers of the per-layer scores,
normalised per layer where layers are not on a common scale (see each class).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automl_prune.criteria.base import (
    Batch,
    Criterion,
    EvalMode,
    GroupLayout,
    build_layouts,
    combine,
    data_help,
    following_norm,
    group_name,
    model_device,
    require_batches,
)
from automl_prune.criteria.weight import NormCriterion
from automl_prune.errors import InvalidValueError

logger = logging.getLogger(__name__)


def _channels_first(output: torch.Tensor, channel_last: bool) -> torch.Tensor:
    """``N x C x H x W`` view of a layer output (a linear layer's features are last)."""
    if channel_last and output.dim() > 2:
        output = output.movedim(-1, 1)
    while output.dim() < 4:
        output = output.unsqueeze(-1)
    return output.flatten(3) if output.dim() > 4 else output


class ActivationCriterion(Criterion):
    """Base of the data-driven criteria that score the members' output channels.

    Subclasses implement :meth:`_collect`, returning one score vector per member layer
    (in the layer's own channel order); :meth:`__call__` reorders them into group order
    and averages them after normalising each layer with :attr:`normalisation`.

    Attributes:
        normalisation: Per-layer normalisation before averaging (see
            :func:`~automl_prune.criteria.base.normalise`).
    """

    needs_data = True
    normalisation = "none"

    def __init__(self) -> None:
        self._layouts: dict[str, GroupLayout] | None = None
        self._scores: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, graph: Any, data: Any = None) -> None:
        batches = require_batches(self.name, data, need_labels=self.needs_grad)
        layouts = build_layouts(model, graph)
        order = {name: i for i, name in enumerate(graph.layers)}
        members = sorted({s.name for lay in layouts.values() for s in lay.members}, key=lambda n: order.get(n, 0))
        modules = dict(model.named_modules())
        targets = {m: modules[following_norm(graph, m) or m] for m in members}
        with EvalMode(model):
            scores = self._collect(model, batches, targets)
        self._scores = {name: s.detach().double().cpu() for name, s in scores.items()}
        self._layouts = layouts
        logger.debug("%s: scored %d layers on %d batches", self.name, len(self._scores), len(batches))

    def release(self) -> None:
        self._layouts = None
        self._scores = {}

    def _collect(
        self, model: nn.Module, batches: list[Batch], targets: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        """Per-member channel scores; ``targets`` maps member name -> module whose output to measure."""
        raise NotImplementedError

    def __call__(self, group: Any) -> torch.Tensor:
        if self._layouts is None:
            raise InvalidValueError(
                data_help(self.name) + f" (prepare() was not called before scoring with '{self.name}')"
            )
        name = group_name(group)
        layout = self._layouts.get(name)
        if layout is None:
            raise RuntimeError(f"criterion {self.name}: group '{name}' is not in the layer graph it was prepared on")
        per_layer = [self._scores[s.name][s.index].mean(1) for s in layout.members if s.name in self._scores]
        if not per_layer:
            logger.warning("%s: no output of group '%s' was seen on the data; ranking it by L1 norm", self.name, name)
            return NormCriterion(1)(group)
        return combine(per_layer, self.normalisation)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _forward_stats(
        model: nn.Module,
        batches: list[Batch],
        targets: dict[str, nn.Module],
        update: Callable[[str, torch.Tensor], None],
    ) -> None:
        """Run ``batches`` through ``model``, calling ``update(member, N x C x H x W output)``."""
        device = model_device(model)
        handles = []
        for member, module in targets.items():
            channel_last = isinstance(module, nn.Linear)

            def hook(_m: nn.Module, _i: Any, out: torch.Tensor, member: str = member, cl: bool = channel_last) -> None:
                update(member, _channels_first(out.detach(), cl))

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                for x, _ in batches:
                    model(x.to(device))
        finally:
            for handle in handles:
                handle.remove()


class APoZCriterion(ActivationCriterion):
    """Average percentage of zeros (Hu et al., "Network Trimming", 2016).

    APoZ of a channel is the fraction of zero entries of its post-ReLU output over all
    images and positions; a channel that is mostly zero contributes little, so the score is
    ``1 - APoZ`` (higher = keep). Over a coupled group it is the mean over member layers
    (APoZ is a fraction already, so no normalisation).
    """

    name = "apoz"
    reference = "Hu et al., Network Trimming: A Data-Driven Neuron Pruning Approach, arXiv 2016"

    def _collect(
        self, model: nn.Module, batches: list[Batch], targets: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        zeros: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def update(member: str, out: torch.Tensor) -> None:
            z = (out <= 0).sum(dim=(0, 2, 3)).double().cpu()
            zeros[member] = zeros.get(member, 0) + z
            counts[member] = counts.get(member, 0) + out.numel() // out.shape[1]

        self._forward_stats(model, batches, targets, update)
        return {m: 1.0 - zeros[m] / counts[m] for m in zeros}


class HRankCriterion(ActivationCriterion):
    """HRank (Lin et al., CVPR 2020): average rank of each channel's feature maps.

    For every image the post-ReLU ``H x W`` feature map of a channel is a matrix; its rank
    (numerical, by singular values) is averaged over all images. Low-rank maps carry little
    information. Per layer the average rank is divided by ``min(H, W)`` (the largest
    possible rank) so that members of a group at different resolutions are comparable;
    the group's score is the mean over member layers.
    """

    name = "hrank"
    reference = "Lin et al., HRank: Filter Pruning using High-Rank Feature Map, CVPR 2020"

    def _collect(
        self, model: nn.Module, batches: list[Batch], targets: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        sizes: dict[str, int] = {}

        def update(member: str, out: torch.Tensor) -> None:
            maps = F.relu(out).float()
            ranks = torch.linalg.matrix_rank(maps).sum(0).double().cpu()
            sums[member] = sums.get(member, 0) + ranks
            counts[member] = counts.get(member, 0) + out.shape[0]
            sizes[member] = min(out.shape[2], out.shape[3])

        self._forward_stats(model, batches, targets, update)
        return {m: sums[m] / counts[m] / sizes[m] for m in sums}


class EntropyCriterion(ActivationCriterion):
    """Entropy of the channel's response distribution (Luo & Wu, 2017).

    Each image gives one value per channel: the global average of its post-ReLU feature
    map. Over all images these values are put in ``bins`` equal-width bins spanning the
    channel's own range and the score is the entropy ``-sum p_i log p_i`` of the bin
    frequencies (a channel that responds the same to every image has entropy 0 and goes
    first). Entropies of all layers are on the same scale (nats, at most ``log bins``), so a
    group's score is the plain mean over member layers.

    Args:
        bins: Histogram bins (the paper uses 100, which needs thousands of images; with a
            few hundred images fewer bins give steadier estimates).
    """

    name = "entropy"
    reference = "Luo & Wu, An Entropy-based Pruning Method for CNN Compression, arXiv 2017"

    def __init__(self, bins: int = 32):
        super().__init__()
        if bins < 2:
            raise InvalidValueError(f"entropy needs at least 2 bins, got {bins}")
        self.bins = bins

    def _collect(
        self, model: nn.Module, batches: list[Batch], targets: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        pooled: dict[str, list[torch.Tensor]] = {}

        def update(member: str, out: torch.Tensor) -> None:
            pooled.setdefault(member, []).append(F.relu(out).mean(dim=(2, 3)).double().cpu())

        self._forward_stats(model, batches, targets, update)
        return {m: self.entropy(torch.cat(v)) for m, v in pooled.items()}

    def entropy(self, values: torch.Tensor) -> torch.Tensor:
        """Histogram entropy (nats) of each column of an ``N x C`` matrix of responses."""
        lo = values.min(0).values
        width = values.max(0).values - lo
        scaled = (values - lo) / torch.where(width > 0, width, torch.ones_like(width))
        bins = (scaled * self.bins).long().clamp_(0, self.bins - 1)
        counts = torch.zeros(values.shape[1], self.bins, dtype=torch.float64)
        counts.scatter_add_(1, bins.t(), torch.ones_like(bins.t(), dtype=torch.float64))
        p = counts / values.shape[0]
        return -(p * torch.log(p.clamp_min(1e-300))).sum(1)


class TaylorCriterion(ActivationCriterion):
    """First-order Taylor expansion (Molchanov et al., ICLR 2017 / CVPR 2019).

    Removing channel ``c`` changes the loss by about ``|dL/dz_c . z_c|``: per image the
    score is ``|(1/M) sum_m z_{c,m} dL/dz_{c,m}|`` over the ``M`` positions of the channel's
    output ``z`` (the BatchNorm output when a BN follows the layer), with ``L`` the
    cross-entropy on the batch labels; it is averaged over all images of all batches. As
    in the 2017 paper each layer's scores are divided by their L2 norm; a group's score is
    the mean over member layers.
    """

    name = "taylor"
    needs_grad = True
    normalisation = "l2"
    reference = "Molchanov et al., Pruning CNNs for Resource Efficient Inference, ICLR 2017 (Taylor, CVPR 2019)"

    def _collect(
        self, model: nn.Module, batches: list[Batch], targets: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        device = model_device(model)
        sums: dict[str, torch.Tensor] = {}
        images = 0
        gates: dict[str, tuple[torch.Tensor, int]] = {}  # member -> (gate, positions per channel)
        handles = []
        for member, module in targets.items():
            channel_last = isinstance(module, nn.Linear)

            def hook(
                _m: nn.Module, _i: Any, out: torch.Tensor, member: str = member, cl: bool = channel_last
            ) -> torch.Tensor:
                shape = [1] * out.dim()
                shape[0] = out.shape[0]
                channel_dim = out.dim() - 1 if cl else 1
                shape[channel_dim] = out.shape[channel_dim]
                gate = torch.ones(shape, device=out.device, dtype=out.dtype, requires_grad=True)
                gates[member] = (gate, out.numel() // (out.shape[0] * out.shape[channel_dim]))
                return out * gate

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                for x, y in batches:
                    assert y is not None  # checked by require_batches
                    gates.clear()
                    logits = model(x.to(device))
                    loss = F.cross_entropy(logits, y.to(device), reduction="sum")
                    names = list(gates)
                    grads = torch.autograd.grad(loss, [gates[n][0] for n in names], allow_unused=True)
                    for member, grad in zip(names, grads, strict=True):
                        if grad is None:
                            continue
                        positions = gates[member][1]
                        per_image = grad.reshape(grad.shape[0], -1)  # N x C: the gate has no other dims
                        value = (per_image.abs() / positions).sum(0).double().cpu()
                        sums[member] = sums.get(member, 0) + value
                    images += x.shape[0]
        finally:
            for handle in handles:
                handle.remove()
            gates.clear()
        return {m: s / images for m, s in sums.items()}


class SNIPCriterion(ActivationCriterion):
    """Connection sensitivity (Lee et al., "SNIP", ICLR 2019), summed per filter.

    The sensitivity of a weight is ``|w * dL/dw|`` with ``L`` the cross-entropy summed over
    all the batches given (the gradient is accumulated first, then multiplied). A filter's
    score is the sum over its weights. As in SNIP each layer's scores are divided by
    their sum; a group's score is the mean over member layers.
    """

    name = "snip"
    needs_grad = True
    normalisation = "sum"
    reference = "Lee et al., SNIP: Single-shot Network Pruning based on Connection Sensitivity, ICLR 2019"

    def _collect(
        self, model: nn.Module, batches: list[Batch], targets: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        device = model_device(model)
        modules = dict(model.named_modules())
        names = list(targets)
        weights = [modules[n].weight for n in names]
        flags = [w.requires_grad for w in weights]
        totals: list[torch.Tensor | None] = [None] * len(weights)
        try:
            for w in weights:
                w.requires_grad_(True)
            with torch.enable_grad():
                for x, y in batches:
                    assert y is not None  # checked by require_batches
                    loss = F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")
                    grads = torch.autograd.grad(loss, weights, allow_unused=True)
                    for i, grad in enumerate(grads):
                        if grad is not None:
                            totals[i] = grad if totals[i] is None else totals[i] + grad
        finally:
            for w, flag in zip(weights, flags, strict=True):
                w.requires_grad_(flag)
        scores = {}
        for name, w, g in zip(names, weights, totals, strict=True):
            if g is None:
                scores[name] = torch.zeros(w.shape[0], dtype=torch.float64)
            else:
                scores[name] = (w.detach() * g).abs().flatten(1).sum(1)
        return scores
