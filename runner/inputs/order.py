"""The order a split's subsets are taken in (`data.order`, docs/data.md), and the check that refuses a subset
taken in a file's own order when that order is by class.

`given` keeps the file's order. `stratified` interleaves the classes: position m (1, 2, ... N) goes to the class
furthest behind its share of the split (the largest m * n_c / N minus the images of class c already placed,
ties to the lower class index), so every prefix holds each class within one image of its share; within a
class, images come in a seeded shuffle. A split's subsets are its first N images in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runner.errors import InputError

STREAMS = {"test": 1, "train": 2}  # each split shuffles its classes with a generator of its own


def turns(counts: np.ndarray) -> np.ndarray:
    """The class (an index into `counts`) that takes each position of the stratified order."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    behind = np.zeros(len(counts), np.int64)  # m * n_c - N * placed_c: exact in integers
    out = np.empty(total, np.int64)
    for m in range(total):
        behind += counts
        c = int(behind.argmax())  # the first of equals: the lower class index
        out[m] = c
        behind[c] -= total
    return out


def stratified(labels: np.ndarray, seed: int, split: str) -> np.ndarray:
    """Indices into `labels` in the stratified order (module docstring), drawn with `seed` for `split`."""
    rng = np.random.default_rng((seed, STREAMS[split]))
    classes, counts = np.unique(labels, return_counts=True)
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
