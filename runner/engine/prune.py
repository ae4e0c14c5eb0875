"""Pruning semantics (docs/numbers.md#criteria-and-targets): channel masks and their weight-surgery equivalent.

`target: output` removes filter c of conv L and its BN channel: the channel is exactly zero after L's BN.
`target: input` zeroes input channel c of L (`conv.weight[:, c] = 0`, the seed's operation). Pruning is a
mask on activations applied inside a scope (`masked`) or at the cut (`model.cut.Cut`); weights are never
edited per point. `surgery` is the weight-editing equivalent, kept to prove the two agree. What removing the
channels for real would save is `runner.engine.dead` for the project's ResNet-18, `savings` below elsewhere.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from model.capture import hooked
from model.convs import ConvSite
from model.groups import Group
from model.savings import Savings, conv_macs


def channels_of(conv: ConvSite | Group, target: str) -> int:
    """Size of the pruned dimension (a group's channels, for unit: group)."""
    if isinstance(conv, Group):
        return conv.channels
    return conv.out_channels if target == "output" else conv.in_channels


def keep_mask(channels: int, pruned: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """1 for kept channels, 0 for pruned ones."""
    mask = torch.ones(channels, device=device)
    mask[list(pruned)] = 0
    return mask


@contextmanager
def masked(model: nn.Module, conv: ConvSite, target: str, pruned: Sequence[int]) -> Iterator[None]:
    """Inside the block, every forward of `model` runs with the channels pruned (hooks removed on exit)."""
    modules = dict(model.named_modules())
    if target == "output":
        def after_bn(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            return out * keep_mask(out.shape[1], pruned, out.device).view(1, -1, 1, 1).to(out.dtype)
        hook = (modules[conv.bn or conv.name], after_bn, False)
    else:
        def before_conv(module: nn.Module, inputs: tuple) -> tuple:
            x = inputs[0]
            return (x * keep_mask(x.shape[1], pruned, x.device).view(1, -1, 1, 1).to(x.dtype),)
        hook = (modules[conv.name], before_conv, True)
    with hooked([hook]):
        yield


def zero_weights(model: nn.Module, conv: ConvSite, target: str, pruned: Sequence[int]) -> None:
    """Edit weights in place so that the channels are removed (the weight-surgery form of the mask)."""
    modules = dict(model.named_modules())
    idx = torch.as_tensor(list(pruned), dtype=torch.long)
    with torch.no_grad():
        if target == "output":
            modules[conv.name].weight[idx] = 0
            if modules[conv.name].bias is not None:
                modules[conv.name].bias[idx] = 0
            if conv.bn:
                modules[conv.bn].weight[idx] = 0
                modules[conv.bn].bias[idx] = 0
        else:
            modules[conv.name].weight[:, idx] = 0


def surgery(model: nn.Module, conv: ConvSite, target: str, pruned: Sequence[int]) -> nn.Module:
    """A copy of `model` with the channels removed by editing weights."""
    edited = copy.deepcopy(model)
    zero_weights(edited, conv, target, pruned)
    return edited


def savings(conv: ConvSite, target: str, k: int, convs: dict[str, ConvSite]) -> Savings:
    """What physically removing k channels would save: in L, and for output pruning, the matching input slice
    of the conv that alone reads L's output (`ConvSite.consumer`: a block's first conv -> its second). BN's
    gamma and beta count as parameters; grouped convs count their per-group weights."""
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    if target == "input":  # a weight slice of every output channel's group (depthwise: one filter each)
        per = conv.out_channels // conv.groups
        return Savings(params=k * per * kk, macs=conv_macs(k * per * kk, conv.out_hw))
    fan_in = conv.in_channels // conv.groups
    params = k * fan_in * kk + (2 * k if conv.bn else 0)
    macs = conv_macs(k * fan_in * kk, conv.out_hw)
    if conv.consumer:
        nxt = convs[conv.consumer]
        nk = nxt.kernel_size[0] * nxt.kernel_size[1]
        params += k * nxt.out_channels * nk
        macs += conv_macs(k * nxt.out_channels * nk, nxt.out_hw)
    return Savings(params, macs)
