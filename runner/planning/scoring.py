"""Scoring a network on an eval set: the one evaluation function (`runner.engine.evaluate`), and the paired
drop against a baseline scored on the same images (`runner.engine.paired`)."""

from __future__ import annotations

import numpy as np
from torch import nn

from runner.engine.device import fast_math
from runner.engine.evaluate import Evaluation, evaluate
from runner.engine.measure import EvalSet
from runner.engine.paired import drop_interval
from runner.planning.correction import Measured


def score(model: nn.Module, evalset: EvalSet) -> Evaluation:
    """Accuracy, loss and which images were right, for `model` (eval mode, on the eval set's device)."""
    with fast_math(evalset.inputs[0].device):
        return evaluate(model.eval(), evalset.inputs, evalset.labels, evalset.num_classes).result()


def paired_drop(baseline: Evaluation, result: Evaluation) -> Measured:
    """The accuracy drop from `baseline` to `result` (points) with its paired 95% interval."""
    lost = int(np.count_nonzero(baseline.correct & ~result.correct))
    gained = int(np.count_nonzero(~baseline.correct & result.correct))
    low, high = drop_interval(result.count, int(np.count_nonzero(baseline.correct)), lost, gained)
    return Measured(baseline.accuracy - result.accuracy, low, high)


def accuracy_interval(result: Evaluation) -> tuple[float, float]:
    """Wilson's 95% interval on an accuracy, in percent."""
    from runner.engine.paired import wilson

    low, high = wilson(int(np.count_nonzero(result.correct)), result.count)
    return 100 * low, 100 * high


def difference(reference: np.ndarray, other: np.ndarray) -> Measured:
    """How much more accurate `other` is than `reference` on the same images (points; per-image verdicts in,
    paired 95% interval): positive when `other` is better."""
    n = len(reference)
    lost = int(np.count_nonzero(reference & ~other))
    gained = int(np.count_nonzero(~reference & other))
    low, high = drop_interval(n, int(np.count_nonzero(reference)), lost, gained)
    return Measured(100 * (gained - lost) / n, -high, -low)
