"""Model registry: zoo, torchvision and user factories."""

from __future__ import annotations

import pytest
import torch

from automl_prune.errors import CheckpointError, InvalidValueError, UnknownNameError
from automl_prune.models import MODELS, ModelSpec, build_model, list_models

ZOO = ["fashion_cnn", "resnet20", "resnet56", "vgg16_bn", "mobilenetv2"]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_zoo_models_run_at_both_sizes(name: str, channels: int, size: int) -> None:
    model = build_model(ModelSpec(name, channels, 7)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_zoo_is_registered_and_listed() -> None:
    assert set(ZOO) <= set(MODELS.names())
    listed = [n for n, _ in list_models()]
    assert "tv:NAME" in listed and "package.module:factory" in listed


def test_resnet_projection_shortcuts_where_shape_changes() -> None:
    model = build_model(ModelSpec("resnet20", 3, 10))
    projections = [n for n, m in model.named_modules() if n.endswith("shortcut.0") and isinstance(m, torch.nn.Conv2d)]
    assert len(projections) == 2  # stage 1->2 and 2->3
    assert all(m.kernel_size == (1, 1) for n, m in model.named_modules() if n in projections)


def test_mobilenetv2_has_depthwise_convs() -> None:
    model = build_model(ModelSpec("mobilenetv2", 3, 10))
    dw = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(dw) == 17


def test_torchvision_model_by_name_with_other_in_channels() -> None:
    model = build_model(ModelSpec("tv:resnet18", 1, 5)).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_torchvision_weights_from_local_file(tmp_path) -> None:
    ref = build_model(ModelSpec("tv:resnet18", 3, 4))
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    model = build_model(ModelSpec("tv:resnet18", 3, 4, {"weights": str(tmp_path / "w.pt")}))
    assert torch.equal(model.fc.weight, ref.fc.weight)
    with pytest.raises(CheckpointError, match=r"do not fit tv:resnet18: .*fc.weight"):
        build_model(ModelSpec("tv:resnet18", 3, 9, {"weights": str(tmp_path / "w.pt")}))
    with pytest.raises(InvalidValueError, match="does not exist"):
        build_model(ModelSpec("tv:resnet18", 3, 4, {"weights": str(tmp_path / "missing.pt")}))


def test_user_factory_by_import_path() -> None:
    model = build_model(ModelSpec("automl_prune.models.zoo:fashion_cnn", 1, 3))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("resnet21", "Did you mean 'resnet20'"),
        ("tv:not_a_model", "unknown torchvision model"),
        ("nope.mod:f", "cannot import"),
    ],
)
def test_unknown_names_list_valid_ones(name: str, match: str) -> None:
    with pytest.raises(UnknownNameError, match=match):
        build_model(ModelSpec(name, 3, 10))
