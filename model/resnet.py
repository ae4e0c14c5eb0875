"""The seed's CIFAR ResNet-18, with a width multiplier, written as a sequence of units.

A unit is a few parallel paths of modules whose outputs are summed and then activated: the stem is one path
(conv-BN-ReLU, no activation after it), a BasicBlock is a main path (conv-BN-ReLU-conv-BN) and a shortcut
path (empty = identity, or 1x1 conv + BN) summed and then ReLU'd. Writing the network this way lets the
cut at any conv be written by hand (tests/hand_split.py, the reference for `model.cut.Cut`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("resnet18",)
STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = (2, 2, 2, 2)

Op = Callable[[Tensor], Tensor]


def scaled(channels: int, width: float) -> int:
    """Channel count of a stage at a width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def conv_bn(cin: int, cout: int, kernel: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (identity, or 1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = conv_bn(cout, cout, 3, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            conv, bn = conv_bn(cin, cout, 1, stride)
            self.shortcut = nn.Sequential(OrderedDict(conv=conv, bn=bn))

    def paths(self) -> list[list[Op]]:
        return [[self.conv1, self.bn1, F.relu, self.conv2, self.bn2], list(self.shortcut)]

    @staticmethod
    def merge(outputs: Sequence[Tensor]) -> Tensor:
        return (outputs[0] + outputs[1]).relu_()  # in place on the fresh sum: one allocation fewer

    def forward(self, x: Tensor) -> Tensor:
        return self.merge([run(path, x) for path in self.paths()])


@dataclass(frozen=True)
class Unit:
    """One stage of the forward pass: parallel paths, then a merge. `whole` runs it in one call (the block
    module itself, so that hooks on it fire)."""

    name: str
    paths: list[list[Op]]
    merge: Callable[[Sequence[Tensor]], Tensor]
    whole: Callable[[Tensor], Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        return self.whole(x)


def run(ops: Sequence[Op], x: Tensor) -> Tensor:
    for op in ops:
        x = op(x)
    return x


def _single(outputs: Sequence[Tensor]) -> Tensor:
    return outputs[0]


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool, 4x4 average pool) with every channel count times `width`."""

    def __init__(self, width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        self.width = width
        self.num_classes = num_classes
        widths = [scaled(c, width) for c in STAGE_CHANNELS]
        self.conv1, self.bn1 = conv_bn(3, widths[0], 3, 1)
        cin = widths[0]
        for i, (cout, stride, blocks) in enumerate(zip(widths, STAGE_STRIDES, BLOCKS_PER_STAGE), start=1):
            strides = [stride] + [1] * (blocks - 1)
            stage = []
            for s in strides:
                stage.append(BasicBlock(cin, cout, s))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*stage))
        self.linear = nn.Linear(cin, num_classes)

    def units(self) -> list[Unit]:
        """The forward pass as units: the stem, then every block in order."""
        units = [Unit("stem", [[self.conv1, self.bn1, F.relu]], _single, self.stem)]
        for name, module in self.named_modules():
            if isinstance(module, BasicBlock):
                units.append(Unit(name, module.paths(), module.merge, module))
        return units

    def stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x: Tensor) -> Tensor:
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.head(x)


MODELS: dict[str, type[nn.Module]] = {"resnet18": ResNet18}


def build(arch: str, width: float, num_classes: int) -> ResNet18:
    """A freshly initialised network of a registered architecture."""
    if arch not in MODELS:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[arch](width=width, num_classes=num_classes)
