"""The model-first Python API on a model defined here, with torch Datasets and DataLoaders of real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import automl_prune
from automl_prune.errors import InvalidValueError
from automl_prune.graph import count_cost
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.types import Plan


class TinyNet(nn.Module):
    """A user's own classifier: nothing of it is in the zoo."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(24, 48, 3, padding=1),
            nn.BatchNorm2d(48),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def user_model(fashion_small) -> nn.Module:
    """TinyNet trained one epoch on 12k Fashion-MNIST images with a plain training loop."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(fashion_small.train.images, fashion_small.train.labels), 128, shuffle=True)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_search_prune_finetune_export_report(user_model, fashion_small, tmp_path: Path) -> None:
    train = TensorDataset(fashion_small.train.images, fashion_small.train.labels)
    val = DataLoader(TensorDataset(fashion_small.search_val.images, fashion_small.search_val.labels), 200)
    dense_before = {k: v.clone() for k, v in user_model.state_dict().items()}
    result = automl_prune.search(
        user_model,
        train,
        val,
        budget={"flops": 0.5},
        strategy="random",
        evaluations=8,
        test_data=(fashion_small.test.images, fashion_small.test.labels),
        example_inputs=torch.zeros(1, 1, 28, 28),
        options={"search.refine_top": 0, "search.eval_size": 500, "finetune.epochs": 0.3, "prune.round_to": 1},
        out=tmp_path / "run",
    )
    assert all(torch.equal(v, user_model.state_dict()[k]) for k, v in dense_before.items())  # not modified
    assert (tmp_path / "run" / "plan.json").is_file() and (tmp_path / "run" / "evaluations.jsonl").is_file()
    pruned = result.prune()
    # the pruned model is the one the search scored
    assert evaluate_accuracy(pruned, result.evaluator.val) == pytest.approx(result.score)
    x = torch.zeros(1, 1, 28, 28)
    assert count_cost(pruned, x).flops <= 0.5 * count_cost(user_model, x).flops
    before = evaluate_accuracy(pruned, fashion_small.test)
    tuned = result.finetune()
    after = evaluate_accuracy(tuned, fashion_small.test)
    assert after > before and after > 0.6  # a real fine-tune on real data
    files = result.export(tmp_path / "export")
    scripted = torch.jit.load(str(files["torchscript"]))
    images = fashion_small.test.images[:16]
    assert torch.allclose(scripted(images), tuned(images), atol=1e-4)
    state = torch.load(files["state_dict"], weights_only=True)
    assert set(state) == set(tuned.state_dict())
    assert Plan.from_dict(json.loads(files["plan"].read_text())) == result.plan  # a plan file `prune` takes
    assert json.loads(files["export"].read_text())["round_to"] == 1
    report = result.report(tmp_path / "export")
    dense, shipped = report["models"]["dense"], report["models"]["pruned"]
    assert shipped["test_accuracy"] == pytest.approx(after) and shipped["flops"] < dense["flops"]
    assert shipped["latency_ms"] > 0 and dense["latency_ms"] > 0 and report["fine_tuned"]
    assert "| pruned |" in (tmp_path / "export" / "report.md").read_text()


def test_bad_data_and_options_are_one_clear_error(user_model, fashion_small) -> None:
    val = (fashion_small.search_val.images, fashion_small.search_val.labels)
    with pytest.raises(InvalidValueError, match="train_data must be a torch Dataset"):
        automl_prune.search(user_model, [1, 2, 3], val)
    with pytest.raises(InvalidValueError, match="labels go up to 10 but the model has 10 outputs"):
        automl_prune.search(user_model, (val[0], val[1] + 1), val)
    with pytest.raises(InvalidValueError, match="example_inputs have shape"):
        automl_prune.search(user_model, val, val, example_inputs=torch.zeros(1, 3, 32, 32))
    with pytest.raises(InvalidValueError, match="parallel.workers"):
        automl_prune.search(user_model, val, val, options={"parallel.workers": 2})


def test_failed_evaluations_are_counted_and_all_failed_is_an_error(user_model, fashion_small, tmp_path, monkeypatch):
    from automl_prune.errors import SearchFailedError
    from automl_prune.evaluator import Evaluator

    data = (fashion_small.search_val.images, fashion_small.search_val.labels)
    original = Evaluator.build
    calls = {"n": 0}

    def first_three_fail(self, plan):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RuntimeError("boom")
        return original(self, plan)

    monkeypatch.setattr(Evaluator, "build", first_three_fail)
    quick = {"search.refine_top": 0, "search.eval_size": 200, "search.recalibration_batches": 2, "prune.round_to": 1}
    automl_prune.search(user_model, data, data, strategy="random", evaluations=6, options=quick, out=tmp_path / "some")
    result = json.loads((tmp_path / "some" / "result.json").read_text())
    assert result["failed_evaluations"] == 3 and "RuntimeError: boom" in result["first_failure"]

    monkeypatch.setattr(Evaluator, "build", lambda self, plan: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(
        SearchFailedError,
        match=r"all 4 evaluations failed, nothing exported; the first: RuntimeError: boom .*again with --overwrite\)",
    ):
        automl_prune.search(
            user_model, data, data, strategy="random", evaluations=4, options=quick, out=tmp_path / "all"
        )
    assert not (tmp_path / "all" / "plan.json").exists()
