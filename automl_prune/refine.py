"""Multi-fidelity refinement of a search's finalists: short fine-tunes in rounds of successive halving.

The cheap score (the evaluator's BN-recalibrated accuracy, no fine-tune) ranks every plan a
search evaluates, but it ranks them poorly against their accuracy after fine-tuning. The best
``top`` distinct plans that meet the budget are therefore fine-tuned briefly, in *rungs*:
every candidate is trained to the first rung's step count and scored on the whole search-val
split, the better half goes on to the next rung's (cumulative) step count, and so on. The plan
that ships is the best by the last rung's score: search-val only, never the test split.

A *reference* candidate (the pipeline's plan of a rule at the budget: uniform, Torch-Pruning's
global threshold) runs every rung without being halved away, so the last rung holds it beside
the searched survivors: a searched plan ships only where it beats the rules after the same
fine-tune steps, and a search whose finalists all recover worse (plans that keep a residual
stream at a few channels, say) ships the best rule's plan instead.

Each rung is one Ray Tune experiment whose trials are the surviving plans (one CPU each, so
they run side by side on the local Ray instance or spread over a cluster joined by address);
a trial reports its score and a Tune checkpoint of its weights and optimizer, and the next
rung's trial resumes from that checkpoint. The rungs are synchronous successive halving
rather than Tune's asynchronous ASHA scheduler: with a handful of finalists on a few CPUs,
ASHA lets the first trials run every rung unchallenged (nothing has been recorded at a rung
when they reach it), which spends the most compute on the plans that happened to start first.

``refine.json`` records every candidate's score at every rung as each rung ends; a resumed run
skips the rungs it holds and continues from their checkpoints. ``refine.png`` plots the cheap
score against the refined scores.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl_prune.data import TensorData
from automl_prune.errors import InvalidValueError
from automl_prune.io import atomic_path, write_json
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.precision import autocast
from automl_prune.seeding import derive_seed, seed_everything
from automl_prune.training import check_distillation, student_loss
from automl_prune.types import Evaluation, Plan

logger = logging.getLogger(__name__)

REFINE_FILE = "refine.json"
REFINE_PLOT = "refine.png"
STATE_FILE = "state.pt"
REFINE_DIR = "refine"
"""Ray Tune's experiment directories (one per rung), under the run directory."""


@dataclass(frozen=True)
class RefineConfig:
    """How finalists are refined.

    Attributes:
        top: Distinct plans refined (0 = off).
        steps: Cumulative fine-tune steps at each rung, increasing (``(50, 150, 450)``: the
            second rung trains 100 more steps from the first's weights).
        keep: Fraction of the candidates that goes on to the next rung (at least one).
        lr: Learning rate (SGD, Nesterov momentum 0.9, constant: rungs continue one another).
        batch_size: Mini-batch size.
        weight_decay: L2 weight decay.
        distill_weight: Weight of distillation from the dense model (0 = labels only).
        distill_temperature: Temperature of the distillation term.
        seed: Seed of the batch order (the same batches for every plan).
        cpus_per_trial: CPUs (and torch threads) of each trial.
        device: Where the trials train: ``cpu``, or ``cuda`` (each trial then reserves
            ``gpus_per_trial`` of a GPU on Ray and trains on it).
        gpus_per_trial: GPU fraction each trial reserves when ``device`` is CUDA.
    """

    top: int = 8
    steps: tuple[int, ...] = (50, 150, 450)
    keep: float = 0.5
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    seed: int = 0
    cpus_per_trial: int = 1
    device: str = "cpu"
    gpus_per_trial: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if self.top < 0:
            raise InvalidValueError(f"refine top must be >= 0, got {self.top}")
        if not self.steps or any(s < 1 for s in self.steps) or list(self.steps) != sorted(set(self.steps)):
            raise InvalidValueError(
                f"refine steps must be increasing step counts >= 1 (cumulative, e.g. [50, 150, 450]), got {list(self.steps)}"
            )
        if not 0.0 < self.keep < 1.0:
            raise InvalidValueError(f"refine keep must be in (0, 1), got {self.keep}")
        if not self.lr > 0 or self.batch_size < 1 or self.cpus_per_trial < 1:
            raise InvalidValueError("refine lr must be > 0, batch_size and cpus_per_trial >= 1")
        check_distillation(self.distill_weight, self.distill_temperature)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (steps as a list, as JSON reads them back)."""
        return {**asdict(self), "steps": list(self.steps)}

    def survivors(self, n: int) -> int:
        """How many of ``n`` candidates go on to the next rung."""
        return max(1, math.ceil(n * self.keep))


@dataclass
class Candidate:
    """One refined plan and its scores.

    Attributes:
        plan: The plan.
        evaluation: Its evaluation by the search (the cheap score is ``evaluation.accuracy``).
        scores: Search-val accuracy after each rung it reached, by rung step count.
        reference: The rule (``"uniform"``, ``"global"``) whose plan this is when it is a
            reference, which runs every rung (never halved away) for the searched plans to
            beat and ships when it leads at the last rung; ``""`` for a searched plan.
    """

    plan: Plan
    evaluation: Evaluation
    scores: dict[int, float] = field(default_factory=dict)
    reference: str = ""

    @property
    def cheap(self) -> float:
        """The search's score (no fine-tune)."""
        return self.evaluation.accuracy

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "plan": self.plan.to_dict(),
            "cheap_score": self.cheap,
            "flops_ratio": self.evaluation.flops_ratio,
            "scores": {str(k): v for k, v in self.scores.items()},
            "reference": self.reference,
        }


