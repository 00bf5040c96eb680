"""Model registry: the built-in zoo, torchvision models and user factories.

A model is named by a string:

- a zoo name (``fashion_cnn``, ``resnet20``, ``resnet56``, ``vgg16_bn``, ``mobilenetv2``);
- ``tv:NAME`` for any torchvision classification model (random init; weights only from a
  local file through ``weights=PATH``);
- ``package.module:factory`` for a user factory called as ``factory(in_channels=..., num_classes=...)``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from automl_prune._compat import import_torchvision
from automl_prune.errors import CheckpointError, InvalidValueError, UnknownNameError
from automl_prune.registry import Registry, import_object

logger = logging.getLogger(__name__)

MODELS: Registry[Any] = Registry("model")
for _name in ("fashion_cnn", "resnet20", "resnet56", "vgg16_bn", "mobilenetv2"):
    MODELS.register(_name, f"automl_prune.models.zoo:{_name}")
MODELS._entries["fashion_cnn"].description = "small VGG-style CNN, 32/64/128 channels (~95k params)"
MODELS._entries["resnet20"].description = "CIFAR-style ResNet-20, stages 16/32/64, 1x1 projection shortcuts"
MODELS._entries["resnet56"].description = "CIFAR-style ResNet-56, stages 16/32/64, 1x1 projection shortcuts"
MODELS._entries["vgg16_bn"].description = "CIFAR-style VGG-16 with BatchNorm"
MODELS._entries["mobilenetv2"].description = "CIFAR-style MobileNetV2: inverted residuals, depthwise convs"

TORCHVISION_PREFIX = "tv:"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a (dense) model.

    Attributes:
        name: Zoo name, ``tv:NAME`` or ``package.module:factory``.
        in_channels: Input channels.
        num_classes: Output classes.
        kwargs: Extra keyword arguments for the factory.
    """

    name: str
    in_channels: int = 3
    num_classes: int = 10
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON/checkpoint-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                str(data["name"]), int(data["in_channels"]), int(data["num_classes"]), dict(data.get("kwargs", {}))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model spec {data!r}: {exc}") from exc


def _torchvision_model(
    name: str, in_channels: int, num_classes: int, weights: str | None = None, **kwargs: Any
) -> nn.Module:
    tv = import_torchvision()
    available = sorted(tv.models.list_models(module=tv.models))
    if name not in available:
        raise UnknownNameError(f"unknown torchvision model 'tv:{name}'. Valid names: tv:" + ", tv:".join(available))
    model: nn.Module = tv.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if weights is not None:  # ImageNet-style weights fit the 3-channel model, before its first conv is swapped
        from automl_prune.weights import load_weights

        load_weights(model, weights, f"tv:{name}")
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d of ``model`` for one with ``in_channels`` inputs."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    1,
                    child.bias is not None,
                )
                setattr(parent, child_name, new)
                return
    raise InvalidValueError("model has no Conv2d whose input channels could be changed")


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the dense model ``spec`` describes.

    Raises:
        UnknownNameError: For an unknown zoo name, torchvision name or import path.
    """
    if spec.name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(
            spec.name[len(TORCHVISION_PREFIX) :], spec.in_channels, spec.num_classes, **spec.kwargs
        )
    if ":" in spec.name:
        factory = import_object(spec.name)
    else:
        if spec.name not in MODELS:
            raise UnknownNameError(
                MODELS.unknown_message(spec.name)
                + " Also accepted: 'tv:NAME' (torchvision) and 'package.module:factory'."
            )
        factory = MODELS.get(spec.name)
    if not callable(factory):
        raise UnknownNameError(f"'{spec.name}' is not a callable model factory")
    params = inspect.signature(factory).parameters
    kwargs = dict(spec.kwargs)
    if "in_channels" in params:
        kwargs["in_channels"] = spec.in_channels
    if "num_classes" in params:
        kwargs["num_classes"] = spec.num_classes
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownNameError(f"factory '{spec.name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def list_models() -> list[tuple[str, str]]:
    """(name, description) for every zoo model plus the two open-ended forms."""
    rows = [(n, MODELS.describe(n)) for n in MODELS.names()]
    rows.append(("tv:NAME", "any torchvision classification model, e.g. tv:resnet18 (random init)"))
    rows.append(("package.module:factory", "a user factory taking in_channels and num_classes"))
    return rows
