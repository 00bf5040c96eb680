"""Evaluator: a plan in, an :class:`~automl_prune.types.Evaluation` out, without fine-tuning.

AMC's protocol: prune the dense model with the plan and the criterion, then score the
pruned model on a fixed subset of the search-val split. By default the BatchNorm
statistics of the pruned model are first re-estimated on a few training batches (adaptive
BN, as in EagleEye, ECCV 2020); without it a pruned network's BN statistics no longer
match its features and raw accuracy is near chance for most plans, which leaves the search
little to learn from. :meth:`Evaluator.build` returns exactly the model that was scored.

Costs come from the :class:`~automl_prune.graph.LayerGraph` (exact FLOPs/params) and, for
latency budgets, from the per-device lookup table scaled so that the dense model's
prediction equals its measured end-to-end latency (the table alone leaves out functional
ops and framework overhead). Identical plans (same channel counts and skips) are served
from a cache.
"""

from __future__ import annotations

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
from automl_prune.measure.latency import LatencyTable, measure_latency
from automl_prune.pruning import apply, rebuild_structure
from automl_prune.reward import REWARDS, RewardContext, budget_penalty
from automl_prune.seeding import derive_seed
from automl_prune.types import Budget, Evaluation, Plan

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
        finetune_steps: SGD steps (batch ``batch_size``, lr ``finetune_lr``, the same
            training batches for every plan) run on each pruned model before scoring, as
            ABCPruner scores candidates after a fraction of an epoch of fine-tuning
            (0 = off, AMC's protocol).
        finetune_lr: Learning rate of those steps.
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

    def __post_init__(self) -> None:
        if self.finetune_steps < 0 or not self.finetune_lr > 0:
            raise InvalidValueError("finetune_steps must be >= 0 and finetune_lr > 0")
        if self.eval_size < 1 or self.batch_size < 1 or self.recalibration_batches < 1 or self.round_to < 1:
            raise InvalidValueError("eval_size, batch_size, recalibration_batches and round_to must be >= 1")


def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average).

    Only BN layers are put in training mode (dropout stays off); weights are not touched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
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
        latency_table: Lookup table for latency budgets (built for the budget's device,
            threads and batch size when omitted and the budget has a latency term).
        latency_scale: Measured/predicted latency ratio of the dense model; measured
            when omitted (parallel workers get the driver's, so all predict alike).

    Attributes:
        graph: The dense model's LayerGraph.
        dense: Evaluation of the unpruned model.
        limits: Absolute limits: ``{"flops": ..., "params": ..., "latency_ms": ...}``.
        evaluations: Plans scored so far (cache hits included).
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits,
        budget: Budget,
        config: EvaluatorConfig | None = None,
        latency_table: LatencyTable | None = None,
        latency_scale: float | None = None,
    ):
        self.config = config or EvaluatorConfig()
        self.model = model.eval()
        self.data = data
        self.budget = budget
        self.reward_fn = REWARDS.get(self.config.reward)
        self.criterion: Criterion = get_criterion(self.config.criterion)
        example = torch.zeros(data.input_shape(1))
        self.graph = LayerGraph(self.model, example)
        if not self.graph.groups:
            raise InvalidValueError("the model has no prunable channel groups (only its classifier head)")
        self.val: TensorData = data.search_val.subset(self.config.eval_size, seed=0)
        self.calibration: list[torch.Tensor] = []
        if self.config.bn_recalibration:
            calib = data.train.batches(
                self.config.batch_size, shuffle=True, seed=derive_seed(self.config.seed, "bn-calibration")
            )
            self.calibration = [x for (x, _), _ in zip(calib, range(self.config.recalibration_batches))]
        self.criterion_data = list(self.val.batches(self.config.batch_size))[: self.config.criterion_batches]
        self.latency_table = latency_table
        self.latency_scale = 1.0
        self._latency_cache: dict[tuple, float] = {}
        if budget.latency_ms is not None:
            self._setup_latency(latency_scale)
        self.limits = {
            "flops": Budget.absolute(budget.flops, self.graph.flops),
            "params": Budget.absolute(budget.params, self.graph.params),
            "latency_ms": budget.latency_ms,
        }
        self._cache: dict[tuple, Evaluation] = {}
        self.evaluations = 0
        dense_acc = evaluate_accuracy(self.model, self.val, self.config.batch_size)
        self.context = RewardContext(dense_acc, self.graph.flops, self.graph.params, budget.latency_ms)
        self.dense = self._score(Plan(), dense_acc, self.cost(Plan()), self.predict_latency(Plan()), 0.0)

    def __deepcopy__(self, memo: dict) -> Evaluator:
        """Shared, not copied: envs and wrappers that deep-copy their kwargs keep using this instance."""
        return self

    # ------------------------------------------------------------------ costs
    def _setup_latency(self, scale: float | None) -> None:
        shape = self.latency_shape
        if self.latency_table is None:
            self.latency_table = LatencyTable(
                device=self.budget.device,
                threads=self.budget.threads or torch.get_num_threads(),
                batch_size=self.budget.batch_size,
            )
        predicted = self.latency_table.predict(self.model, shape)
        if scale is not None:
            self.latency_scale = scale
            return
        measured = measure_latency(self.model, shape, device=self.budget.device, threads=self.budget.threads).median_ms
        self.latency_scale = measured / predicted if predicted > 0 else 1.0
        logger.info(
            "latency table predicts %.3f ms for the dense model, measured %.3f ms (scale %.2f)",
            predicted,
            measured,
            self.latency_scale,
        )

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
        """Latency (ms) of ``plan``'s model from the lookup table, scaled to end-to-end; None without a latency budget."""
        if self.latency_table is None:
            return None
        key = self.structure_key(plan)
        if key not in self._latency_cache:
            structure = rebuild_structure(self.model, self.graph, plan, self.config.round_to)
            self._latency_cache[key] = self.latency_scale * self.latency_table.predict(structure, self.latency_shape)
        return self._latency_cache[key]

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
    def build(self, plan: Plan) -> nn.Module:
        """The pruned (and, by default, BN-recalibrated) model that :meth:`evaluate` scores."""
        pruned = apply(
            self.model, plan, self.criterion, graph=self.graph, round_to=self.config.round_to, data=self.criterion_data
        )
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
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for x, y in self._finetune_batches:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
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
            latency, accuracy, reason = None, math.nan, f"evaluation failed: {type(exc).__name__}: {exc}"
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

    def measure_latency(self, plan: Plan, runs: int = 30) -> float:
        """End-to-end measured latency (ms) of ``plan``'s model on the budget's device."""
        model = rebuild_structure(self.model, self.graph, plan, self.config.round_to)
        return measure_latency(
            model, self.latency_shape, device=self.budget.device, threads=self.budget.threads, runs=runs
        ).median_ms