@dataclass
class Refinement:
    """The outcome of :func:`refine`.

    Attributes:
        config: The settings.
        candidates: The refined plans, in the search's order of preference.
        rungs_done: Rungs completed.
        chosen: Index of the candidate that ships (best score at the highest rung it reached).
        checkpoints: Tune checkpoint directory of each candidate's last rung (by index).
    """

    config: RefineConfig
    candidates: list[Candidate]
    rungs_done: int = 0
    chosen: int = 0
    checkpoints: dict[int, str] = field(default_factory=dict)

    @property
    def plan(self) -> Plan:
        """The plan that ships."""
        return self.candidates[self.chosen].plan

    @property
    def score(self) -> float | None:
        """The chosen plan's refined score (None before any rung)."""
        c = self.candidates[self.chosen]
        return c.scores[self.chosen_steps] if c.scores else None

    @property
    def chosen_steps(self) -> int:
        """Fine-tune steps behind the chosen plan's refined score (0 before any rung)."""
        c = self.candidates[self.chosen]
        return max(c.scores) if c.scores else 0

    def weights(self, index: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """Candidate ``index``'s weights after the last rung it ran (None before any rung or when that checkpoint is gone)."""
        directory = self.checkpoints.get(index)
        if not self.rungs_done or not directory or not (Path(directory) / STATE_FILE).is_file():
            return None
        return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)["model"]

    def alive(self) -> list[int]:
        """Candidates that reached the last completed rung (all of them before the first)."""
        if self.rungs_done == 0:
            return list(range(len(self.candidates)))
        last = self.config.steps[self.rungs_done - 1]
        return [i for i, c in enumerate(self.candidates) if last in c.scores]

    def next_rung(self) -> list[int]:
        """Candidates that run the next rung.

        All of them at the first rung; after it, the better part (``config.keep``) of the searched
        plans that ran the last rung, by its score, and every reference.
        """
        alive = self.alive()
        if not self.rungs_done:
            return alive
        last = self.config.steps[self.rungs_done - 1]
        searched = [i for i in alive if not self.candidates[i].reference]
        ranked = sorted(searched, key=lambda i: (-self.candidates[i].scores[last], i))
        kept = ranked[: self.config.survivors(len(searched))] if searched else []
        return sorted(kept + [i for i in alive if self.candidates[i].reference])

    def choose(self) -> None:
        """Pick the best candidate at the highest completed rung."""
        alive = self.alive()
        if self.rungs_done:
            last = self.config.steps[self.rungs_done - 1]
            self.chosen = max(alive, key=lambda i: (self.candidates[i].scores[last], -i))
        else:
            self.chosen = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``refine.json`` holds)."""
        return {
            "config": self.config.to_dict(),
            "rungs_done": self.rungs_done,
            "chosen": self.chosen,
            "refined_score": self.score,
            "candidates": [c.to_dict() for c in self.candidates],
            "checkpoints": {str(k): v for k, v in self.checkpoints.items()},
        }


REFERENCE_COLOURS = {"uniform": "gray", "global": "saddlebrown"}
"""Line colour of each rule's reference in ``refine.png``."""


def reference_rule(saved: Any) -> str:
    """A recorded candidate's reference rule (``refine.json`` held true/false while uniform was the only one)."""
    if isinstance(saved, bool):
        return "uniform" if saved else ""
    return str(saved or "")


def _same_candidates(saved: dict[str, Any], config: RefineConfig, candidates: Sequence[Candidate]) -> bool:
    plans = [(c["plan"], reference_rule(c.get("reference"))) for c in saved.get("candidates", [])]
    return saved.get("config") == config.to_dict() and plans == [(c.plan.to_dict(), c.reference) for c in candidates]


