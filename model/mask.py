"""The channel mask, and where it is multiplied in: mask points.

A mask is a keep vector over a unit's channels (1 keep, 0 prune), multiplied into a conv's output or input
(`TARGETS`) or into the outputs of a group's members. `apply_mask` is the one expression that the eager hooks
(`masked_points`) and the cut's generated suffix (`model.cut`) share, so that their bits agree.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

TARGETS = ("output", "input")  # where a conv is masked: its output (every reader sees it) or its input


def apply_mask(x: Tensor, keep: Tensor) -> Tensor:
    """Multiply channel c of an N x C x H x W tensor by keep[c] (1 keep, 0 prune)."""
    return x * keep.view(1, -1, 1, 1).to(x.dtype)


@dataclass(frozen=True)
class MaskPoint:
    """Where a mask is multiplied in: the output of `module` (seen by every reader), or with `input=True` the
    input of `module` (seen by that module only). A unit's keep vector maps to this point's channels through
    `local`/`root`: channel local[j] here takes keep[root[j]]; the others stay 1. None = the identity."""

    module: str
    input: bool = False
    channels: int = 0  # size of the masked dimension here (needed only with local/root)
    local: tuple[int, ...] | None = None
    root: tuple[int, ...] | None = None


def local_keep(keep: Tensor, channels: int, local: tuple[int, ...] | None, root: tuple[int, ...] | None) -> Tensor:
    """The keep vector at a mask point, from the unit's keep vector (see MaskPoint)."""
    if local is None:
        return keep
    out = keep.new_ones(channels)
    out[torch.tensor(local, device=keep.device)] = keep[torch.tensor(root, device=keep.device)]
    return out


def point_keep(keep: Tensor, point: MaskPoint) -> Tensor:
    return local_keep(keep, point.channels, point.local, point.root)


@contextmanager
def masked_points(model: nn.Module, points: Sequence[MaskPoint], keep: Tensor | None) -> Iterator[None]:
    """Inside the block, every forward of `model` multiplies `keep` in at each point (hooks removed on exit)."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for point in points if keep is not None else ():
            k = point_keep(keep, point)
            if point.input:
                def pre(module: nn.Module, args: tuple, k: Tensor = k) -> tuple:
                    return (apply_mask(args[0], k.to(args[0].device)), *args[1:])
                handles.append(modules[point.module].register_forward_pre_hook(pre))
            else:
                def post(module: nn.Module, args: tuple, out: Tensor, k: Tensor = k) -> Tensor:
                    return apply_mask(out, k.to(out.device))
                handles.append(modules[point.module].register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()
