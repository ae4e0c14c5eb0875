"""What removing channels saves, and how a conv's multiply-accumulates are counted: one record, one rule."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Savings:
    """Parameters and multiply-accumulates per image that physically removing channels saves."""

    params: int
    macs: int  # multiply-accumulates per image


def conv_macs(weights: int, out_hw: tuple[int, int]) -> int:
    """MACs per image of `weights` conv weights (or a slice of them): each is applied once per output position."""
    return weights * out_hw[0] * out_hw[1]
