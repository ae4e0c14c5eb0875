"""The order a split's subsets are taken in (`data.order`, docs/data.md), and the check that refuses a subset
taken in a file's own order when that order is by class.

`given` keeps the file's order. `stratified` interleaves the classes so that every prefix holds each class
within one image of its share of the split (`turns`); within a class, images come in a seeded shuffle. A split's
subsets are its first N images in that order.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from runner.errors import InputError

STREAMS = {"test": 1, "train": 2}  # each split shuffles its classes with a generator of its own


def turns(counts: np.ndarray) -> np.ndarray:
    """The class (an index into `counts`) that takes each position of the stratified order: Tijdeman's
    algorithm for the chairman assignment problem (Discrete Mathematics 32, 1980), whose every prefix of length
    m holds class c within 1 - 1/(2(K-1)) of m * n_c / N (K classes, N images).

    Position m goes to a class at least 1/(2(K-1)) of an image behind its share (eligible), the one with the
    earliest deadline, the position where it would fall 1 - 1/(2(K-1)) behind; ties to the lower class index.
    Both depend only on the images a class has placed: heaps of eligible and waiting classes, O(N log K)."""
    counts = [int(n) for n in counts]
    k, total = len(counts), sum(counts)
    if k < 2:
        return np.zeros(total, np.int64)
    placed, out = [0] * k, []

    def eligible_from(c: int) -> int:  # the first m with 2(K-1)(m n_c - N placed_c) >= N
        return -(-total * (1 + 2 * (k - 1) * placed[c]) // (2 * (k - 1) * counts[c]))

    def deadline(c: int) -> float:  # (placed_c + 1 - 1/(2(K-1))) N / n_c, in units of N / (2(K-1))
        return ((2 * k - 2) * placed[c] + 2 * k - 3) / counts[c]

    waiting = [(eligible_from(c), c) for c in range(k) if counts[c]]
    heapq.heapify(waiting)
    ready: list[tuple[float, int]] = []
    for m in range(1, total + 1):
        while waiting and waiting[0][0] <= m:
            c = heapq.heappop(waiting)[1]
            heapq.heappush(ready, (deadline(c), c))
        c = heapq.heappop(ready)[1]  # never empty: the theorem
        out.append(c)
        placed[c] += 1
        if placed[c] < counts[c]:
            heapq.heappush(waiting, (eligible_from(c), c))
    return np.array(out, np.int64)


def stratified(labels: np.ndarray, seed: int, split: str) -> np.ndarray:
    """Indices into `labels` in the stratified order (module docstring), drawn with `seed` for `split`."""
    rng = np.random.default_rng((seed, STREAMS[split]))
    counts = np.unique(labels, return_counts=True)[1]
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    shuffled = np.concatenate([members[rng.permutation(len(members))] for members in by_class])
    out = np.empty(len(labels), np.int64)
    out[np.argsort(turns(counts), kind="stable")] = shuffled  # class c's k-th turn takes its k-th image
    return out


def arranged(labels: np.ndarray, order: str, seed: int, split: str) -> np.ndarray:
    """Indices into `labels` in `order` (given | stratified)."""
    return np.arange(len(labels)) if order == "given" else stratified(labels, seed, split)


def grouped(labels: np.ndarray, classes: int) -> bool:
    """Labels that come grouped by class (a file sorted or blocked by class, never a shuffled one): fewer label
    changes along them than the split has classes, or than half their length for a subset shorter than that."""
    changes = int(np.count_nonzero(labels[1:] != labels[:-1]))
    return classes >= 2 and changes < min(classes, (len(labels) - 1) // 2)


@dataclass(frozen=True)
class Subset:
    """A subset taken in the file's order: the key that draws it, the key's value, and the images in words."""

    field: str
    value: object
    words: str  # e.g. "the first 200 test images"
    labels: np.ndarray
    split_labels: np.ndarray  # its whole split's

    def check(self, fix: str) -> None:
        classes = len(np.unique(self.split_labels))
        if grouped(self.labels, classes):
            held = len(np.unique(self.labels))
            raise InputError(self.field, self.value, f"with data.order: given, {self.words} come in class order "
                             f"and hold {held} of {classes} classes",
                             "a subset that is not in class order, taken from a shuffled file or in data.order: "
                             "stratified", fix)
