"""Pruning semantics (DESIGN §6): channel masks and their weight-surgery equivalent.

`target: output` removes filter c of conv L and its BN channel: the channel is exactly zero after L's BN.
`target: input` zeroes input channel c of L (`conv.weight[:, c] = 0`, the seed's operation). Pruning is a
mask on activations applied inside a scope (`masked`) or at the cut (`model.split`); weights are never
edited per point. `surgery` is the weight-editing equivalent, kept to prove the two agree. What removing the
channels for real would save is `runner.engine.dead`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from model.layers import ConvInfo


def channels_of(conv: ConvInfo, target: str) -> int:
    """Size of the pruned dimension."""
    return conv.out_channels if target == "output" else conv.in_channels


def keep_mask(channels: int, pruned: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """1 for kept channels, 0 for pruned ones."""
    mask = torch.ones(channels, device=device)
    mask[list(pruned)] = 0
    return mask


@contextmanager
def masked(model: nn.Module, conv: ConvInfo, target: str, pruned: Sequence[int]) -> Iterator[None]:
    """Inside the block, every forward of `model` runs with the channels pruned (hooks removed on exit)."""
    modules = dict(model.named_modules())
    if target == "output":
        def after_bn(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            return out * keep_mask(out.shape[1], pruned, out.device).view(1, -1, 1, 1).to(out.dtype)
        handle = modules[conv.bn].register_forward_hook(after_bn)
    else:
        def before_conv(module: nn.Module, inputs: tuple) -> tuple:
            x = inputs[0]
            return (x * keep_mask(x.shape[1], pruned, x.device).view(1, -1, 1, 1).to(x.dtype),)
        handle = modules[conv.name].register_forward_pre_hook(before_conv)
    try:
        yield
    finally:
        handle.remove()


def zero_weights(model: nn.Module, conv: ConvInfo, target: str, pruned: Sequence[int]) -> None:
    """Edit weights in place so that the channels are removed (the weight-surgery form of the mask)."""
    modules = dict(model.named_modules())
    idx = torch.as_tensor(list(pruned), dtype=torch.long)
    with torch.no_grad():
        if target == "output":
            modules[conv.name].weight[idx] = 0
            modules[conv.bn].weight[idx] = 0
            modules[conv.bn].bias[idx] = 0
        else:
            modules[conv.name].weight[:, idx] = 0


def surgery(model: nn.Module, conv: ConvInfo, target: str, pruned: Sequence[int]) -> nn.Module:
    """A copy of `model` with the channels removed by editing weights."""
    edited = copy.deepcopy(model)
    zero_weights(edited, conv, target, pruned)
    return edited
