"""The model-first Python API: search how to prune any ``nn.Module`` on your own data.

::

    import automl_prune

    result = automl_prune.search(model, train_data, val_data, budget={"flops": 0.5}, strategy="ddpg")
    pruned = result.prune()         # the pruned model exactly as the search scored it
    tuned = result.finetune()       # fine-tuned on train_data (best epoch on val_data)
    result.export("out/")           # TorchScript, ONNX, state_dict and plan.json
    print(result.report())          # accuracy, FLOPs, params and measured latency, dense vs pruned

The same stages the command line runs (:mod:`automl_prune.pipeline`), on the model and data
given: datasets are any map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs, a
``DataLoader`` over one, a ``(images, labels)`` pair of tensors, or :class:`TensorData`. They
are read into memory once (the evaluator scores hundreds of plans on the same images). Every
config key is an option (``options={"search.min_keep": 0.3}``), as in a config file.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from automl_prune.checkpoint import CheckpointInfo
from automl_prune.config import Config, resolve
from automl_prune.data import DataSplits, TensorData
from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator
from automl_prune.io import write_json, write_text
from automl_prune.models import ModelSpec
from automl_prune.types import Plan

if TYPE_CHECKING:
    from automl_prune.refine import Refinement

logger = logging.getLogger(__name__)

USER_MODEL = "user-model"
"""The model name recorded for a model passed as an object (it cannot be rebuilt by name)."""


def as_tensor_data(data: Any, what: str, limit: int | None = None) -> TensorData:
    """``data`` (Dataset, DataLoader, (images, labels) tensors or TensorData) as one in-memory set.

    Raises:
        InvalidValueError: Not image/label pairs of a consistent N x C x H x W shape.
    """
    if isinstance(data, TensorData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
        return TensorData(images.float(), labels.long().view(-1))
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=256, shuffle=False)
    if not isinstance(data, DataLoader):
        raise InvalidValueError(
            f"{what} must be a torch Dataset of (image, label) pairs, a DataLoader, an (images, labels) pair of "
            f"tensors or TensorData; got {type(data).__name__}"
        )
    xs, ys, n = [], [], 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InvalidValueError(f"{what} must yield (image, label) pairs; got {type(batch).__name__}")
        x, y = torch.as_tensor(batch[0]).float(), torch.as_tensor(batch[1]).long().view(-1)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise InvalidValueError(f"{what} is empty")
    try:
        return TensorData(torch.cat(xs)[:limit], torch.cat(ys)[:limit])
    except RuntimeError as exc:
        raise InvalidValueError(f"{what}: images of different shapes ({str(exc).splitlines()[0]})") from None


def _splits(model: nn.Module, train: TensorData, val: TensorData, test: TensorData | None) -> DataSplits:
    shape = tuple(train.images.shape[1:])
    if tuple(val.images.shape[1:]) != shape or (test is not None and tuple(test.images.shape[1:]) != shape):
        raise InvalidValueError(f"train, val and test images must share one shape; train has {shape}")
    channels, height, width = shape
    if height != width:
        raise InvalidValueError(f"images must be square (got {height}x{width}); resize or crop them first")
    was_training = model.training
    with torch.no_grad():
        out = model.eval()(train.images[:1])
    model.train(was_training)
    if out.dim() != 2:
        raise InvalidValueError(f"the model must return class scores N x classes; it returned shape {tuple(out.shape)}")
    classes = int(out.shape[1])
    top = int(max(train.labels.max(), val.labels.max()))
    if top >= classes:
        raise InvalidValueError(f"labels go up to {top} but the model has {classes} outputs")
    return DataSplits(
        name="user-data",
        train=train,
        search_val=val,
        test=test if test is not None else val,
        num_classes=classes,
        in_channels=channels,
        image_size=height,
    )


def _config(
    budget: Mapping[str, Any] | float | None,
    strategy: str | None,
    evaluations: int | None,
    seed: int | None,
    config: str | os.PathLike[str] | None,
    options: Mapping[str, Any] | None,
) -> Config:
    overrides: dict[str, Any] = dict(options or {})
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        budget = {"flops": budget}
    for term, value in dict(budget or {}).items():
        overrides[f"budget.{term}"] = value
    for key, value in (("search.strategy", strategy), ("search.evaluations", evaluations), ("seed", seed)):
        if value is not None:
            overrides[key] = value
    resolved = resolve(config, overrides)
    if resolved.parallel.workers > 1 or resolved.parallel.ray_address:
        raise InvalidValueError(
            "the Python API evaluates plans in this process (a model object cannot be rebuilt on Ray workers); "
            "run `automl-prune search` with model.name or model.weights for parallel.workers > 1"
        )
    return resolved


@dataclass
class PruningSearch:
    """A finished search and what can be done with its plan (returned by :func:`search`).

    Attributes:
        model: The dense model (not modified).
        data: The splits the search used.
        config: The resolved settings.
        evaluator: The evaluator that scored the plans.
        run_dir: Where the search wrote its evaluations, plan.json and result.json.
        plan: The plan that ships (best by the search, refined or measured when configured).
        score: Its search-val accuracy as the search scored it.
        info: The checkpoint info of the dense model (of the fine-tuned one after :meth:`finetune`).
        refinement: The refinement that chose ``plan`` (None when off); :meth:`finetune` starts from
            its weights after the last rung (``finetune.from_refinement``).
    """

    model: nn.Module
    data: DataSplits
    config: Config
    evaluator: Evaluator
    run_dir: Path
    plan: Plan
    score: float
    info: CheckpointInfo
    refinement: Refinement | None = field(default=None, repr=False)
    _pruned: nn.Module | None = field(default=None, repr=False)
    _tuned: nn.Module | None = field(default=None, repr=False)

    def prune(self) -> nn.Module:
        """The plan cut out of the dense model, exactly as the search scored it (a new model)."""
        if self._pruned is None:
            self._pruned = self.evaluator.build(self.plan)
        return self._pruned

    def finetune(self, epochs: float | None = None) -> nn.Module:
        """Fine-tune the pruned model on the training data (``finetune.*`` settings; ``epochs`` overrides).

        Starts from the model the search scored (after the refinement's steps, when it ran) and keeps
        the best epoch on the validation data.
        """
        from automl_prune.pipeline import prune_and_finetune

        config = self.config
        if epochs is not None:
            config = copy.deepcopy(config)
            config.finetune.epochs = float(epochs)
        tuned, self.info = prune_and_finetune(
            config, self.model, self.info, self.plan, self.data, self.evaluator, self.refinement
        )
        self._tuned = tuned
        return tuned

    @property
    def final_model(self) -> nn.Module:
        """The fine-tuned model when :meth:`finetune` ran, else the pruned one."""
        return self._tuned if self._tuned is not None else self.prune()

    def export(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the final model as TorchScript (``model.ts``), ONNX (``model.onnx``; both run on test
        images and compared with the model before they are written), its ``state_dict``
        (``model_state.pt``), the plan (``plan.json``, as a run's: ``automl-prune prune --plan`` takes
        it) and ``export.json`` (the channel multiple the plan was pruned with, ``round_to``, and each
        exported file's largest difference from torch).

        Returns:
            File kind -> path.
        """
        from automl_prune.export import export_model
        from automl_prune.io import atomic_path

        out = Path(out_dir)
        model = self.final_model.cpu().eval()
        paths = export_model(model, self.info, out, checkpoint=False, check_inputs=self.data.test.images[:8])
        diff = paths.onnx_max_abs_diff
        state = out / "model_state.pt"
        with atomic_path(state) as tmp:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        write_json(out / "plan.json", self.plan.to_dict())
        write_json(
            out / "export.json",
            {
                "onnx_max_abs_diff": diff,
                "torchscript_max_abs_diff": paths.torchscript_max_abs_diff,
                "round_to": self.evaluator.config.round_to,
            },
        )
        logger.info("exported to %s (ONNX max abs difference %.2e)", out, diff)
        return {
            "torchscript": paths.torchscript,
            "onnx": paths.onnx,
            "state_dict": state,
            "plan": out / "plan.json",
            "export": out / "export.json",
        }

    def report(self, out_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Test accuracy, FLOPs, params and latency (on the budget's runtime) of the dense and final models.

        Latency is measured in interleaved rounds at batch 1 (median, p10-p90). With ``out_dir``,
        ``report.md`` and ``report.json`` are written there too.
        """
        from automl_prune.graph import count_cost
        from automl_prune.measure.accuracy import evaluate_accuracy
        from automl_prune.measure.latency import SESSIONS, measure_interleaved
        from automl_prune.runtimes import get_runtime

        b = self.evaluator.budget
        shape = self.data.input_shape(1)
        models = {"dense": self.evaluator.model, "pruned": self.final_model.cpu().eval()}  # measured on the CPU copy
        runtime = get_runtime(b.runtime)
        runners = {k: runtime.compile(m, shape, b.device, b.threads) for k, m in models.items()}
        try:
            stats = measure_interleaved(
                runners, rounds=self.config.report.latency_rounds, reference="dense", sessions=SESSIONS
            )
        finally:
            for r in runners.values():
                r.close()
        rows = {}
        for name, m in models.items():
            cost = count_cost(m, torch.zeros(shape))
            rows[name] = {
                "test_accuracy": evaluate_accuracy(m, self.data.test),
                "flops": cost.flops,
                "params": cost.params,
                "latency_ms": stats[name].median_ms,
                "latency_p10_p90_ms": [stats[name].p10_ms, stats[name].p90_ms],
            }
        out = {
            "plan": self.plan.to_dict(),
            "search_score": self.score,
            "fine_tuned": self._tuned is not None,
            "runtime": f"{b.runtime} ({b.device}), batch 1",
            "test_is_val": self.data.test is self.data.search_val,
            "models": rows,
        }
        if out_dir is not None:
            d, p = rows["dense"], rows["pruned"]
            lines = [
                f"# Pruning report ({'fine-tuned' if out['fine_tuned'] else 'not fine-tuned'})",
                "",
                "| model | test acc | FLOPs | params | latency ms |",
                "|---|---:|---:|---:|---:|",
                *(
                    f"| {k} | {r['test_accuracy']:.4f} | {r['flops']:,} | {r['params']:,} | {r['latency_ms']:.4g} |"
                    for k, r in rows.items()
                ),
                "",
                f"FLOPs x{d['flops'] / max(p['flops'], 1):.2f} smaller, speed-up x{d['latency_ms'] / p['latency_ms']:.2f} "
                f"on {out['runtime']}.",
            ]
            if out["test_is_val"]:
                lines.append("No test data was given: accuracies are on the validation data the search chose with.")
            write_text(Path(out_dir) / "report.md", "\n".join(lines) + "\n")
            write_json(Path(out_dir) / "report.json", out)
        return out


def search(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    *,
    budget: Mapping[str, Any] | float | None = None,
    strategy: str | None = None,
    evaluations: int | None = None,
    test_data: Any = None,
    example_inputs: torch.Tensor | None = None,
    seed: int | None = None,
    config: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PruningSearch:
    """Search how to prune ``model`` under ``budget``: the command line's search, from Python.

    Args:
        model: Any image classifier (``N x C x H x W`` in, ``N x classes`` out). Not modified.
        train_data: Training images (BN re-estimation, refinement, fine-tuning).
        val_data: Validation images the search scores plans on (never the test set).
        budget: Budget terms, e.g. ``{"flops": 0.5}``, ``{"speedup": 1.6, "threads": 1}``,
            ``{"params": 0.3}``; a number is a FLOPs fraction. Default: the config's (50% FLOPs).
        strategy: Search strategy (``automl-prune list strategies``). Default: ``ddpg``.
        evaluations: Plans scored by the search. Default: the config's (100).
        test_data: Held-out images for :meth:`PruningSearch.report` (default: ``val_data``).
        example_inputs: An input batch; checked against the data's image shape when given.
        seed: Seed of everything random.
        config: A config file or packaged config name to start from (``"smoke"``).
        options: Any other config keys, dotted (``{"search.refine_top": 0, "prune.criterion": "fpgm"}``).
        out: Directory for the search's files (default: a new temporary directory).
        progress: Show progress (a bar in a terminal, log lines elsewhere).

    Returns:
        The search, ready to :meth:`~PruningSearch.prune`, :meth:`~PruningSearch.finetune`,
        :meth:`~PruningSearch.export` and :meth:`~PruningSearch.report`.

    Raises:
        InvalidValueError: Bad data, options or a budget no plan can meet.
    """
    from automl_prune.pipeline import make_evaluator, make_space, run_search, set_threads
    from automl_prune.runs import RunDirectory
    from automl_prune.seeding import seed_everything

    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _config(budget, strategy, evaluations, seed, config, options)
    set_threads(cfg)
    seed_everything(cfg.seed)
    train = as_tensor_data(train_data, "train_data")
    val = as_tensor_data(val_data, "val_data")
    test = as_tensor_data(test_data, "test_data") if test_data is not None else None
    data = _splits(model, train, val, test)
    if example_inputs is not None and tuple(example_inputs.shape[1:]) != tuple(data.input_shape(1)[1:]):
        raise InvalidValueError(
            f"example_inputs have shape {tuple(example_inputs.shape)} but the data's images are "
            f"{tuple(data.input_shape(1)[1:])}"
        )
    info = CheckpointInfo(ModelSpec(USER_MODEL, data.in_channels, data.num_classes), data.input_shape(1))
    path = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="automl-prune-"))
    run = RunDirectory(path, cfg.to_dict(), overwrite=True)
    evaluator = make_evaluator(cfg, model.eval(), data)
    space = make_space(cfg, evaluator)
    outcome = run_search(cfg, run, evaluator, space, info.spec, progress=progress)
    logger.info("search done: plan with search-val score %.4f in %s", outcome.evaluation.accuracy, path)
    return PruningSearch(
        model, data, cfg, evaluator, path, outcome.plan, outcome.evaluation.accuracy, info, outcome.refinement
    )
