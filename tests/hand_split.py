"""Cut the network at one conv's mask point: compute what the mask cannot change once, then only the rest.

The mask point of conv L is its input (`target: input`) or the output of its BN (`target: output`). The
prefix runs every unit before L's unit, then L's unit up to the mask point on L's path and all the way on
the unit's other paths (the shortcut, or the main path when L is a shortcut conv): that tuple is the cache.
The suffix applies the mask, finishes L's unit and runs the rest of the network.

The runner cuts networks with `model.cut.Cut`; this hand-written cut for the project's ResNet-18 is the
independent reference that tests/test_graph.py and tests/test_engine.py check it against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from model.layers import ConvInfo
from model.resnet import ResNet18, run

TARGETS = ("output", "input")


@dataclass(frozen=True)
class Tail:
    """What the suffix returns for one batch."""

    logits: Tensor
    layer: Tensor  # the pruned layer's BN output, after pruning
    final: Tensor  # the last unit's output (the final stage's feature maps)


class Split:
    """The network cut at one conv's mask point."""

    def __init__(self, model: ResNet18, conv: ConvInfo, target: str) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.model, self.conv, self.target = model, conv, target
        units = model.units()
        self.before, self.unit, self.after = units[: conv.unit], units[conv.unit], units[conv.unit + 1:]
        self.cut = conv.index + (2 if target == "output" else 0)  # position in the path; 2 = after the BN

    def prefix(self, x: Tensor) -> tuple[Tensor, ...]:
        """(the tensor at the mask point, then the outputs of the unit's other paths)."""
        for unit in self.before:
            x = unit(x)
        paths = self.unit.paths
        at_cut = run(paths[self.conv.path][: self.cut], x)
        return (at_cut, *(run(p, x) for i, p in enumerate(paths) if i != self.conv.path))

    def suffix(self, cache: tuple[Tensor, ...], mask: Tensor | None) -> Tail:
        """Apply the channel mask (None = no pruning) and run everything after the mask point."""
        h = cache[0] if mask is None else cache[0] * mask.view(1, -1, 1, 1).to(cache[0].dtype)
        path = self.unit.paths[self.conv.path]
        rest = path[self.cut:]
        if self.target == "input":  # L's own conv + BN still run; their output is the layer's output
            h = run(rest[:2], h)
            rest = rest[2:]
        layer = h
        outputs = list(cache[1:])
        outputs.insert(self.conv.path, run(rest, h))
        x = self.unit.merge(outputs)
        for unit in self.after:
            x = unit(x)
        return Tail(logits=self.model.head(x), layer=layer, final=x)

