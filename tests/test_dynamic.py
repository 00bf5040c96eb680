"""Dynamic SkipNet on a short-trained resnet20 and real Fashion-MNIST images."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from automl_prune.dynamic import (
    GateConfig,
    GatedNetwork,
    calibrate_threshold,
    gate_statistics,
    load_gated,
    save_gated,
    script_gated,
    train_gated,
)
from automl_prune.errors import CheckpointError, InvalidValueError
from automl_prune.measure.accuracy import evaluate_accuracy
from automl_prune.models import ModelSpec, build_model
from automl_prune.runtimes import get_runtime, onnx_session

EXAMPLE = torch.zeros(1, 1, 28, 28)


def _trained(trained_resnet20, fashion_small, weight: float) -> GatedNetwork:
    net = GatedNetwork(trained_resnet20.model, EXAMPLE)
    config = GateConfig(pretrain_steps=20, rl_steps=60, batch_size=64, compute_weight=weight, dual_lr=0.0, seed=0)
    train_gated(net, fashion_small, config)
    return net


@pytest.fixture(scope="module")
def light(trained_resnet20, fashion_small) -> GatedNetwork:
    """Gates trained with no compute penalty: accuracy alone."""
    return _trained(trained_resnet20, fashion_small, 0.0)


@pytest.fixture(scope="module")
def heavy(trained_resnet20, fashion_small) -> GatedNetwork:
    """Gates trained with a heavy compute penalty."""
    return _trained(trained_resnet20, fashion_small, 5.0)


def _varied(trained_resnet20, images: torch.Tensor) -> GatedNetwork:
    """Untrained gates with random output weights, thresholded at the median of the first gate's
    probability on ``images``: the first block runs for half of them and is skipped for the rest."""
    net = GatedNetwork(trained_resnet20.model, EXAMPLE)
    generator = torch.Generator().manual_seed(0)
    for block in net.gated_blocks():
        with torch.no_grad():
            block.gate.fc2.weight.copy_(torch.randn(block.gate.fc2.weight.shape, generator=generator) * 4.0)
            block.gate.fc2.bias.zero_()
    first = net.gated_blocks()[0]
    probs: list[torch.Tensor] = []
    hook = first.gate.register_forward_hook(lambda _m, _a, out: probs.append(torch.sigmoid(out)))
    with torch.no_grad():
        net.eval()(images)  # the first gate's input does not depend on any other gate
    hook.remove()
    net.set_threshold(float(probs[0].median()) + 1e-7)
    return net.eval()


def test_open_gates_reproduce_the_dense_model(trained_resnet20, fashion_small) -> None:
    net = GatedNetwork(trained_resnet20.model, EXAMPLE).eval()
    images = fashion_small.test.images[:64]
    assert net.open_gates(images).all()  # gates start open: the dense model
    with torch.no_grad():
        assert torch.allclose(net(images), trained_resnet20.model(images), atol=1e-5)
    assert net.blocks == ["layers.0", "layers.1", "layers.2", "layers.4", "layers.5", "layers.7", "layers.8"]
    assert 0.15 < net.floor_share() < 0.25  # seven of nine blocks skippable; the gates cost ~0.2%


def test_a_skipped_block_is_not_computed(trained_resnet20, fashion_small) -> None:
    images = fashion_small.test.images[:64]
    net = _varied(trained_resnet20, images)
    block = net.gated_blocks()[0]
    seen: list[int] = []
    block.block.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    net.set_threshold(1.0)  # no gate reaches probability 1: every block skipped
    with torch.no_grad():
        net(images)
    assert seen == []
    decisions = net.open_gates(images)
    assert decisions.sum() == 0
    net = _varied(trained_resnet20, images)
    block = net.gated_blocks()[0]
    block.block.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    decisions = net.open_gates(images)
    runs = int(decisions[:, 0].sum())
    assert 0 < runs < len(images)  # this block runs for some images and not for others
    seen.clear()
    with torch.no_grad():
        net(images)
    assert seen == [runs]  # ... and only those images went through it
    seen.clear()
    skipped = int(torch.nonzero(decisions[:, 0] == 0)[0])
    with torch.no_grad():
        net(images[skipped : skipped + 1])  # batch 1, gate closed: the block is not called at all
    assert seen == []


def test_the_skip_rate_responds_to_the_compute_weight(light, heavy, fashion_small) -> None:
    calm = gate_statistics(light, fashion_small.search_val)
    pushed = gate_statistics(heavy, fashion_small.search_val)
    assert pushed.mean_flops_share < calm.mean_flops_share - 0.3
    assert calm.accuracy > 0.75  # a trained model whose gates stayed mostly open
    assert calm.mean_flops_share > 0.8
    assert pushed.accuracy > 0.3  # still classifying, with most blocks skipped


def test_the_threshold_meets_a_mean_flops_target(light, fashion_small) -> None:
    net = light
    previous = net.threshold_logit
    try:
        threshold = calibrate_threshold(net, fashion_small.search_val, 0.6)
        stats = gate_statistics(net, fashion_small.search_val)
        assert stats.mean_flops_share <= 0.6
        assert stats.threshold == threshold
        assert stats.mean_flops_share > 0.5  # the lowest threshold that fits: the budget is used, not wasted
        test = gate_statistics(net, fashion_small.test)
        assert abs(test.mean_flops_share - 0.6) < 0.1  # held-out images cost about the same
    finally:
        net.set_threshold_logit(previous)


def test_saturated_gates_still_meet_the_target(trained_resnet20, fashion_small) -> None:
    """Gates whose probabilities all read 1.0 in float32 (as hybrid RL can leave them) are told apart by their logits."""
    net = GatedNetwork(trained_resnet20.model, EXAMPLE)
    for i, block in enumerate(net.gated_blocks()):
        with torch.no_grad():
            block.gate.fc2.weight.zero_()
            block.gate.fc2.bias.fill_(20.0 + 5.0 * i)  # sigmoid = 1.0 in float32 for every gate
    val = fashion_small.search_val
    passes = []
    net.gated_blocks()[0].gate.register_forward_hook(lambda _m, _a, _out: passes.append(1))
    calibrate_threshold(net, val, 0.5)
    # two range passes, then bisection only until no logit lies between the ends (not all 30 steps)
    assert len(passes) <= 8 * math.ceil(len(val) / 500)
    stats = gate_statistics(net, val)
    assert stats.threshold == 1.0 and math.isfinite(stats.threshold_logit)  # the probability cannot say which
    assert 0.4 < stats.mean_flops_share <= 0.5  # ... the logit can: the surest gates stay open
    assert stats.block_run_rate == [0.0] * 5 + [1.0] * 2  # five of seven blocks skipped leave 42%


def test_torchscript_and_onnx_keep_the_per_input_control_flow(trained_resnet20, fashion_small) -> None:
    images = fashion_small.test.images[:32]
    net = _varied(trained_resnet20, images)
    rates = net.open_gates(images).mean(dim=0)
    assert ((rates > 0) & (rates < 1)).any()  # mixed decisions inside one batch
    with torch.no_grad():
        expected = net(images)
    scripted = script_gated(net)
    assert torch.allclose(scripted(images), expected, atol=1e-5)
    for i in range(4):
        assert torch.allclose(scripted(images[i : i + 1]), expected[i : i + 1], atol=1e-5)
    session = onnx_session(get_runtime("onnxruntime").convert(scripted, EXAMPLE), "cpu", 1)
    name = session.get_inputs()[0].name
    np.testing.assert_allclose(session.run(None, {name: images.numpy()})[0], expected.numpy(), atol=1e-4)
    for i in range(4):
        out = session.run(None, {name: images[i : i + 1].numpy()})[0]
        np.testing.assert_allclose(out, expected[i : i + 1].numpy(), atol=1e-4)


def test_a_saved_gated_model_reloads(tmp_path: Path, trained_resnet20, fashion_small) -> None:
    net = _varied(trained_resnet20, fashion_small.test.images[:16])
    net.set_threshold(0.37)
    path = save_gated(tmp_path / "gated.pt", net, trained_resnet20.info.spec, (1, 1, 28, 28), {"note": "x"})
    again, meta = load_gated(path)
    images = fashion_small.test.images[:16]
    with torch.no_grad():
        assert torch.equal(again(images), net(images))
    assert again.threshold == pytest.approx(0.37) and meta == {"note": "x"}
    with pytest.raises(CheckpointError, match="not a gated model"):
        load_gated(trained_resnet20.path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gated(tmp_path / "missing.pt")


def test_a_model_without_residual_blocks_is_refused() -> None:
    with pytest.raises(InvalidValueError, match="residual blocks with identity shortcuts"):
        GatedNetwork(build_model(ModelSpec("fashion_cnn", 1, 10)), EXAMPLE)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "automl_prune.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_skipnet_command_trains_compares_and_exports(tmp_path: Path, trained_resnet20, fashion_small) -> None:
    proc = _cli(
        "skipnet",
        "--model.checkpoint",
        str(trained_resnet20.path),
        "--budget.flops",
        "0.7",
        "--data.val_size",
        "1000",  # the threshold's calibration passes and the scores run on search-val: 1,000 images suffice here
        "--gates.pretrain_steps",
        "10",
        "--gates.rl_steps",
        "30",
        "--gates.batch_size",
        "64",
        "--gates.latency_images",
        "16",
        "--report.test_size",
        "500",
        "--report.latency_rounds",
        "2",
        "--threads",
        "2",
        "--out",
        "out",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert set(report["files"]) == {"gated.pt", "gated.ts", "gated.onnx", "report.md", "report.json", "gates.png"}
    assert all((out / f).is_file() for f in report["files"])
    assert report["gated"]["search_val_flops_share"] <= 0.7
    assert report["static"]["flops_share"] <= report["gated"]["search_val_flops_share"] + 1e-9
    assert set(report["latency"]["runtimes"]["onnxruntime"]) == {"dense", "static plan", "gated"}
    # the shipped files are the model that was scored
    net, meta = load_gated(out / "gated.pt")
    assert meta["target_flops"] == 0.7
    test = fashion_small.test
    scripted = torch.jit.load(str(out / "gated.ts"))
    images = test.images[:32]
    with torch.no_grad():
        assert torch.allclose(scripted(images), net(images), atol=1e-4)
    assert "| gated (dynamic) |" in (out / "report.md").read_text()
    assert evaluate_accuracy(net, test) > 0.5


def test_skipnet_command_refuses_an_absolute_flops_budget(tmp_path: Path) -> None:
    proc = _cli("skipnet", "--budget.flops", "1.5e6", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "skipnet targets a mean FLOPs share: give --budget.flops F with 0 < F <= 1" in proc.stderr
    assert not (tmp_path / "out").exists()
