"""Reconstruction-based criteria: keep the channels from which the next layer is best rebuilt.

A group's channels are the input channels of its *consumers*, the conv/linear layers that
read them (for a plain CNN the next conv; for a residual stream every conv and shortcut
reading it, and the classifier behind global pooling). ThiNet and LASSO channel pruning
sample entries of the consumers' outputs on real batches and choose the input channels
whose contributions best reproduce them:

* an output entry ``y`` (image, position, output channel ``o``) of a consumer with weight
  ``W`` is ``sum_j xhat_j`` with ``xhat_j = <patch of input channel j, W[o, j]>`` (the bias is
  left out; it does not depend on the selection);
* the criteria only need the Gram matrix ``A = sum xhat xhat^T`` over sampled entries;
  removing a set ``T`` of channels leaves the error ``1_T^T A 1_T``.

With several consumers each consumer's ``A`` is divided by the energy of its sampled
outputs (``1^T A 1``) and the matrices are summed, so the selection minimises the sum of
the consumers' relative errors. A group without a consumer these criteria can model (only
grouped/depthwise convs, or an irregular index map) falls back to the L1 norm of its
filters, with a warning in the log.

After pruning (:meth:`Criterion.after_prune`) the consumers' weights are refitted by least
squares on the same sampled positions, with the inputs the *pruned* model now feeds them
(the original model's outputs as targets, so errors of earlier layers are compensated, as
in He et al.). Consumers are refitted in forward order, each seeing the refitted layers
before it. ThiNet fits one scale per kept input channel (its eq. 15); LASSO refits every
kept weight (the paper's second step). Consumers with too few sampled positions for the
number of unknowns are left as they are (logged).

Indices: the criteria return distinct ranks as scores, which lets :meth:`after_prune` tell
from the pruned shapes which output channels of each consumer survived (apply removes the
lowest-ranked ones).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_prune.criteria.base import (
    Batch,
    Criterion,
    EvalMode,
    GroupLayout,
    LayerSlice,
    build_layouts,
    data_help,
    group_name,
    model_device,
    require_batches,
    to_ranks,
)
from automl_prune.criteria.weight import NormCriterion
from automl_prune.errors import InvalidValueError

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted input is captured."""