def load_refinement(path: Path, config: RefineConfig, candidates: list[Candidate]) -> Refinement:
    """The refinement recorded in ``path`` if it is for these candidates and settings, else a fresh one."""
    fresh = Refinement(config, candidates)
    if not path.is_file():
        return fresh
    saved = json.loads(path.read_text())
    if not _same_candidates(saved, config, candidates):
        logger.warning("%s holds a refinement of other plans or settings; refining again", path)
        return fresh
    for c, s in zip(candidates, saved["candidates"]):
        c.scores = {int(k): float(v) for k, v in s["scores"].items()}
    done = int(saved["rungs_done"])
    checkpoints = {int(k): v for k, v in saved.get("checkpoints", {}).items()}
    if any(not Path(p).is_dir() for p in checkpoints.values()):
        logger.warning("%s names checkpoints that are gone; refining again", path)
        for c in candidates:
            c.scores = {}
        return fresh
    refinement = Refinement(config, candidates, done, 0, checkpoints)
    refinement.choose()
    if done:
        logger.info("refinement: %d of %d rungs already done (%s)", done, len(config.steps), path)
    return refinement


# ---------------------------------------------------------------------------- the Tune trial


def _batches_from(train: TensorData, batch_size: int, seed: int, start: int) -> Any:
    """Training batches from step ``start`` on (the same sequence for every plan)."""
    step, epoch = 0, 0
    while True:
        for batch in train.batches(
            batch_size, shuffle=True, seed=derive_seed(seed, "refine", epoch), drop_last=len(train) >= batch_size
        ):
            if step >= start:
                yield batch
            step += 1
        epoch += 1


def _rung_trial(
    trial: dict[str, Any],
    *,
    starts: dict[str, nn.Module],
    train: TensorData,
    val: TensorData,
    teacher: nn.Module | None,
    config: RefineConfig,
) -> None:
    """One plan's rung, run by Ray Tune: train from the last rung's checkpoint and report the search-val score."""
    from ray import tune

    torch.set_num_threads(config.cpus_per_trial)
    key, begin, end = trial["key"], int(trial["begin"]), int(trial["end"])
    seed_everything(derive_seed(config.seed, "refine-trial", key))
    device = torch.device("cuda" if config.device.startswith("cuda") else "cpu")  # Ray shows a trial its own GPU
    model = copy.deepcopy(starts[key]).to(device)
    if teacher is not None:
        teacher = copy.deepcopy(teacher).to(device).eval()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    source = trial["resume"].get(key)
    if source:
        state = torch.load(Path(source) / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    model.train()
    batches = _batches_from(train, config.batch_size, config.seed, begin)
    for _ in range(end - begin):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = student_loss(model(x), y, teacher, x, config.distill_weight, config.distill_temperature)
        loss.backward()
        optimizer.step()
    model.eval()
    score = evaluate_accuracy(model, val)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(tmp) / STATE_FILE)
        tune.report({"score": score, "steps": end, "key": key}, checkpoint=tune.Checkpoint.from_directory(tmp))


def _progress_callback(total: int, description: str) -> Any:
    """A Tune callback that advances a progress bar as trials report."""
    from ray import tune

    class RungProgress(tune.Callback):
        def __init__(self) -> None:
            from automl_prune.progress import Progress

            self.bar = Progress(total, description, "plan", leave=False)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.bar.update(1)
            self.bar.set_postfix(last=f"{result['score']:.4f}")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.bar.close()

    return RungProgress()


def _run_rung(
    refinement: Refinement,
    rung: int,
    alive: list[int],
    starts: dict[str, nn.Module],
    train: TensorData,
    val: TensorData,
    teacher: nn.Module | None,
    storage: Path,
) -> dict[int, tuple[float, str]]:
    """Run one rung as a Tune experiment; return (score, checkpoint directory) by candidate index."""
    from ray import tune

    from automl_prune.parallel import fit_tuner

    config = refinement.config
    begin = config.steps[rung - 1] if rung else 0
    end = config.steps[rung]
    name = f"rung{rung + 1}_{end}steps"
    shutil.rmtree(storage / name, ignore_errors=True)  # a rung that did not finish is run again whole
    trainable = tune.with_resources(
        tune.with_parameters(_rung_trial, starts=starts, train=train, val=val, teacher=teacher, config=config),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial if config.device.startswith("cuda") else 0},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={
            "key": tune.grid_search([str(i) for i in alive]),
            "begin": begin,
            "end": end,
            "resume": {str(i): refinement.checkpoints.get(i, "") for i in alive},
        },
        tune_config=tune.TuneConfig(metric="score", mode="max", reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[_progress_callback(len(alive), f"refine {begin}->{end} steps")],
        ),
    )
    grid = fit_tuner(tuner)  # Ctrl-C stops the job; the unfinished rung runs again on resume
    out: dict[int, tuple[float, str]] = {}
    errors = []
    for result in grid:
        if result.error is not None or result.checkpoint is None or "score" not in result.metrics:
            errors.append(str(result.error))
            continue
        out[int(result.metrics["key"])] = (float(result.metrics["score"]), result.checkpoint.path)
    if errors:
        logger.warning("refinement: %d trial(s) of rung %d failed: %s", len(errors), rung + 1, errors[0])
    return out


