"""What physically removing pruned channels saves, read from the graph of dead channels (docs/numbers.md#savings).

A mask makes some channels exactly zero for every image. Forward, the zeros spread: ReLU keeps a zero a zero, a
residual sum is zero only where every addend is, a conv's output channel is zero only where all of its input
channels are (the convs have no bias), and BN turns a zero into its bias (so a BN output is zero only where the
mask zeroes it). Backward, a channel is needed only where a live consumer reads it and it is not zero: a conv
with no needed output needs none of its inputs, and a conv never needs an input channel that is zero (that
weight slice multiplies zeros). Whatever is not needed is dead and is credited as removed: the weights of each
conv outside (needed outputs x needed inputs), the BN channels of unneeded outputs, and the head's columns for
zero features. So the same physical cut is credited the same whichever way it was asked for (input-pruning a
block's conv2 frees exactly what output-pruning its conv1 frees), and only what is really dead is credited (a
residual-stream channel that a later block adds to stays alive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from model.layers import ConvInfo
from model.savings import Savings, conv_macs


@dataclass(frozen=True)
class Alive:
    """What still computes something once the channels are pruned: per conv, the output channels still needed
    (and their BN channels) and the input channels it still has to read; and the head's needed features."""

    outputs: dict[str, frozenset[int]]
    inputs: dict[str, frozenset[int]]
    features: frozenset[int]


@dataclass(frozen=True)
class _Unit:
    paths: list[list[ConvInfo]]  # a block has two paths; an empty path is the identity shortcut
    summed: bool  # a block sums its paths; the stem has one


def _units(convs: Sequence[ConvInfo]) -> list[_Unit]:
    found: dict[int, dict[int, list[ConvInfo]]] = {}
    for c in convs:
        found.setdefault(c.unit, {}).setdefault(c.path, []).append(c)
    units = []
    for u in sorted(found):
        paths = found[u]
        summed = paths[0][0].role != "stem"
        units.append(_Unit([sorted(paths.get(p, []), key=lambda c: c.index) for p in range(2 if summed else 1)],
                           summed))
    return units


def _all(n: int) -> frozenset[int]:
    return frozenset(range(n))


def alive(convs: Sequence[ConvInfo], conv: ConvInfo, target: str, pruned: Iterable[int]) -> Alive:
    """Propagate the mask's zeros forward, then what is needed backward from the head."""
    pruned = frozenset(pruned)
    nothing: frozenset[int] = frozenset()
    units = _units(convs)
    zero_in: dict[str, frozenset[int]] = {}  # per conv: zero channels of its input, as the conv reads it
    zero_bn: dict[str, frozenset[int]] = {}  # per conv: zero channels of its BN output
    zero_at: list[frozenset[int]] = []  # per unit: zero channels of its input
    x = nothing  # the image
    for unit in units:
        zero_at.append(x)
        outs = []
        for path in unit.paths:
            z = x
            for c in path:
                zero_in[c.name] = z | (pruned if c.name == conv.name and target == "input" else nothing)
                zero_bn[c.name] = pruned if c.name == conv.name and target == "output" else nothing
                z = zero_bn[c.name]  # the ReLU between a path's convs keeps zeros zero
            outs.append(z)
        x = frozenset.intersection(*outs)  # a sum is zero where every addend is (ReLU after it keeps it)
    features = _all(units[-1].paths[0][-1].out_channels) - x
    outputs: dict[str, frozenset[int]] = {}
    inputs: dict[str, frozenset[int]] = {}
    need = features
    for unit, zero in zip(reversed(units), reversed(zero_at)):
        need_x = nothing
        for path in unit.paths:
            n = need - (zero_bn[path[-1].name] if path else zero)  # adding a zero needs nothing
            for c in reversed(path):
                outputs[c.name] = n - zero_bn[c.name]
                inputs[c.name] = _all(c.in_channels) - zero_in[c.name] if outputs[c.name] else nothing
                n = inputs[c.name]
            need_x |= n
        need = need_x
    return Alive(outputs, inputs, features)


def savings(convs: Sequence[ConvInfo], conv: ConvInfo, target: str, pruned: Iterable[int],
            num_classes: int) -> Savings:
    """Parameters and MACs per image of everything the pruned channels leave dead: conv weights, BN's gamma and
    beta, the head's weights."""
    live = alive(convs, conv, target, pruned)
    params = macs = 0
    for c in convs:
        kk = c.kernel_size ** 2
        dead = (c.out_channels * c.in_channels - len(live.outputs[c.name]) * len(live.inputs[c.name])) * kk
        params += dead + 2 * (c.out_channels - len(live.outputs[c.name]))
        macs += conv_macs(dead, c.out_hw)
    head = (_units(convs)[-1].paths[0][-1].out_channels - len(live.features)) * num_classes
    return Savings(params + head, macs + head)