def supported_consumer(module: nn.Module) -> bool:
    """True for a layer whose output is a sum of per-input-channel terms we can sample."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and not isinstance(module.padding, str)
        and module.padding_mode == "zeros"
    )


def kernel_area(module: nn.Module) -> int:
    """Entries per input channel in one patch (``kh * kw`` for a conv, 1 for a linear layer)."""
    if isinstance(module, nn.Conv2d):
        return int(module.kernel_size[0] * module.kernel_size[1])
    return 1


def positions_of(module: nn.Module, x: torch.Tensor) -> int:
    """Output positions per image of ``module`` on input ``x``."""
    if isinstance(module, nn.Conv2d):
        size = [x.shape[-2], x.shape[-1]]
        out = 1
        for d in range(2):
            span = module.dilation[d] * (module.kernel_size[d] - 1) + 1
            out *= (size[d] + 2 * module.padding[d] - span) // module.stride[d] + 1
        return out
    return x.numel() // (x.shape[0] * x.shape[-1])


def patches(module: nn.Module, x: torch.Tensor, images: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """``S x F`` input patches of ``module`` at (image, output position) pairs.

    ``F`` is ``in_channels * kh * kw`` (channel-major, like ``weight.flatten(1)``) for a conv
    and ``in_features`` for a linear layer. Only the sampled windows are gathered.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])[images, places]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    out_w = (x.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    rows = (places // out_w * sh).view(-1, 1) + torch.arange(kh, device=x.device).view(1, -1) * dh  # S x kh
    cols = (places % out_w * sw).view(-1, 1) + torch.arange(kw, device=x.device).view(1, -1) * dw  # S x kw
    windows = x[images.view(-1, 1, 1), :, rows.view(-1, kh, 1), cols.view(-1, 1, kw)]  # S x kh x kw x C
    return windows.permute(0, 3, 1, 2).reshape(images.shape[0], -1)


def flat_weight(module: nn.Module) -> torch.Tensor:
    """``n x F`` weight matching :func:`patches`."""
    return module.weight.detach().flatten(1)


@dataclass
class _Consumer:
    """Samples of one consumer collected on the dense model."""

    name: str
    module: nn.Module
    samples: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per batch: images, positions
    targets: list[torch.Tensor] = field(default_factory=list)  # per batch: S_b x n outputs (no bias)


class ReconstructionCriterion(Criterion):
    """Base of ThiNet and LASSO channel pruning (see the module docstring).

    Args:
        positions_per_image: Output positions sampled per image and consumer.
        outputs_per_position: Output channels sampled per position for the selection
            (ThiNet samples single output entries; all channels would cost ``n`` times more).
        reconstruct: Refit the consumers' weights after pruning.
        ridge: Ridge term of the least-squares refits, relative to the mean diagonal.
        seed: Seed of the sampling.
    """

    needs_data = True

    def __init__(
        self,
        positions_per_image: int = 8,
        outputs_per_position: int = 8,
        reconstruct: bool = True,
        ridge: float = 1e-4,
        seed: int = 0,
    ):
        if positions_per_image < 1 or outputs_per_position < 1:
            raise InvalidValueError("positions_per_image and outputs_per_position must be >= 1")
        if ridge < 0:
            raise InvalidValueError(f"ridge must be >= 0, got {ridge}")
        self.positions_per_image = positions_per_image
        self.outputs_per_position = outputs_per_position
        self.reconstruct = reconstruct
        self.ridge = ridge
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self._layouts: dict[str, GroupLayout] | None = None
        self._order: dict[str, int] = {}
        self._grams: dict[str, list[torch.Tensor]] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._batches: list[Batch] = []
        self._ranks: dict[str, torch.Tensor] = {}
        self._fallback = NormCriterion(1)

    def release(self) -> None:
        self._reset()

    # ------------------------------------------------------------------ prepare
    def prepare(self, model: nn.Module, graph: Any, data: Any = None) -> None:
        self._reset()
        batches = require_batches(self.name, data)
        layouts = build_layouts(model, graph)
        self._order = {name: i for i, name in enumerate(graph.layers)}
        uses: dict[str, list[tuple[str, LayerSlice]]] = {}
        for layout in layouts.values():
            for cons in layout.consumers:
                if not supported_consumer(cons.module):
                    continue
                if isinstance(cons.module, nn.Conv2d) and cons.index.shape[1] != 1:
                    continue
                uses.setdefault(cons.name, []).append((layout.name, cons))
        modules = dict(model.named_modules())
        grams: dict[tuple[str, str], torch.Tensor] = {}
        generator = torch.Generator().manual_seed(self.seed)
        consumers = {name: _Consumer(name, modules[name]) for name in uses}

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                self._sample(consumers[name], uses[name], inputs[0].detach(), grams, generator)

            return hook

        handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in uses]
        device = model_device(model)
        try:
            with EvalMode(model), torch.no_grad():
                for x, _ in batches:
                    model(x.to(device))
        finally:
            for handle in handles:
                handle.remove()
        for (group, _), gram in grams.items():
            energy = float(gram.sum())
            if energy > 0:
                self._grams.setdefault(group, []).append(gram / energy)
        self._layouts = layouts
        self._consumers = consumers if self.reconstruct else {}
        self._batches = batches if self.reconstruct else []
        logger.debug("%s: sampled %d consumer layers on %d batches", self.name, len(consumers), len(batches))

    def _sample(
        self,
        consumer: _Consumer,
        uses: list[tuple[str, LayerSlice]],
        x: torch.Tensor,
        grams: dict[tuple[str, str], torch.Tensor],
        generator: torch.Generator,
    ) -> None:
        module = consumer.module
        batch = x.shape[0]
        per_image = positions_of(module, x)
        take = min(self.positions_per_image, per_image)
        places = torch.rand(batch, per_image, generator=generator).argsort(1)[:, :take].reshape(-1).to(x.device)
        images = torch.arange(batch, device=x.device).repeat_interleave(take)
        patch = patches(module, x, images, places).float()
        weight = flat_weight(module).float()
        if self.reconstruct:
            consumer.samples.append((images.cpu(), places.cpu()))
            consumer.targets.append((patch @ weight.t()).cpu())
        n_out = weight.shape[0]
        area = kernel_area(module)
        rows = patch.shape[0]
        picks = min(self.outputs_per_position, n_out)
        outs = torch.rand(rows, n_out, generator=generator).argsort(1)[:, :picks].to(x.device)
        for group, cons in uses:
            if isinstance(module, nn.Conv2d):
                units = (cons.index[:, :1] * area + torch.arange(area)).to(x.device)  # C x kh*kw
            else:
                units = cons.index.to(x.device)  # C x q
            u = patch[:, units]  # S x C x q
            v = weight[:, units][outs]  # S x picks x C x q
            xhat = torch.einsum("scq,srcq->src", u, v).reshape(-1, units.shape[0]).double()
            key = (group, consumer.name)
            grams[key] = grams.get(key, 0) + (xhat.t() @ xhat).cpu()

    # ------------------------------------------------------------------ scoring
    def __call__(self, group: Any) -> torch.Tensor:
        if self._layouts is None:
            raise InvalidValueError(
                data_help(self.name) + f" (prepare() was not called before scoring with '{self.name}')"
            )
        name = group_name(group)
        grams = self._grams.get(name)
        if grams:
            gram = torch.stack(grams).sum(0)
            ranks = to_ranks(self._select(gram), torch.diagonal(gram))
        else:
            logger.warning(
                "%s: group '%s' has no conv/linear consumer whose output can be reconstructed; "
                "ranking its channels by L1 norm instead",
                self.name,
                name,
            )
            ranks = to_ranks(self._fallback(group))
        self._ranks[name] = ranks
        return ranks

    def _select(self, gram: torch.Tensor) -> torch.Tensor:
        """Scores (higher = keep) from the group's ``C x C`` normalised Gram matrix."""
        raise NotImplementedError

    # ------------------------------------------------------------------ refit
    def after_prune(self, pruned: nn.Module) -> None:
        """Refit the consumers of every pruned group (in forward order) on the pruned model's inputs."""
        if not self.reconstruct or self._layouts is None or not self._ranks:
            return
        names = sorted(
            {c.name for g in self._ranks for c in self._layouts[g].consumers if c.name in self._consumers},
            key=lambda n: self._order.get(n, 0),
        )
        modules = dict(pruned.named_modules())
        with EvalMode(pruned), torch.no_grad():
            for name in names:
                module = modules.get(name)
                kept = self._kept_outputs(name, module) if module is not None else None
                if module is None or kept is None:
                    logger.warning(
                        "%s: cannot match consumer '%s' to the pruned model; left as pruned", self.name, name
                    )
                    continue
                rows = sum(t.shape[0] for t in self._consumers[name].targets)
                needed = self._unknowns(module)
                if rows < needed:
                    logger.warning(
                        "%s: only %d sampled positions for %d unknowns of '%s'; its weights are left as pruned "
                        "(pass more batches or raise positions_per_image)",
                        self.name,
                        rows,
                        needed,
                        name,
                    )
                    continue
                self._refit(pruned, name, module, kept)

    def _kept_outputs(self, name: str, module: nn.Module) -> torch.Tensor | None:
        """Dense indices of the output channels ``module`` (consumer ``name``) still has."""
        assert self._layouts is not None
        dense = self._consumers[name].module
        n_dense, n_now = dense.weight.shape[0], module.weight.shape[0]
        keep = torch.ones(n_dense, dtype=torch.bool)
        for layout in self._layouts.values():
            for member in layout.members:
                if member.name != name or layout.name not in self._ranks:
                    continue
                ranks = self._ranks[layout.name]
                n_remove = (n_dense - n_now) // member.index.shape[1]
                removed = torch.argsort(ranks, stable=True)[:n_remove]
                keep[member.index[removed].flatten()] = False
        if int(keep.sum()) != n_now:
            return None
        return torch.nonzero(keep).flatten()

    def _pruned_inputs(self, model: nn.Module, module: nn.Module) -> list[torch.Tensor]:
        """The input ``module`` receives in ``model`` for every stored batch."""
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured.append(inputs[0].detach())
            raise _StopForward

        handle = module.register_forward_pre_hook(hook)
        device = model_device(model)
        try:
            for x, _ in self._batches:
                try:
                    model(x.to(device))
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return captured

    def _unknowns(self, module: nn.Module) -> int:
        """Sampled positions needed at least to refit ``module``."""
        raise NotImplementedError

    def _refit(self, model: nn.Module, name: str, module: nn.Module, kept: torch.Tensor) -> None:
        """Refit the weights of consumer ``name`` (``module`` in ``model``) in place."""
        raise NotImplementedError

    def _solve(self, gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Ridge-regularised solution of ``gram @ w = rhs`` (float64)."""
        scale = float(torch.diagonal(gram).mean()) if gram.numel() else 0.0
        reg = self.ridge * scale if scale > 0 else 1e-12
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        return torch.linalg.solve(gram + reg * eye, rhs)


class ThiNetCriterion(ReconstructionCriterion):
    """ThiNet (Luo et al., ICCV 2017): greedy channel selection for the next layer.

    Channels are removed one at a time, each time the one whose removal adds the least to
    the error ``sum_i (sum_{j in T} xhat_ij)^2`` of the sampled consumer outputs (``T``:
    channels removed so far); the order of removal is the ranking (first removed = lowest
    score). Over several consumers the normalised errors are summed (module docstring).
    After pruning, each consumer's kept input channels get one least-squares scale each
    (the paper's eq. 15), fitted on the pruned model's inputs.

    Args:
        positions_per_image: Output positions sampled per image and consumer (the paper: 10).
        outputs_per_position: Output channels sampled per position.
        reconstruct: Fit the per-channel scales after pruning.
        ridge: Relative ridge term of the scale fit.
        seed: Seed of the sampling.
    """

    name = "thinet"
    reference = "Luo et al., ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression, ICCV 2017"

    def _select(self, gram: torch.Tensor) -> torch.Tensor:
        channels = gram.shape[0]
        removed = torch.zeros(channels, dtype=torch.bool)
        cross = torch.zeros(channels, dtype=torch.float64)
        diag = torch.diagonal(gram)
        step = torch.empty(channels, dtype=torch.float64)
        for i in range(channels):
            cost = (2 * cross + diag).masked_fill(removed, float("inf"))
            j = int(torch.argmin(cost))
            removed[j] = True
            step[j] = i
            cross += gram[j]
        return step

    def _unknowns(self, module: nn.Module) -> int:
        # one scale per input unit; each position gives outputs_per_position equations
        units = flat_weight(module).shape[1] // kernel_area(module)
        return -(-units // min(self.outputs_per_position, module.weight.shape[0]))

    def _refit(self, model: nn.Module, name: str, module: nn.Module, kept: torch.Tensor) -> None:
        consumer = self._consumers[name]
        weight = flat_weight(module).double()
        n_out, area = weight.shape[0], kernel_area(module)
        units = weight.shape[1] // area
        w3 = weight.view(n_out, units, area)
        generator = torch.Generator().manual_seed(self.seed + 1)
        gram = torch.zeros(units, units, dtype=torch.float64)
        rhs = torch.zeros(units, dtype=torch.float64)
        for x, (images, places), target in zip(
            self._pruned_inputs(model, module), consumer.samples, consumer.targets, strict=True
        ):
            patch = patches(module, x, images.to(x.device), places.to(x.device)).double().cpu().view(-1, units, area)
            picks = min(self.outputs_per_position, n_out)
            outs = torch.rand(patch.shape[0], n_out, generator=generator).argsort(1)[:, :picks]
            z = torch.einsum("scq,srcq->src", patch, w3[outs]).reshape(-1, units)
            y = target.double()[:, kept].gather(1, outs).reshape(-1)
            gram += z.t() @ z
            rhs += z.t() @ y
        scales = self._solve(gram, rhs)
        new = (w3 * scales.view(1, units, 1)).view_as(module.weight)
        module.weight.copy_(new.to(module.weight.dtype))
        logger.debug(
            "%s: rescaled %d input channels of %s (scales %.3f..%.3f)",
            self.name,
            units,
            name,
            float(scales.min()),
            float(scales.max()),
        )


class LassoCriterion(ReconstructionCriterion):
    """LASSO channel pruning (He, Zhang & Sun, ICCV 2017), selection and reconstruction.

    Selection solves ``min_beta ||y - sum_j beta_j xhat_j||^2 + lambda ||beta||_1`` (``beta >= 0``)
    over the sampled consumer outputs for the whole path of ``lambda`` (LARS, on the
    normalised Gram matrix; ``beta = 1`` reproduces the dense output). A channel's score is
    the largest ``lambda`` at which it is still selected, so any number of channels can be
    kept: those that survive the strongest penalty. The paper's ``||W_j||_F = 1``
    constraint is not needed here because the weights stay fixed during selection. A group
    with several consumers solves one LASSO with a shared ``beta`` on the sum of the
    consumers' Gram matrices, each normalised by its output energy.

    Reconstruction (the paper's second step): after pruning, every consumer of a pruned
    group gets all its kept weights refitted by least squares,
    ``min_W' ||Y - X' W'^T||^2``, with ``Y`` the dense model's outputs and ``X'`` the input
    patches the pruned model feeds it, at the sampled positions. This changes the weights
    in the pruned model (the bias stays). With several consumers, each is refitted; linear
    consumers (a classifier behind global pooling) are refitted too.

    Args:
        positions_per_image: Output positions sampled per image and consumer.
        outputs_per_position: Output channels sampled per position for the selection.
        reconstruct: Refit the consumers' weights after pruning (False: selection only).
        ridge: Relative ridge term of the refit.
        seed: Seed of the sampling.
    """

    name = "lasso"
    reference = "He, Zhang & Sun, Channel Pruning for Accelerating Very Deep Neural Networks, ICCV 2017"

    def _select(self, gram: torch.Tensor) -> torch.Tensor:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import lars_path_gram

        channels = gram.shape[0]
        g = gram.numpy().astype(np.float64)
        g = g + np.eye(channels) * 1e-10 * max(float(np.trace(g)) / channels, 1e-30)
        xy = g @ np.ones(channels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            alphas, _, coefs = lars_path_gram(xy, g, n_samples=1, max_iter=4 * channels, method="lasso", positive=True)
        active = coefs > 1e-12 * max(float(np.abs(coefs).max()), 1e-30)
        entry = np.where(active, alphas[None, :], 0.0).max(1)
        return torch.from_numpy(entry)

    def _unknowns(self, module: nn.Module) -> int:
        # every output channel has in_channels * kh * kw weights, fitted on the same positions
        return flat_weight(module).shape[1]

    def _refit(self, model: nn.Module, name: str, module: nn.Module, kept: torch.Tensor) -> None:
        consumer = self._consumers[name]
        dims = flat_weight(module).shape[1]
        gram = torch.zeros(dims, dims, dtype=torch.float64)
        rhs = torch.zeros(dims, kept.numel(), dtype=torch.float64)
        for x, (images, places), target in zip(
            self._pruned_inputs(model, module), consumer.samples, consumer.targets, strict=True
        ):
            patch = patches(module, x, images.to(x.device), places.to(x.device)).float().cpu()
            y = target[:, kept].float()
            gram += (patch.t() @ patch).double()
            rhs += (patch.t() @ y).double()
        solution = self._solve(gram, rhs)  # dims x n_out
        module.weight.copy_(solution.t().reshape(module.weight.shape).to(module.weight.dtype))
        logger.debug("%s: refitted %s", self.name, name)
