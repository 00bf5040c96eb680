"""Dynamic SkipNet (Wang et al., ECCV 2018): residual blocks that each input may skip.

A :class:`GatedNetwork` wraps a model with skippable residual blocks (identity shortcuts,
:func:`~automl_prune.graph.is_skippable`): every such block gets a small feed-forward gate
(SkipNet's FFGate: global average pooling, a hidden layer, one logit) that reads the block's
input and decides, per input, whether the block runs: ``x_{i+1} = g F(x_i) + (1 - g) x_i``.

Training follows the paper in two stages (:func:`train_gated`):

1. supervised pre-training with *soft* gates (``g = sigmoid(logit)``, so the whole network is
   differentiable) on the cross-entropy loss;
2. hybrid reinforcement learning: *hard* gates ``g ~ Bernoulli(sigmoid(logit))`` (each outcome
   kept at least :data:`EXPLORATION` likely); each input's reward is minus its cross-entropy
   minus ``compute_weight`` times the share of the dense FLOPs it executed (SkipNet's alpha); the
   gates learn by REINFORCE (batch-mean baseline, advantages scaled to unit variance) while the
   network keeps learning from the supervised loss. The gates read the features without
   reshaping them (their input is detached).

After training, the eval-mode threshold on the gate logit is set on search-val to the
lowest that meets a target mean FLOPs share (:func:`calibrate_threshold`), so the budget holds
whatever the compute weight did; ``dual_lr > 0`` also moves the weight towards the target during
training (dual ascent), which overshoots easily and is off by default.

At inference (eval mode) a gate's logit is compared with the threshold and a skipped
block is really not computed: a batch runs the block only on the inputs whose gate opens (at
batch 1: not at all when closed). The gated model scripts to TorchScript with its control
flow (:func:`script_gated`), and saves and reloads (:func:`save_gated`, :func:`load_gated`).
"""

# No `from __future__ import annotations`: TorchScript reads the forward methods' annotations as objects.
import copy
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from automl_prune.checkpoint import CheckpointInfo, read_checkpoint, save_checkpoint
from automl_prune.data import DataSplits, TensorData
from automl_prune.errors import CheckpointError, InvalidValueError
from automl_prune.graph import LayerGraph
from automl_prune.models import ModelSpec, build_model
from automl_prune.progress import Progress
from automl_prune.runtimes import Runner, onnx_session
from automl_prune.seeding import derive_seed, seed_everything

__all__ = [
    "FeedForwardGate",
    "GateConfig",
    "GatedBlock",
    "GatedNetwork",
    "GatingStats",
    "gate_statistics",
    "image_runner",
    "load_gated",
    "save_gated",
    "script_gated",
    "train_gated",
    "write_report",
]

logger = logging.getLogger(__name__)

GATES_META = "gates"
"""Key of a gated model's checkpoint meta that holds its gated blocks, gate width and threshold."""
INITIAL_OPEN_LOGIT = 1.5
"""Initial gate logit: every block runs (p = 0.82 > 0.5) before any training, as the dense model."""
GRAD_CLIP = 5.0
"""Largest gradient norm of the gates' (and, separately, the network's) parameters in one step."""
EXPLORATION = 0.05
"""Least probability of either gate outcome while sampling in the RL stage."""


# --------------------------------------------------------------------------- modules
class FeedForwardGate(nn.Module):
    """SkipNet's feed-forward gate: global average pooling, a hidden layer, one logit per input.

    Args:
        channels: Channels of the block's input.
        hidden: Width of the hidden layer.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, INITIAL_OPEN_LOGIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gate logit of each input, shape ``(N,)``."""
        pooled = x.mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(pooled))).squeeze(1)

    def flops(self, channels: int, height: int, width: int) -> int:
        """Multiply-accumulates of one input through the gate (pooling counted as one per value)."""
        return channels * height * width + self.fc1.in_features * self.fc1.out_features + self.fc2.in_features


