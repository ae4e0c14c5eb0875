"""A combined plan scored with adaptive BN (`runner.engine.adaptive_bn`): what the correction measures when the
plan was made from recalibrated curves (plan.curves: recalibrated), so that prediction and measurement mean the
same thing (docs/adaptive-bn.md).

The BatchNorm layers re-estimated are those whose input the plan's masks change: every BN downstream of a
zeroed conv or BN, except a BN whose only zeroed input is its own conv's removed channels (its kept channels see
what they saw before), as in the sweep, where the mask sits at that BN's output.
"""

from __future__ import annotations

import torch
from torch import nn

from model.convs import list_convs
from runner.engine.adaptive_bn import downstream_norms, estimate, using
from runner.engine.device import fast_math
from runner.engine.evaluate import Evaluation
from runner.engine.measure import EvalSet
from runner.planning.removal import Removal, masked, zeroed
from runner.planning.scoring import score


def reached_norms(model: nn.Module, removal: Removal, image_size: int) -> tuple[str, ...]:
    """The BatchNorm layers the plan's masks reach (module docstring)."""
    zero = zeroed(model, removal, image_size)
    own = {c.name for c in list_convs(model, image_size) if c.bn in zero}
    return downstream_norms(model, [name for name in zero if name not in own])


def score_recalibrated(model: nn.Module, removal: Removal, image_size: int, images: EvalSet, evalset: EvalSet
                       ) -> Evaluation:
    """`model` with the plan's masks and its reached BatchNorm layers re-estimated on `images` (in their
    batches), scored on `evalset`; the model is left as it was."""
    norms = reached_norms(model, removal, image_size)
    device = evalset.inputs[0].device

    def run() -> None:
        with torch.inference_mode(), fast_math(device):
            for x in images.inputs:
                model(x)

    with masked(model, removal, image_size):
        with using(model, estimate(model, norms, run)):
            return score(model, evalset)
