"""Checkpoints rebuild their (pruned) architecture; exports run in TorchScript and onnxruntime."""

from __future__ import annotations

import pytest
import torch

from automl_prune.checkpoint import CheckpointInfo, load_checkpoint, read_checkpoint, save_checkpoint
from automl_prune.errors import CheckpointError
from automl_prune.export import check_onnx, export_model
from automl_prune.graph import LayerGraph
from automl_prune.models import ModelSpec, build_model
from automl_prune.pruning import apply


@pytest.fixture(scope="module")
def pruned_resnet():
    spec = ModelSpec("resnet20", 1, 10)
    model = build_model(spec).eval()
    info = CheckpointInfo(spec, (1, 1, 28, 28))
    graph = LayerGraph(model, info.example_inputs())
    plan = graph.uniform_plan(0.5, round_to=4)
    pruned = apply(model, plan, "l2", graph=graph, round_to=4)
    return pruned, CheckpointInfo(spec, (1, 1, 28, 28), plan, 4, {"note": "test"})


def test_pruned_checkpoint_reloads_into_pruned_architecture(tmp_path, pruned_resnet) -> None:
    pruned, info = pruned_resnet
    save_checkpoint(tmp_path / "m.pt", pruned, info)
    model, loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.plan == info.plan and loaded.round_to == 4 and loaded.meta == {"note": "test"}
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [
        m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), pruned(x))
    # plain data only: loadable with weights_only=True
    torch.load(tmp_path / "m.pt", weights_only=True)


def test_export_formats_match_torch(tmp_path, pruned_resnet) -> None:
    pruned, info = pruned_resnet
    paths = export_model(pruned, info, tmp_path)
    assert 0 <= paths.onnx_max_abs_diff < 1e-4 and 0 <= paths.torchscript_max_abs_diff < 1e-4  # checked on export
    x = torch.randn(6, 1, 28, 28)
    assert check_onnx(pruned, paths.onnx, x) < 1e-4  # dynamic batch: exported at 1, run at 6
    scripted = torch.jit.load(str(paths.torchscript))
    with torch.no_grad():
        assert torch.allclose(scripted(x), pruned(x), atol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_or_mismatched_checkpoints_are_clear_errors(tmp_path, pruned_resnet) -> None:
    pruned, info = pruned_resnet
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an automl-prune checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    dense_info = CheckpointInfo(info.spec, info.input_shape)  # claims dense, holds pruned weights
    save_checkpoint(tmp_path / "lie.pt", pruned, dense_info)
    with pytest.raises(CheckpointError, match="do not match resnet20"):
        load_checkpoint(tmp_path / "lie.pt")


def test_failed_write_leaves_previous_file_intact(tmp_path, pruned_resnet, monkeypatch) -> None:
    pruned, info = pruned_resnet
    path = save_checkpoint(tmp_path / "m.pt", pruned, info)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, pruned, info)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_failed_export_leaves_the_output_directory_as_it_was(tmp_path, pruned_resnet, monkeypatch) -> None:
    from automl_prune.errors import InvalidValueError
    from automl_prune.runtimes import get_runtime

    model, info = pruned_resnet
    out = tmp_path / "out"
    export_model(model, info, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(type(get_runtime("onnxruntime")), "export", broken)
    with pytest.raises(InvalidValueError, match=r"exporting model failed \(RuntimeError: exporter crashed\); nothing"):
        export_model(model, info, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def test_a_model_that_fails_its_forward_pass_is_not_written(tmp_path, pruned_resnet) -> None:
    from automl_prune.errors import InvalidValueError

    model, info = pruned_resnet
    broken = torch.nn.Sequential(model, torch.nn.Linear(3, 3))  # logits of 10 into a 3-input layer
    with pytest.raises(
        InvalidValueError, match=r"fails on a forward pass of shape \(1, 1, 28, 28\).*nothing was written"
    ):
        export_model(broken, info, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_that_disagrees_with_the_model_is_not_written(tmp_path, pruned_resnet, monkeypatch) -> None:
    """A conversion that changes the outputs (here: the ONNX file of a model with another bias) is refused."""
    import copy

    from automl_prune.errors import InvalidValueError
    from automl_prune.runtimes import get_runtime

    model, info = pruned_resnet
    ort = type(get_runtime("onnxruntime"))
    real_export = ort.export

    def export_another(self, m, example, path):
        other = copy.deepcopy(m)
        with torch.no_grad():
            [m for m in other.modules() if isinstance(m, torch.nn.Linear)][-1].bias.add_(1.0)
        return real_export(self, other, example, path)

    monkeypatch.setattr(ort, "export", export_another)
    with pytest.raises(
        InvalidValueError, match=r"the exported model\.onnx differs from the model by 1\.00e\+00 .*nothing was"
    ):
        export_model(model, info, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == []  # neither the directory nor a staging directory
