"""Built-in model zoo: small CIFAR/Fashion-MNIST style networks.

Every factory takes ``in_channels`` and ``num_classes`` and works for 28x28 and 32x32
inputs (global average pooling makes the head independent of the input size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class FashionCNN(nn.Module):
    """Small VGG-style CNN for 28x28 grayscale images (about 94k parameters).

    Three 3x3 conv-BN-ReLU stages of 32, 64 and 128 channels with 2x2 max-pooling in
    between, global average pooling and a linear classifier.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += _conv_bn_relu(c_in, width)
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN projection where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): 3 stages of 16/32/64 channels, depth 6n+2."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride))
                c_in = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(torch.flatten(self.pool(out), 1))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    """CIFAR-style VGG-16 with BatchNorm; the last max-pool is replaced by global pooling."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn_relu(c_in, int(item))
                c_in = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; identity add when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


# (expansion, channels, repeats, stride); CIFAR variant: first stride-2 stages made stride 1.
_MBV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class CifarMobileNetV2(nn.Module):
    """CIFAR-style MobileNetV2 (Sandler et al. 2018) with stride-1 stem for small images."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        stem = int(32 * width_mult)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
        ]
        c_in = stem
        for expand, channels, repeats, stride in _MBV2_CFG:
            c_out = int(channels * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        last = 1280 if width_mult <= 1.0 else int(1280 * width_mult)
        layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def fashion_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Small VGG-style CNN (32/64/128 channels) for 28x28 images."""
    return FashionCNN(in_channels, num_classes)


def resnet20(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """CIFAR-style ResNet-20."""
    return CifarResNet(20, in_channels, num_classes)


def resnet56(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """CIFAR-style ResNet-56."""
    return CifarResNet(56, in_channels, num_classes)


def vgg16_bn(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """CIFAR-style VGG-16 with BatchNorm."""
    return CifarVGG(in_channels, num_classes)


def mobilenetv2(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """CIFAR-style MobileNetV2 (width 1.0)."""
    return CifarMobileNetV2(in_channels, num_classes)
