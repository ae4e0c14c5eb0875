"""The paired interval on an accuracy drop (runner.engine.paired): a published reference value, a hand
computation from flip counts, and what its width is at 1,000 eval images."""

from __future__ import annotations

import pytest
from e2e_helpers import paired_interval_by_hand

from runner.engine.paired import PairedTable, drop_interval, newcombe_paired, wilson


def test_newcombe_paired_matches_the_published_example():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), chapter 8: complete
    # response before and after consolidation therapy (Cavo et al. 2012), table [[59, 6], [16, 80]]:
    # Newcombe square-and-add estimate -0.0621 (95% CI -0.1186 to -0.0046)
    d, low, high = newcombe_paired(PairedTable(both=59, lost=6, gained=16, neither=80))
    assert (round(d, 4), round(low, 4), round(high, 4)) == (-0.0621, -0.1186, -0.0046)


def test_wilson_interval():
    # centre (961 + z^2/2) / (1000 + z^2) = 962.9207 / 1003.8415 = 0.959236; half-width
    # z * sqrt(961 * 39 / 1000 + z^2 / 4) / 1003.8415 = 1.96 * 6.19995 / 1003.8415 = 0.012105
    low, high = wilson(961, 1000)
    assert (round(low, 5), round(high, 5)) == (0.94713, 0.97134)


@pytest.mark.parametrize("n, right, lost, gained", [
    (1000, 961, 30, 2),  # a demo-sized point: 96.1% at baseline, 93.3% at K
    (1000, 961, 0, 0),  # nothing flipped
    (1000, 1000, 0, 0),  # 100% at baseline and at K: Newcombe's phi is 0 (an empty margin)
    (1000, 961, 961, 0),  # everything right at baseline lost
    (150, 120, 4, 9),  # a gain: a negative drop
    (200, 150, 3, 3),  # ad - bc positive but under n / 2: phi is 0
])
def test_drop_interval_equals_the_hand_computation(n, right, lost, gained):
    got = drop_interval(n, right, lost, gained)
    assert got == pytest.approx(paired_interval_by_hand(n, right, lost, gained), abs=1e-9)
    drop = 100 * (lost - gained) / n
    assert got[0] <= drop <= got[1]


def test_what_the_interval_is_at_1000_images():
    # one point of a 1,000-image eval set (one image = 0.1 points): 96.1% at baseline, 30 images lost, 2 gained
    low, high = drop_interval(1000, 961, 30, 2)
    assert (round(low, 4), round(high, 4)) == (1.7248, 4.0408)  # drop 2.8 points
    # nothing flipped: still about +-0.4 points (four images' worth) at this accuracy
    low, high = drop_interval(1000, 961, 0, 0)
    assert (round(low, 4), round(high, 4)) == (-0.4034, 0.4034)


def test_inconsistent_counts_are_refused():
    with pytest.raises(ValueError, match="inconsistent counts"):
        drop_interval(100, 50, 60, 0)  # more images lost than were right
