"""Evaluator: a plan in, an :class:`~automl_prune.types.Evaluation` out, without fine-tuning.

AMC's protocol: prune the dense model with the plan and the criterion, then score the
pruned model on a fixed subset of the search-val split. By default the BatchNorm
statistics of the pruned model are first re-estimated on a few training batches (adaptive
BN, as in EagleEye, ECCV 2020); without it a pruned network's BN statistics no longer
match its features and raw accuracy is near chance for most plans, which leaves the search
little to learn from. :meth:`Evaluator.build` returns exactly the model that was scored.

Costs come from the :class:`~automl_prune.graph.LayerGraph` (exact FLOPs/params) and, for
latency budgets, from a :class:`~automl_prune.measure.latency_model.LatencyModel` fitted on
plans measured on the budget's runtime (computed from the kept channel counts, without
building the model). Identical plans (same channel counts and skips) are served from a
cache.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from automl_prune.criteria import Criterion, get_criterion
from automl_prune.data import DataSplits, TensorData
from automl_prune.errors import InvalidValueError
from automl_prune.graph import Cost, LayerGraph
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.measure.latency import SESSIONS
from automl_prune.measure.latency_model import LatencyModel, LatencyTable, Measured, calibrate, measure_plans
from automl_prune.precision import autocast
from automl_prune.pruning import apply
from automl_prune.reward import REWARDS, RewardContext, budget_penalty
from automl_prune.runtimes import resolve_device
from automl_prune.seeding import derive_seed
from automl_prune.training import check_distillation, student_loss
from automl_prune.types import FAILED_PREFIX, Budget, Evaluation, Plan

logger = logging.getLogger(__name__)

FAILED_REWARD = -100.0
"""Reward recorded for a plan whose evaluation failed (NaN accuracy, exception)."""


@dataclass(frozen=True)
class EvaluatorConfig:
    """How plans are scored.

    Attributes:
        criterion: Importance criterion deciding which channels go.
        reward: Reward name (see :mod:`automl_prune.reward`).
        eval_size: Search-val images scored per plan.
        bn_recalibration: Re-estimate BN statistics before scoring (adaptive BN).
        recalibration_batches: Training batches used for the re-estimation.
        batch_size: Batch size for recalibration, criteria data and scoring.
        criterion_batches: Search-val batches given to data-driven criteria.
        round_to: Round kept channel counts to a multiple of this.
        seed: Seed of the calibration batches.
        latency_plans: Plans measured on the runtime to fit the latency model (latency budgets).
        latency_margin: Plans are scored against a latency limit this much tighter than the
            budget's, so that the plan that ships meets the budget when measured despite
            prediction error and measurement noise.
        cache_dir: Cache root of latency tables (None: the default).
        finetune_steps: SGD steps (batch ``batch_size``, lr ``finetune_lr``, the same
            training batches for every plan) run on each pruned model before scoring, as
            ABCPruner scores candidates after a fraction of an epoch of fine-tuning
            (0 = off, AMC's protocol).
        finetune_lr: Learning rate of those steps.
        distill_weight: Weight of distillation from the dense model in those steps (0 = labels only).
        distill_temperature: Temperature of the distillation term.
    """

    criterion: str = "l1"
    reward: str = "acc"
    eval_size: int = 2000
    bn_recalibration: bool = True
    recalibration_batches: int = 8
    batch_size: int = 128
    criterion_batches: int = 8
    round_to: int = 1
    seed: int = 0
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    device: str = "cpu"
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    latency_plans: int = 24
    latency_margin: float = 0.05
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.finetune_steps < 0 or not self.finetune_lr > 0:
            raise InvalidValueError("finetune_steps must be >= 0 and finetune_lr > 0")
        check_distillation(self.distill_weight, self.distill_temperature)
        if self.eval_size < 1 or self.batch_size < 1 or self.recalibration_batches < 1 or self.round_to < 1:
            raise InvalidValueError("eval_size, batch_size, recalibration_batches and round_to must be >= 1")
        if self.latency_plans < 3:
            raise InvalidValueError(f"latency_plans must be >= 3, got {self.latency_plans}")
        if not 0.0 <= self.latency_margin < 1.0:
            raise InvalidValueError(f"latency_margin must be in [0, 1), got {self.latency_margin}")


def calibration_batches(data: DataSplits, config: EvaluatorConfig) -> list[torch.Tensor]:
    """The training batches BN statistics are re-estimated on (none when ``bn_recalibration`` is off).

    The same for every plan of a search, and for a plan cut again later with the same settings
    (``automl-prune prune``), so that a cut plan is the model its search scored.
    """
    if not config.bn_recalibration:
        return []
    batches = data.train.batches(config.batch_size, shuffle=True, seed=derive_seed(config.seed, "bn-calibration"))
    return [x for (x, _), _ in zip(batches, range(config.recalibration_batches))]


def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average).

    Only BN layers are put in training mode (dropout stays off); weights are not touched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:  # no batches: keep the statistics rather than reset them to nothing
        return
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
        if not was_training:
            model.eval()


class Evaluator:
    """Scores plans of one dense model under one budget.

    Args:
        model: The trained dense model.
        data: Dataset splits (train for BN recalibration, search_val for scoring).
        budget: The deployment budget.
        config: Scoring options.
        latency_model: A fitted latency model for latency budgets; fitted here (measuring
            what the cached table lacks) when omitted. Parallel workers and resumed runs get
            the driver's, so that all predict alike.

    Attributes:
        graph: The dense model's LayerGraph.
        dense: Evaluation of the unpruned model.
        limits: Absolute limits plans are scored against: ``{"flops": ..., "params": ...,
            "latency_ms": ...}`` (a speed-up term is turned into ms with the dense model's
            measured latency; the latency limit is tightened by ``config.latency_margin``).
        latency_model: The latency model (None without a latency term).
        evaluations: Plans scored so far (cache hits included).
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits,
        budget: Budget,
        config: EvaluatorConfig | None = None,
        latency_model: LatencyModel | None = None,
    ):
        self.config = config or EvaluatorConfig()
        self.device = resolve_device(self.config.device)
        # structure work (graph, pruning) on a CPU model; scoring, BN re-estimation and fitness steps on `device`
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        self.model = (model if on_cpu else copy.deepcopy(model).cpu()).eval()
        self._on_device = self.model if self.device.type == "cpu" else None
        self.data = data
        self.budget = budget
        self.reward_fn = REWARDS.get(self.config.reward)
        self.criterion: Criterion = get_criterion(self.config.criterion)
        example = torch.zeros(data.input_shape(1))
        self.graph = LayerGraph(self.model, example)
        if not self.graph.groups:
            raise InvalidValueError("the model has no prunable channel groups (only its classifier head)")
        self.val: TensorData = data.search_val.subset(self.config.eval_size, seed=0)
        self.calibration = calibration_batches(data, self.config)
        self.criterion_data = list(self.val.batches(self.config.batch_size))[: self.config.criterion_batches]
        self.latency_model: LatencyModel | None = None
        self._latency_table: LatencyTable | None = None
        if budget.has_latency:
            self.latency_model = latency_model or calibrate(
                self.model,
                self.graph,
                self.latency_table,
                plans=self.config.latency_plans,
                round_to=self.config.round_to,
                skip_gates=bool(self.graph.blocks),
            )
        self.limits = {
            "flops": Budget.absolute(budget.flops, self.graph.flops),
            "params": Budget.absolute(budget.params, self.graph.params),
            "latency_ms": (
                budget.latency_limit(self.latency_model.dense_ms) * (1.0 - self.config.latency_margin)
                if self.latency_model
                else None
            ),
        }
        self._cache: dict[tuple, Evaluation] = {}
        self.evaluations = 0
        dense_acc = evaluate_accuracy(self.dense_on_device, self.val, self.config.batch_size)
        self.context = RewardContext(dense_acc, self.graph.flops, self.graph.params, self.limits["latency_ms"])
        self.dense = self._score(Plan(), dense_acc, self.cost(Plan()), self.predict_latency(Plan()), 0.0)

    def __deepcopy__(self, memo: dict) -> Evaluator:
        """Shared, not copied: envs and wrappers that deep-copy their kwargs keep using this instance."""
        return self

    # ------------------------------------------------------------------ costs
    @property
    def latency_table(self) -> LatencyTable:
        """The cached table of plans measured on the budget's runtime (opened on first use)."""
        if self._latency_table is None:
            b = self.budget
            self._latency_table = LatencyTable(
                self.graph,
                b.runtime,
                b.device,
                b.threads or torch.get_num_threads(),
                b.batch_size,
                self.config.cache_dir,
            )
        return self._latency_table

    @property
    def latency_shape(self) -> tuple[int, ...]:
        """Input shape latency is predicted for (the budget's batch size)."""
        return (self.budget.batch_size, *self.data.input_shape(1)[1:])

    def structure_key(self, plan: Plan) -> tuple:
        """Plans with the same key build the same architecture."""
        kept = self.graph.kept_channels(plan, self.config.round_to)
        return tuple(kept.values()), tuple(self.graph.skipped_blocks(plan))

    def cost(self, plan: Plan) -> Cost:
        """Exact FLOPs and parameters of ``plan``'s pruned model."""
        return self.graph.cost(plan, self.config.round_to)

    def predict_latency(self, plan: Plan) -> float | None:
        """Predicted latency (ms) of ``plan``'s model on the budget's runtime; None without a latency budget."""
        if self.latency_model is None:
            return None
        return self.latency_model.predict_ms(self.graph.layer_shapes(plan, self.config.round_to))

    def excess(self, flops: float, params: float, latency_ms: float | None) -> float:
        """Largest relative overshoot of any budget term (<= 0 when within budget)."""
        worst = -math.inf
        for value, limit in (
            (flops, self.limits["flops"]),
            (params, self.limits["params"]),
            (latency_ms, self.limits["latency_ms"]),
        ):
            if limit is not None and value is not None:
                worst = max(worst, value / limit - 1.0)
        return worst

    # ------------------------------------------------------------------ scoring
    @property
    def dense_on_device(self) -> nn.Module:
        """The dense model on the scoring device (a copy when that is not the CPU)."""
        if self._on_device is None:
            self._on_device = copy.deepcopy(self.model).to(self.device).eval()
        return self._on_device

    def build(self, plan: Plan) -> nn.Module:
        """The pruned (and, by default, BN-recalibrated) model that :meth:`evaluate` scores."""
        pruned = apply(
            self.model, plan, self.criterion, graph=self.graph, round_to=self.config.round_to, data=self.criterion_data
        )
        pruned = pruned.to(self.device)
        if self.calibration:
            recalibrate_batchnorm(pruned, self.calibration)
        if self.config.finetune_steps:
            self._finetune(pruned)
        return pruned.eval()

    def _finetune(self, model: nn.Module) -> None:
        """A few SGD steps on fixed training batches (the same for every plan)."""
        if not hasattr(self, "_finetune_batches"):
            batches = self.data.train.batches(
                self.config.batch_size, shuffle=True, seed=derive_seed(self.config.seed, "fitness-finetune")
            )
            self._finetune_batches = [b for b, _ in zip(batches, range(self.config.finetune_steps))]
        optimizer = torch.optim.SGD(model.parameters(), lr=self.config.finetune_lr, momentum=0.9)
        c = self.config
        model.train()
        teacher = self.dense_on_device if c.distill_weight > 0 else None
        for x, y in self._finetune_batches:
            x, y = x.to(self.device), y.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(self.device):
                loss = student_loss(model(x), y, teacher, x, c.distill_weight, c.distill_temperature)
            loss.backward()
            optimizer.step()
        model.eval()

    def _score(
        self, plan: Plan, accuracy: float, cost: Cost, latency: float | None, seconds: float, reason: str = ""
    ) -> Evaluation:
        excess = self.excess(cost.flops, cost.params, latency)
        if reason or not math.isfinite(accuracy):
            reason, reward, feasible = reason or "accuracy is not a finite number", FAILED_REWARD, False
        else:
            penalty = budget_penalty(max(excess, 0.0))
            reward = self.reward_fn(accuracy, cost.flops, cost.params, latency, self.context) - penalty
            feasible = excess <= 1e-9
            reason = "" if feasible else f"over budget by {excess:.1%}"
        return Evaluation(
            accuracy=accuracy,
            flops=cost.flops,
            params=cost.params,
            latency_ms=latency,
            measured_latency_ms=None,
            flops_ratio=cost.flops / self.graph.flops,
            reward=reward,
            feasible=feasible,
            reason=reason,
            seconds=seconds,
        )

    def evaluate(self, plan: Plan) -> Evaluation:
        """Score ``plan``; a failure is recorded as an infeasible evaluation with its reason."""
        self.evaluations += 1
        key = self.structure_key(plan)
        if key in self._cache:
            return replace(self._cache[key], cached=True, seconds=0.0)
        start = time.perf_counter()
        cost = self.cost(plan)
        try:
            latency = self.predict_latency(plan)
            accuracy = evaluate_accuracy(self.build(plan), self.val, self.config.batch_size)
            reason = ""
        except Exception as exc:  # noqa: BLE001 - any failure of one plan must not end the search
            logger.warning("evaluation failed: %s", exc)
            latency, accuracy, reason = None, math.nan, f"{FAILED_PREFIX}: {type(exc).__name__}: {exc}"
        evaluation = self._score(plan, accuracy, cost, latency, time.perf_counter() - start, reason)
        self._cache[key] = evaluation
        return evaluation

    def cached(self, plan: Plan) -> Evaluation | None:
        """The cached evaluation of ``plan``'s structure (marked ``cached``), or None."""
        hit = self._cache.get(self.structure_key(plan))
        return replace(hit, cached=True, seconds=0.0) if hit is not None else None

    def clear_cache(self) -> None:
        """Forget cached evaluations (e.g. between searches that are compared for speed)."""
        self._cache.clear()

    def preload(self, plan: Plan, evaluation: Evaluation) -> None:
        """Put a known evaluation of ``plan`` in the cache (used to resume a run from its log)."""
        self._cache[self.structure_key(plan)] = evaluation

    def measure(
        self, plans: list[Plan], progress: str | None = None, rounds: int = 5, sessions: int = SESSIONS
    ) -> list[Measured]:
        """Measure ``plans`` end to end on the budget's runtime, interleaved with the dense model.

        The measurements join the cached latency table (improving later fits). Works for any
        budget: without a latency term the runtime, device, threads and batch size still
        come from the budget. ``rounds`` interleaved rounds per plan are shared out among
        ``sessions`` fresh pairs of sessions (see :func:`measure_plans`).
        """
        return measure_plans(
            self.model,
            self.graph,
            plans,
            self.latency_table,
            self.config.round_to,
            rounds=rounds,
            progress=progress,
            sessions=sessions,
        )
