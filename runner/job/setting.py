"""What every plan of a prune job shares (docs/prune.md): the network, its units and curves, the images that
choose the plans and those that score them, and the base model's figures on both."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from model.checkpoint import Checkpoint
from runner.config import Grid
from runner.engine.device import pick_device, place
from runner.engine.evaluate import Evaluation
from runner.engine.images import Images
from runner.engine.measure import EvalSet
from runner.errors import InputError
from runner.inputs import checkpoints
from runner.inputs.data import Dataset, class_words, load_data, test_span, unseen
from runner.inputs.train import recipe_of
from runner.inputs.trials import IMAGE_SIZE, TrialPlan
from runner.outputs.rankings import NAME as RANKINGS, read_rankings
from runner.outputs.results import read_rows
from runner.planning.curves import Curve, check_round_to
from runner.planning.removal import Counts, counts
from runner.planning.scoring import score
from runner.planning.units import Units, plan_units, unit_curves

if TYPE_CHECKING:
    from runner.planning.target import OnTarget


@dataclass(frozen=True, kw_only=True)
class Scoring:
    """The images: those that choose and correct a plan, those its final figures come from, and the base
    model's figures on each."""

    evalset: EvalSet  # the sweep's eval images: they choose and correct the plan
    scoreset: EvalSet  # the images the final figures come from
    scored: Images
    scored_on: str  # words for the report
    chosen_on: str
    base_eval: Evaluation  # the base model on evalset
    base_score: Evaluation  # the base model on scoreset
    recalibration: EvalSet | None = None  # plan.curves: recalibrated: adaptive BN's images for the correction


@dataclass(frozen=True, kw_only=True)
class Setting:
    """What every plan of the job shares: the network, its units and curves, the images, the baselines."""

    grid: Grid
    loaded: Checkpoint
    data: Dataset  # the sweep's splits: train (fine-tuning), test (the sweep's eval images)
    criterion: str
    units: Units
    curves: list[Curve]
    image_size: int
    base: torch.nn.Module  # CPU, eval mode: what plans are removed from and counted on
    on_device: torch.nn.Module  # a copy on the device: what masked plans are scored on
    base_counts: Counts
    images: Scoring
    methods: tuple[str, ...] = ()  # plan.methods less those skipped
    skipped: Mapping[str, str] = field(default_factory=dict)  # plan methods skipped -> why (said in the report)
    # plan.target's latency table and timer (runner.planning.target), set up by the job; None without a target
    target: OnTarget | None = None

    def words(self) -> dict[str, Any]:
        """What the report says about the plans besides plans.csv (kept in the job record)."""
        return {"criterion": self.criterion, "unit": self.grid.sweep.unit, "chosen_on": self.images.chosen_on,
                "scored_on": self.images.scored_on, "left_out": dict(self.units.left_out),
                "units": len(self.units.channels), "skipped": dict(self.skipped),
                "finetune": recipe_of(self.grid.plan.finetune).model_dump() if self.grid.plan.finetune.epochs
                else None, "base_macs": self.base_counts.macs, "base_params": self.base_counts.params,
                "correction": self.grid.plan.correction}


def setting_of(grid: Grid, trials: TrialPlan, criterion: str) -> Setting:
    """The job's Setting, from the grid, the sweep's results and rankings, and the checkpoint."""
    loaded = checkpoints.load_for(grid)
    data = load_data(grid.data, grid.model.num_classes, grid.seed, scored=grid.plan.score_on == "test")
    image_size = grid.data.image_size or IMAGE_SIZE
    base = loaded.model.cpu().eval()
    units = plan_units(base, trials.units, grid.sweep.unit, criterion, read_rankings(grid.folder / RANKINGS),
                       image_size)
    if not units.channels:
        first = next(iter(units.left_out.items()))
        raise InputError("sweep.unit", grid.sweep.unit, f"no swept layer can be removed on its own ({first[0]}: "
                         f"{first[1]})", "unit: group, or layers whose channels are theirs alone",
                         "sweep with unit: group to plan every coupled group")
    # round_to auto keeps any K on the latency table's envelope: the bound is the one of round_to 1
    check_round_to(1 if grid.plan.round_to == "auto" else grid.plan.round_to, grid.plan.min_keep, units.channels)
    curves = unit_curves(read_rows(grid.folder / "results.csv", skipped=True), units.channels, criterion,
                         grid.plan.curves)
    on_device = place(copy.deepcopy(base), pick_device())
    return Setting(grid=grid, loaded=loaded, data=data, criterion=criterion, units=units, curves=curves,
                   image_size=image_size, base=base, on_device=on_device, base_counts=counts(base, image_size),
                   images=_scoring(grid, data, loaded, on_device))


def _scoring(grid: Grid, data: Dataset, loaded: Checkpoint, on_device: torch.nn.Module) -> Scoring:
    scored, scored_on = scoring_images(grid, data)
    device = next(on_device.parameters()).device
    mean, std = loaded.normalisation
    evalset = EvalSet.build(data.test, mean, std, grid.model.num_classes, device, grid.sweep.batch_size)
    scoreset = evalset if scored is data.test else EvalSet.build(scored, mean, std, grid.model.num_classes, device,
                                                                 grid.sweep.batch_size)
    base_eval = score(on_device, evalset)
    n = grid.sweep.bn_recalibration if grid.plan.curves == "recalibrated" else 0
    recalibration = EvalSet.build(data.calibration.take(slice(n)), mean, std, grid.model.num_classes, device,
                                  grid.sweep.batch_size) if n else None
    return Scoring(evalset=evalset, scoreset=scoreset, scored=scored, scored_on=scored_on,
                   chosen_on=chosen_on(data),
                   base_eval=base_eval, base_score=base_eval if scoreset is evalset else score(on_device, scoreset),
                   recalibration=recalibration)


def check_scoring(grid: Grid, total: int) -> None:
    """`plan.score_on: test` needs test images the sweep does not evaluate: `total` is the test split's size."""
    if grid.plan.score_on == "test" and (grid.data.eval_size is None or grid.data.eval_size >= total):
        raise InputError("plan.score_on", "test", f"the sweep evaluates all {total:,} test images, so none is "
                         "left unseen", "eval, or test with data.eval_size below the test split",
                         f"set data.eval_size (e.g. {total // 2}) before sweeping, or plan.score_on: eval")


def scoring_images(grid: Grid, data: Dataset) -> tuple[Images, str]:
    """The images the final figures come from, and their description."""
    n = len(data.test)
    if grid.plan.score_on == "eval":
        return data.test, (f"the same {n:,} eval images that chose the plan (its figures are flattered: set "
                           "plan.score_on: test with data.eval_size below the test split for unseen images)")
    rest, total = unseen(grid.data, grid.seed)
    check_scoring(grid, total)
    return rest, (f"{len(rest):,} test images the sweep never evaluated ({test_span(grid.data, n, total)}; "
                  f"{class_words(rest.labels)})")


def chosen_on(data: Dataset) -> str:
    """Words for the images that choose and correct the plans: the sweep's eval images."""
    return f"the sweep's {len(data.test):,} eval images ({data.eval_words()})"
