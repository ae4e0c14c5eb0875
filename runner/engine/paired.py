"""The uncertainty of an accuracy drop measured on the same images as its baseline (docs/numbers.md#uncertainty).

Each eval image is a pair: right or wrong unpruned, right or wrong at K. The drop depends only on the images
that flipped, and the interval on it is Newcombe's hybrid score interval for the difference of paired
proportions (Newcombe 1998, Statistics in Medicine 17:2635-2650, method 10): Wilson score intervals for the two
accuracies, combined with the correlation of the pairs (phi, with Newcombe's correction). Closed form, no
iteration, and good coverage for small flip counts and accuracies near 100%. Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054


@dataclass(frozen=True)
class PairedTable:
    """The 2x2 table of one point: images right at baseline and at K (both), right then wrong (lost), wrong
    then right (gained), wrong at both."""

    both: int
    lost: int
    gained: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.lost + self.gained + self.neither

    @classmethod
    def from_counts(cls, n: int, baseline_right: int, lost: int, gained: int) -> "PairedTable":
        """From the eval set size, the images right at baseline and the two flip counts (what results.csv holds)."""
        both = baseline_right - lost
        table = cls(both, lost, gained, n - both - lost - gained)
        if min(both, table.neither, lost, gained) < 0:
            raise ValueError(f"inconsistent counts: n={n}, baseline right {baseline_right}, lost {lost}, "
                             f"gained {gained}")
        return table


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def newcombe_paired(t: PairedTable, z: float = Z95) -> tuple[float, float, float]:
    """(difference, lower, upper) for p1 - p2, p1 = (both + lost) / n, p2 = (both + gained) / n, as fractions."""
    n = t.n
    right1, right2 = t.both + t.lost, t.both + t.gained
    p1, p2 = right1 / n, right2 / n
    l1, u1 = wilson(right1, n, z)
    l2, u2 = wilson(right2, n, z)
    margins = right1 * (n - right1) * right2 * (n - right2)
    ad_bc = t.both * t.neither - t.lost * t.gained
    # Newcombe's correction: a positive ad - bc is reduced by n/2, and counts as no correlation below that
    corrected = ad_bc - n / 2 if ad_bc > n / 2 else (ad_bc if ad_bc < 0 else 0.0)
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return d, lower, upper


def drop_interval(n: int, baseline_right: int, lost: int, gained: int) -> tuple[float, float]:
    """95% interval on the accuracy drop, in percentage points."""
    _, lower, upper = newcombe_paired(PairedTable.from_counts(n, baseline_right, lost, gained))
    return 100 * lower, 100 * upper