def refine(
    candidates: list[Candidate],
    starts: list[nn.Module],
    train: TensorData,
    val: TensorData,
    config: RefineConfig,
    run_dir: str | Path,
    teacher: nn.Module | None = None,
    ray_address: str | None = None,
) -> Refinement:
    """Refine ``candidates`` by successive halving of short fine-tunes (see the module docstring).

    Args:
        candidates: Distinct plans in the search's order of preference (their scores are filled in).
        starts: Each candidate's pruned model as the search scored it (not modified).
        train: Training data of the fine-tunes.
        val: Search-val data the rungs are scored on.
        config: Settings.
        run_dir: Run directory (``refine.json``, ``refine.png`` and Tune's ``refine/`` go there).
        teacher: The dense model, when ``config.distill_weight > 0``.
        ray_address: An existing Ray cluster to run the trials on (default: Ray on this machine,
            started here and shut down after, unless Ray is already initialised).

    Returns:
        The refinement (its ``chosen`` candidate ships).
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off: progress comes from our bar
    import ray

    run = Path(run_dir)
    if len(candidates) != len(starts) or not candidates:
        raise InvalidValueError("refine needs one start model per candidate, and at least one candidate")
    refinement = load_refinement(run / REFINE_FILE, config, candidates)
    if refinement.rungs_done == len(config.steps):
        return refinement
    if config.distill_weight > 0 and teacher is None:
        raise InvalidValueError("refinement with distill_weight > 0 needs the dense model as teacher")
    started = False
    if not ray.is_initialized():
        from automl_prune.parallel import connect_ray, start_local_ray

        if ray_address:
            connect_ray(ray_address)
        else:
            cpus = os.cpu_count() or 1
            start_local_ray(max(1, min(len(candidates), cpus // config.cpus_per_trial)), config.cpus_per_trial)
        started = True
    try:
        models = {str(i): m.eval() for i, m in enumerate(starts)}
        for rung in range(refinement.rungs_done, len(config.steps)):
            alive = refinement.next_rung()
            logger.info(
                "refinement rung %d/%d: %d plan(s) to %d steps",
                rung + 1,
                len(config.steps),
                len(alive),
                config.steps[rung],
            )
            results = _run_rung(refinement, rung, alive, models, train, val, teacher, run / REFINE_DIR)
            if not results:
                raise InvalidValueError(f"every refinement trial of rung {rung + 1} failed (see the log above)")
            for i, (score, checkpoint) in results.items():
                candidates[i].scores[config.steps[rung]] = score
                refinement.checkpoints[i] = checkpoint
            refinement.rungs_done = rung + 1
            refinement.choose()
            write_json(run / REFINE_FILE, refinement.to_dict())
    finally:
        if started:
            ray.shutdown()
    plot_refinement(refinement, run / REFINE_PLOT)
    return refinement


def plot_refinement(refinement: Refinement, path: Path) -> None:
    """``refine.png``: each candidate's cheap score against its refined score at every rung it reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rung, steps in enumerate(refinement.config.steps[: refinement.rungs_done]):
        points = [(c.cheap, c.scores[steps]) for c in refinement.candidates if steps in c.scores]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, label=f"after {steps} steps", s=24 + 12 * rung)
    for c in refinement.candidates:
        if c.reference and c.scores:
            ax.plot(
                [c.cheap] * len(c.scores),
                [c.scores[k] for k in sorted(c.scores)],
                marker="s",
                linestyle=":",
                color=REFERENCE_COLOURS.get(c.reference, "gray"),
                label=f"{c.reference} plan (reference)",
            )
    chosen = refinement.candidates[refinement.chosen]
    if chosen.scores:
        ax.scatter([chosen.cheap], [chosen.scores[max(chosen.scores)]], marker="*", s=220, color="black", label="ships")
    ax.set_xlabel("cheap score (search-val accuracy, BN recalibrated, no fine-tune)")
    ax.set_ylabel("refined score (search-val accuracy after the fine-tune)")
    ax.set_title("Refinement of the finalists")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