class GatedBlock(nn.Module):
    """A residual block with identity shortcut behind a per-input gate.

    In eval mode the block runs on the inputs whose gate logit reaches ``threshold_logit``
    (the logit of the probability threshold: compared as logits, gates whose probabilities
    round to 1 in float32 still differ) and is skipped (not computed) for the others. In
    training mode the block runs on the whole batch and is mixed with the identity by the
    gate: the soft probability (``mode="soft"``) or a Bernoulli sample of it
    (``mode="sample"``, whose log-probability and decision are kept for the REINFORCE update).

    Args:
        block: The residual block (its output has its input's shape).
        channels: Its input channels.
        hidden: Width of the gate's hidden layer.
    """

    def __init__(self, block: nn.Module, channels: int, hidden: int):
        super().__init__()
        self.block = block
        self.gate = FeedForwardGate(channels, hidden)
        self.threshold_logit = 0.0  # probability 0.5
        self.mode = "soft"
        self._record = {}  # the last training pass: "executed" and "log_prob" per input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate each input; eval mode computes the block only for the inputs whose gate opens."""
        if self.training:
            return self._mixed(x)
        run = self.gate(x) >= self.threshold_logit
        executed = int(run.sum())
        if executed == 0:
            return x
        if executed == x.shape[0]:
            return self.block(x)
        index = run.nonzero().squeeze(1)
        out = x.clone()
        out[index] = self.block(x[index])
        return out

    @torch.jit.unused
    def _mixed(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.gate(x.detach())  # the gate reads the features; its losses do not reshape them
        if self.mode == "soft":
            g = torch.sigmoid(logit)
            self._record = {"executed": g}
        else:  # sampled with a floor on both outcomes, so a gate that closed (or opened) can still learn back
            p = torch.sigmoid(logit).detach().clamp(EXPLORATION, 1.0 - EXPLORATION)
            g = torch.bernoulli(p)
            log_prob = torch.where(g > 0, F.logsigmoid(logit), F.logsigmoid(-logit))
            self._record = {"executed": g, "log_prob": log_prob}
        mix = g.view(-1, *([1] * (x.dim() - 1)))
        return mix * self.block(x) + (1.0 - mix) * x


class GatedNetwork(nn.Module):
    """A model whose skippable residual blocks are :class:`GatedBlock` s.

    Args:
        model: The dense model (deep-copied; the original is left alone).
        example_inputs: An example batch (for the block FLOPs and channel counts).
        hidden: Width of every gate's hidden layer.
        blocks: Names of the blocks to gate (default: every skippable residual block).

    Attributes:
        blocks: Gated block names, in model order.
        block_flops: FLOPs of one input through each gated block, in the same order.
        dense_flops: FLOPs of one input through the dense model.
        gate_flops: FLOPs of one input through all the gates (always paid).

    Raises:
        InvalidValueError: The model has no skippable residual block (or an unknown one is named).
    """

    def __init__(
        self, model: nn.Module, example_inputs: torch.Tensor, hidden: int = 16, blocks: list[str] | None = None
    ):
        super().__init__()
        model = copy.deepcopy(model).eval()
        graph = LayerGraph(model, example_inputs)
        names = list(graph.residual_blocks) if blocks is None else list(blocks)
        unknown = sorted(set(names) - set(graph.residual_blocks))
        if unknown:
            raise InvalidValueError(
                f"{', '.join(unknown)} is not a skippable residual block; skippable: {', '.join(graph.residual_blocks) or 'none'}"
            )
        if not names:
            raise InvalidValueError(
                "dynamic SkipNet needs residual blocks with identity shortcuts, and this model has none; "
                "use a residual model (resnet20, resnet56, mobilenetv2, ...)"
            )
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [
            model.get_submodule(n).register_forward_pre_hook(
                lambda _m, args, name=n: shapes.__setitem__(name, tuple(args[0].shape))
            )
            for n in names
        ]
        with torch.no_grad():
            model(example_inputs)
        for h in hooks:
            h.remove()
        self.blocks = names
        self.dense_flops = float(graph.flops)
        self.block_flops = [
            float(sum(info.flops for layer, info in graph.layers.items() if layer.startswith(n + "."))) for n in names
        ]
        gate_flops = 0.0
        for name in names:
            _, channels, height, width = shapes[name]
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            gated = GatedBlock(owner.get_submodule(child), channels, hidden)
            gate_flops += gated.gate.flops(channels, height, width)
            setattr(owner, child, gated)
        self.gate_flops = gate_flops
        self.hidden = hidden
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's output."""
        return self.model(x)

    @torch.jit.unused
    def gated_blocks(self) -> list[GatedBlock]:
        """The gated blocks, in model order."""
        return [cast(GatedBlock, self.model.get_submodule(n)) for n in self.blocks]

    @torch.jit.unused
    def set_mode(self, mode: str) -> None:
        """``"soft"`` (sigmoid gates) or ``"sample"`` (Bernoulli gates) for training-mode passes."""
        if mode not in ("soft", "sample"):
            raise InvalidValueError(f"gate mode must be 'soft' or 'sample', got {mode!r}")
        for block in self.gated_blocks():
            block.mode = mode

    @torch.jit.unused
    def set_threshold(self, threshold: float) -> None:
        """The gate probability at which a block runs in eval mode (every gate alike; 1 closes every gate)."""
        if not 0.0 < threshold <= 1.0:
            raise InvalidValueError(f"gate threshold must be in (0, 1], got {threshold}")
        self.set_threshold_logit(math.inf if threshold == 1.0 else math.log(threshold) - math.log1p(-threshold))

    @torch.jit.unused
    def set_threshold_logit(self, logit: float) -> None:
        """The gate logit at which a block runs in eval mode (finer than a probability near 0 or 1)."""
        if math.isnan(logit):
            raise InvalidValueError("gate threshold logit must be a number, got nan")
        for block in self.gated_blocks():
            block.threshold_logit = float(logit)

    @property
    @torch.jit.unused
    def threshold_logit(self) -> float:
        """The eval-mode threshold of the gates, as a logit."""
        return float(self.gated_blocks()[0].threshold_logit)

    @property
    @torch.jit.unused
    def threshold(self) -> float:
        """The eval-mode threshold of the gates, as a probability."""
        logit = self.threshold_logit
        return 1.0 if logit == math.inf else 0.0 if logit == -math.inf else 1.0 / (1.0 + math.exp(-logit))

    @torch.jit.unused
    def flops_share(self, executed: torch.Tensor) -> torch.Tensor:
        """Share of the dense FLOPs each input costs, from its ``(N, blocks)`` executed decisions (0/1 or soft)."""
        block = torch.tensor(self.block_flops, dtype=executed.dtype, device=executed.device)
        fixed = self.dense_flops - sum(self.block_flops) + self.gate_flops
        return (fixed + executed @ block) / self.dense_flops

    @torch.jit.unused
    def clear_records(self) -> None:
        """Drop the decisions kept from the last training pass."""
        for block in self.gated_blocks():
            block._record = {}

    @torch.jit.unused
    def floor_share(self) -> float:
        """FLOPs share with every gated block skipped: the least any input can cost."""
        return float(self.flops_share(torch.zeros(1, len(self.blocks)))[0])

    @torch.jit.unused
    def last_decisions(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(executed ``(N, blocks)``, summed log-probability ``(N,)`` or None) of the last training pass."""
        records = [b._record for b in self.gated_blocks()]
        executed = torch.stack([r["executed"] for r in records], dim=1)
        if all("log_prob" in r for r in records):
            return executed, torch.stack([r["log_prob"] for r in records], dim=1).sum(dim=1)
        return executed, None

    @torch.jit.unused
    def gated_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One eval-mode pass: (outputs, decisions ``(N, blocks)`` with 1 where the block ran)."""
        seen: list[torch.Tensor] = []
        hooks = [
            b.gate.register_forward_hook(lambda _m, _a, out, b=b: seen.append(out >= b.threshold_logit))
            for b in self.gated_blocks()
        ]
        try:
            with torch.no_grad():
                out = self.eval()(x)
        finally:
            for h in hooks:
                h.remove()
        return out, torch.stack(seen, dim=1).float()

    @torch.jit.unused
    def open_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode decisions ``(N, blocks)`` (1 = the block runs) for a batch, from the real gated pass."""
        return self.gated_pass(x)[1]


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class GateConfig:
    """How the gates are trained (both stages) and calibrated.

    Attributes:
        pretrain_steps: Steps of supervised pre-training with soft gates.
        rl_steps: Steps of hybrid RL with hard (sampled) gates.
        lr: SGD learning rate of the gates (the network's is ``lr * network_lr_scale``).
        network_lr_scale: The network's learning rate relative to the gates' (0 freezes it).
        batch_size: Mini-batch size.
        compute_weight: Initial weight of the FLOPs share in the reward.
        target_flops: Target mean share of the dense FLOPs (None: fixed ``compute_weight``).
        dual_lr: Step of the compute weight's dual ascent towards ``target_flops``.
        hidden: Width of each gate's hidden layer.
        seed: Seed of the gate initialisation, batch order and gate samples.
        device: Where the training steps run (``cpu``, ``cuda``, ``cuda:1``); the network is back on
            the CPU before the threshold is calibrated, and everything after runs there.
    """

    pretrain_steps: int = 100
    rl_steps: int = 300
    lr: float = 0.05
    network_lr_scale: float = 0.1
    batch_size: int = 128
    compute_weight: float = 2.0
    target_flops: float | None = None
    dual_lr: float = 0.0
    hidden: int = 16
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.pretrain_steps < 0 or self.rl_steps < 0:
            raise InvalidValueError("pretrain_steps and rl_steps must be >= 0")
        if not self.lr > 0 or self.network_lr_scale < 0 or self.batch_size < 2:
            raise InvalidValueError("lr must be > 0, network_lr_scale >= 0 and batch_size >= 2")
        if self.compute_weight < 0 or self.dual_lr < 0 or self.hidden < 1:
            raise InvalidValueError("compute_weight and dual_lr must be >= 0 and hidden >= 1")
        if self.target_flops is not None and not 0.0 < self.target_flops <= 1.0:
            raise InvalidValueError(
                f"target_flops must be a share of the dense FLOPs in (0, 1], got {self.target_flops}"
            )


def _batches(data: TensorData, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from data.batches(batch_size, shuffle=True, seed=derive_seed(seed, "gates", epoch), drop_last=True)
        epoch += 1


def train_gated(net: GatedNetwork, data: DataSplits, config: GateConfig) -> list[dict[str, float]]:
    """Train ``net`` in place: soft pre-training, then hybrid RL; calibrate the threshold to the target.

    The steps run on ``config.device``; ``net`` is on the CPU again when this returns (and before
    the threshold is calibrated on search-val), whatever happens.

    Returns:
        One record per logged step (stage, step, loss, mean FLOPs share, skip rate, compute weight).
    """
    seed_everything(config.seed)
    device = torch.device(config.device)
    gates = [p for b in net.gated_blocks() for p in b.gate.parameters()]
    gate_ids = {id(p) for p in gates}
    rest = [p for p in net.parameters() if id(p) not in gate_ids]
    groups = [{"params": gates, "lr": config.lr}]
    if config.network_lr_scale > 0:
        groups.append({"params": rest, "lr": config.lr * config.network_lr_scale})
    else:
        for p in rest:
            p.requires_grad_(False)
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-4)
    batches = _batches(data.train, config.batch_size, config.seed)
    weight = config.compute_weight
    history: list[dict[str, float]] = []
    total = config.pretrain_steps + config.rl_steps
    bar = Progress(total, "train gates", "step", leave=False)
    net.to(device)
    try:
        for step in range(total):
            stage = "pretrain" if step < config.pretrain_steps else "rl"
            net.train()
            net.set_mode("soft" if stage == "pretrain" else "sample")
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            logits = net(x)
            ce = F.cross_entropy(logits, y, reduction="none")
            executed, log_prob = net.last_decisions()
            share = net.flops_share(executed)
            loss = ce.mean()
            if stage == "rl":
                assert log_prob is not None
                reward = -ce.detach() - weight * share.detach()
                advantage = (reward - reward.mean()) / (reward.std() + 1e-6)  # batch baseline, unit scale
                loss = loss - (advantage * log_prob).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gates, GRAD_CLIP)  # REINFORCE's gradients are heavy-tailed
            if config.network_lr_scale > 0:
                torch.nn.utils.clip_grad_norm_(rest, GRAD_CLIP)  # blocks that were skipped come back abruptly
            optimizer.step()
            mean_share = float(share.detach().mean())
            if stage == "rl" and config.target_flops is not None:
                weight = max(0.0, weight + config.dual_lr * (mean_share - config.target_flops))
            bar.update(1)
            if step % 10 == 0 or step == total - 1:
                record = {
                    "step": step,
                    "stage": 0.0 if stage == "pretrain" else 1.0,
                    "loss": float(ce.detach().mean()),
                    "flops_share": mean_share,
                    "skip_rate": float(1.0 - executed.detach().mean()),
                    "compute_weight": weight,
                }
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", flops=f"{mean_share:.2f}")
    finally:
        bar.close()
        net.clear_records()
        net.cpu()
        for p in rest:
            p.requires_grad_(True)
    net.eval()
    if config.target_flops is not None:
        calibrate_threshold(net, data.search_val, config.target_flops)
    return history


def _mean_share(net: GatedNetwork, data: TensorData, batch_size: int = 500) -> tuple[float, torch.Tensor]:
    """(mean FLOPs share on ``data``, every gate logit the pass computed) at the current threshold."""
    logits: list[torch.Tensor] = []
    hooks = [b.gate.register_forward_hook(lambda _m, _a, out: logits.append(out.detach())) for b in net.gated_blocks()]
    try:
        shares = [net.flops_share(net.open_gates(x)) for x, _ in data.batches(batch_size)]
    finally:
        for h in hooks:
            h.remove()
    return float(torch.cat(shares).mean()), torch.cat(logits).flatten()


def calibrate_threshold(
    net: GatedNetwork, data: TensorData, target: float, iterations: int = 30, tolerance: float = 1e-3
) -> float:
    """Set the gates' threshold to the lowest (most blocks run) whose mean FLOPs share on ``data`` meets ``target``.

    A search over the gate *logit* (raising it closes gates, lowering it opens them), so the
    budget is met on ``data`` and used as fully as the gates allow, also when training saturated
    their probabilities (a probability threshold cannot separate gates that all read 1.0). A
    target below the cost of skipping every block ends at the threshold that skips the most,
    with a warning.

    Each step is a pass over ``data``, so the bracket is narrowed by safeguarded false position
    (the share is monotone in the threshold: interpolate where it crosses the target, with a
    bisection step whenever one end has moved twice running) and the search stops as soon as
    more passes cannot help: when the share that fits is within ``tolerance`` of the target, or
    when no gate logit of the fitting pass lies between the two ends (every threshold in
    between then takes the same decisions on every input, gate after gate, so the fitting end
    is already the lowest).

    Args:
        net: The gated network (its threshold is set).
        data: Images the mean share is measured on (search-val).
        target: Mean FLOPs share to meet, in (0, 1].
        iterations: Most narrowing steps.
        tolerance: A fitting share this close below the target ends the search.

    Returns:
        The threshold set, as a probability (:attr:`GatedNetwork.threshold_logit` holds it exactly).
    """
    net.set_threshold_logit(-math.inf)  # every gate open, then every gate closed: the range of logits on either path
    share_low, open_logits = _mean_share(net, data)
    net.set_threshold_logit(math.inf)
    share_high, fitting = _mean_share(net, data)
    seen = torch.cat([open_logits, fitting])
    low, high = float(seen.min()) - 1.0, float(seen.max()) + 1.0  # every gate opens at ``low``, none at ``high``
    if share_low <= target:  # every block may run
        net.set_threshold_logit(low)
        return net.threshold
    net.set_threshold_logit(high)
    if share_high > target:
        logger.warning(
            "mean FLOPs %.1f%% stay above the %.1f%% target even with every gate closed: skipping every gated "
            "block leaves %.1f%%",
            100 * share_high,
            100 * target,
            100 * net.floor_share(),
        )
        return net.threshold
    goal, moved, repeats = target - tolerance / 2, "", 0
    unfit = open_logits  # the logits of the pass at ``low``
    for _ in range(iterations):
        if target - share_high <= tolerance or not bool(((fitting > low) & (fitting < high)).any()):
            break
        between = torch.cat([fitting, unfit])
        between = between[(between > low) & (between < high)].sort().values
        if repeats >= 2 or share_low <= share_high:
            fraction = 0.5
        else:
            fraction = min(max((share_low - goal) / (share_low - share_high), 0.05), 0.95)
        # the share moves with the number of decisions that flip: step through the logits the two
        # ends' passes saw between them, by rank, rather than through logit values
        middle = float(between[min(int(fraction * len(between)), len(between) - 1)])
        net.set_threshold_logit(middle)
        measured, logits = _mean_share(net, data)
        side = "high" if measured <= target else "low"
        repeats = repeats + 1 if side == moved else 1
        moved = side
        if side == "high":
            high, share_high, fitting = middle, measured, logits
        else:
            low, share_low, unfit = middle, measured, logits
    net.set_threshold_logit(high)
    return net.threshold


# --------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class GatingStats:
    """Accuracy and compute of a gated network in eval mode on one data split.

    Attributes:
        accuracy: Top-1 accuracy.
        mean_flops_share: Mean share of the dense FLOPs per input (gates included).
        flops_shares: Every input's share, in data order.
        block_run_rate: Per gated block, the share of inputs that ran it.
        threshold: The gates' threshold (probability).
        threshold_logit: The same threshold as a logit (what the gates compare with).
    """

    accuracy: float
    mean_flops_share: float
    flops_shares: list[float]
    block_run_rate: list[float]
    threshold: float
    threshold_logit: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the per-input list)."""
        out = asdict(self)
        del out["flops_shares"]
        return out


def gate_statistics(net: GatedNetwork, data: TensorData, batch_size: int = 500) -> GatingStats:
    """Accuracy, per-input FLOPs and per-block run rates of ``net`` (eval mode) on ``data``."""
    net.eval()
    correct, decisions = 0, []
    for x, y in data.batches(batch_size):
        out, executed = net.gated_pass(x)
        correct += int((out.argmax(1) == y).sum())
        decisions.append(executed)
    executed = torch.cat(decisions)
    shares = net.flops_share(executed)
    return GatingStats(
        accuracy=correct / len(data),
        mean_flops_share=float(shares.mean()),
        flops_shares=[float(s) for s in shares],
        block_run_rate=[float(r) for r in executed.mean(dim=0)],
        threshold=net.threshold,
        threshold_logit=net.threshold_logit,
    )


# --------------------------------------------------------------------------- saving and export
def script_gated(net: GatedNetwork) -> torch.jit.ScriptModule:
    """TorchScript of ``net`` in eval mode with its per-input control flow, frozen.

    Raises:
        InvalidValueError: The wrapped model cannot be scripted (only traced), which would lose the gates.
    """
    net.clear_records()  # the last training pass's tensors are part of an autograd graph: not copyable
    module = copy.deepcopy(net).eval()
    try:
        scripted = torch.jit.script(module)
    except Exception as exc:  # noqa: BLE001 - the scripting frontend raises many types
        raise InvalidValueError(
            f"the gated {type(net.model).__name__} cannot be scripted to TorchScript "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); a traced export would drop the gates"
        ) from None
    return torch.jit.freeze(scripted)


def save_gated(
    path: str | os.PathLike[str],
    net: GatedNetwork,
    spec: ModelSpec,
    input_shape: tuple[int, ...],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``net`` as an automl-prune checkpoint whose meta holds the gates (blocks, width, threshold)."""
    gates = {
        "blocks": list(net.blocks),
        "hidden": net.hidden,
        "threshold": net.threshold,
        "threshold_logit": net.threshold_logit,
    }
    info = CheckpointInfo(spec, tuple(input_shape), meta={**(meta or {}), GATES_META: gates})
    return save_checkpoint(path, net, info)


def load_gated(path: str | os.PathLike[str]) -> tuple[GatedNetwork, dict[str, Any]]:
    """Rebuild a gated network saved by :func:`save_gated` (eval mode) and return it with its meta.

    Raises:
        CheckpointError: Missing, corrupt or not a gated-network file, or weights that do not fit.
    """
    info, state = read_checkpoint(path)
    gates = info.meta.get(GATES_META)
    if not isinstance(gates, dict):
        raise CheckpointError(
            f"'{path}' is not a gated model written by `automl-prune skipnet` (a plain checkpoint: load it with "
            "automl_prune.checkpoint.load_checkpoint)"
        )
    net = GatedNetwork(
        build_model(info.spec), info.example_inputs(), hidden=int(gates["hidden"]), blocks=list(gates["blocks"])
    )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in '{path}' do not fit gated {info.spec.name}: {str(exc).splitlines()[0]}"
        ) from None
    if "threshold_logit" in gates:
        net.set_threshold_logit(float(gates["threshold_logit"]))
    else:  # written before the threshold was kept as a logit
        net.set_threshold(float(gates["threshold"]))
    return net.eval(), {k: v for k, v in info.meta.items() if k != GATES_META}


# --------------------------------------------------------------------------- latency at batch 1
def image_runner(runtime: str, artifact: Any, images: torch.Tensor, threads: int) -> Runner:
    """A runner that runs ``artifact`` on the next of ``images`` at batch 1 each call (cycling).

    A gated model's latency depends on the input, so it is timed on real images, not on one
    fixed input.

    Args:
        runtime: ``"torchscript"`` (a script or traced module) or ``"onnxruntime"`` (ONNX bytes).
        artifact: The model in that runtime's form.
        images: ``(N, C, H, W)`` images.
        threads: Intra-op threads.

    Raises:
        InvalidValueError: For another runtime.
    """
    singles = [images[i : i + 1].contiguous() for i in range(len(images))]
    position = [0]

    def next_image() -> torch.Tensor:
        image = singles[position[0] % len(singles)]
        position[0] += 1
        return image

    device = torch.device("cpu")
    shape = tuple(singles[0].shape)
    if runtime == "torchscript":

        def call() -> None:
            with torch.inference_mode():
                artifact(next_image())

        return Runner(runtime, device, threads, shape, call)
    if runtime == "onnxruntime":
        session = onnx_session(artifact, device, threads)
        name = session.get_inputs()[0].name
        feeds = [{name: s.numpy()} for s in singles]

        def run_session() -> None:
            session.run(None, feeds[position[0] % len(feeds)])
            position[0] += 1

        return Runner(runtime, device, threads, shape, run_session)  # closing it drops the call, and the session
    raise InvalidValueError(f"runtime {runtime!r} cannot time a gated model; use torchscript or onnxruntime")


# --------------------------------------------------------------------------- report
def write_report(out: Path, report: dict[str, Any], shares: list[float]) -> None:
    """``report.json``, ``report.md`` and ``gates.png`` (per-input FLOPs histogram, per-block run rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from automl_prune.io import atomic_write, write_json, write_text

    write_json(out / "report.json", report)
    gated, static, dense = report["gated"], report["static"], report["dense"]
    lines = [
        f"# Dynamic SkipNet: {report['model']} on {report['dataset']}",
        "",
        f"Gates on {len(gated['blocks'])} residual blocks, trained {report['gates']['pretrain_steps']} steps with soft "
        f"gates, then {report['gates']['rl_steps']} steps of hybrid RL; threshold {gated['threshold']:.3g} "
        f"(gate logit {gated['threshold_logit']:.3g}) calibrated on search-val to mean FLOPs <= {report['target_flops']:.0%}. The static plan removes channels "
        f"uniformly ({static['criterion']}, widths in multiples of {static['round_to']}) to at most the gated "
        f"model's mean FLOPs and is fine-tuned for as many steps. "
        f"Test split: {report['test_images']} images.",
        "",
        "| model | test accuracy | FLOPs share (mean) | p10-p90 per input |",
        "|---|---:|---:|---:|",
        f"| dense | {dense['test_accuracy']:.4f} | 100.0% | - |",
        f"| static plan | {static['test_accuracy']:.4f} | {static['flops_share']:.1%} | same for every input |",
        f"| gated (dynamic) | {gated['test_accuracy']:.4f} | {gated['mean_flops_share']:.1%} | "
        f"{gated['flops_p10']:.1%}-{gated['flops_p90']:.1%} |",
        "",
        f"Latency at batch 1, {report['latency']['images']} test images one at a time, "
        f"{report['latency']['threads']} thread(s), interleaved rounds (mean over images; ratio to dense per round):",
        "",
        "| runtime | model | mean ms | median ms | p10-p90 ms | vs dense | noise |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for runtime, rows in report["latency"]["runtimes"].items():
        for label, row in rows.items():
            lines.append(
                f"| {runtime} | {label} | {row['mean_ms']:.3f} | {row['median_ms']:.3f} | "
                f"{row['p10_ms']:.3f}-{row['p90_ms']:.3f} | x{row['speedup']:.2f} | {row['note'] or 'ok'} |"
            )
    lines += ["", "Per-block run rate on the test split (share of inputs that ran the block):", ""]
    lines += ["| block | FLOPs share | run rate |", "|---|---:|---:|"]
    for name, share, rate in zip(gated["blocks"], gated["block_flops_share"], gated["block_run_rate"]):
        lines.append(f"| {name} | {share:.1%} | {rate:.1%} |")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in report["files"])]
    write_text(out / "report.md", "\n".join(lines) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    left.hist([100 * s for s in shares], bins=30, color="#4c72b0")
    left.axvline(100 * gated["mean_flops_share"], color="k", linestyle="--", label="gated mean")
    left.axvline(100 * static["flops_share"], color="#dd8452", label="static plan")
    left.set_xlabel("FLOPs per input (% of dense)")
    left.set_ylabel("test images")
    left.legend()
    right.bar(range(len(gated["blocks"])), [100 * r for r in gated["block_run_rate"]], color="#55a868")
    right.set_xticks(range(len(gated["blocks"])), gated["blocks"], rotation=45, ha="right", fontsize=7)
    right.set_ylabel("inputs that run the block (%)")
    fig.tight_layout()
    atomic_write(out / "gates.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
