"""The project's ResNet-18 convolutions, in forward order, with what pruning needs to know about each, read
from the modules by hand. `runner.engine.measure` and `runner.engine.dead` use it for the dead-channel savings
of our ResNet-18; tests/test_graph.py checks `model.convs`'s listing against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.capture import capture
from model.resnet import ResNet18

IMAGE_SIZE = 32


@dataclass(frozen=True)
class ConvInfo:
    """One conv: where it sits in the unit/path structure, its shape, and the BN that follows it."""

    name: str
    bn: str
    block: str  # unit name: "stem" or "layer2.1"
    role: str  # stem | conv1 | conv2 | shortcut
    unit: int  # index into model.units()
    path: int  # index into that unit's paths
    index: int  # position of the conv in that path
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    consumer: str | None  # the conv that reads only this conv's output (a block's conv1 -> its conv2)

    @property
    def shortcut(self) -> bool:
        return self.role == "shortcut"


def list_convs(model: ResNet18) -> list[ConvInfo]:
    """Every conv of the network in forward order (17 main-path convs and 3 shortcut convs for ResNet-18)."""
    names = {module: name for name, module in model.named_modules()}
    found: list[dict] = []
    for u, unit in enumerate(model.units()):
        for p, path in enumerate(unit.paths):
            for i, op in enumerate(path):
                if isinstance(op, nn.Conv2d):
                    found.append(dict(name=names[op], bn=names[path[i + 1]], block=unit.name, unit=u, path=p,
                                      index=i, conv=op))
    shapes = _shapes(model, [f["name"] for f in found])
    convs = []
    for f in found:
        conv: nn.Conv2d = f.pop("conv")
        role = "stem" if f["block"] == "stem" else ("shortcut" if f["path"] else f["name"].rsplit(".", 1)[1])
        consumer = f"{f['block']}.conv2" if role == "conv1" else None
        convs.append(ConvInfo(**f, role=role, in_channels=conv.in_channels, out_channels=conv.out_channels,
                              kernel_size=conv.kernel_size[0], stride=conv.stride[0], consumer=consumer,
                              in_hw=shapes[f["name"]][0], out_hw=shapes[f["name"]][1]))
    return convs


def _shapes(model: ResNet18, names: list[str]) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Input and output spatial sizes of the named convs, from one forward of zeros through a new copy on the CPU
    (a forward on meta tensors would import torch._dynamo, slow in every trial worker's first trial)."""
    probe = type(model)(width=model.width, num_classes=model.num_classes)  # never the caller's: it runs in eval mode
    x = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with capture(probe, names, "input") as ins, capture(probe, names, "output") as outs:
        probe.eval()(x)
    return {n: (tuple(ins[n].shape[-2:]), tuple(outs[n].shape[-2:])) for n in names}
