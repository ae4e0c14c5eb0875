"""One plan of the prune job (docs/prune.md), in steps: chosen by its method (and corrected on the eval
images), removed for real and scored, timed, saved. Its files are written whole, plan.json last: a plan whose
plan.json is there is made, and a resumed job never makes it again. Its plans.csv row is built from its files
alone (`row_of`), whichever run of the job made them.

Methods and budget kinds are registries: a new method is a `Choose` in METHODS, a new kind of budget a
`BudgetKind` in BUDGET_KINDS.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from runner.config import Budget
from runner.engine.device import place
from runner.engine.evaluate import Evaluation
from runner.inputs.models import spec_of
from runner.job.setting import Setting
from runner.outputs import plans as plan_files
from runner.outputs.plans import CORRECT, PRUNED, REMOVED, VERIFIED, finetuned, save_array
from runner.planning.adaptive import score_recalibrated
from runner.planning.correction import Corrected, Measured, Move, correct
from runner.planning.export import export_onnx, save_pruned, spec_meta
from runner.planning.global_plan import NEEDS_GRADIENTS, calibration_gradients, global_choice
from runner.planning.latency import latency
from runner.planning.record import plan_record
from runner.planning.removal import Counts, Removal, counter, counts, masked, pruned_copy, removal_from
from runner.planning.scoring import paired_drop, score
from runner.planning.solve import Plan, Planner
from runner.planning.target import OnTarget, Timed as TargetTimed, latency_columns

log = logging.getLogger(__name__)

Count = Callable[[Mapping[str, int]], float]  # a plan's Ks -> what its pruned model keeps of the budget's kind


@dataclass(frozen=True)
class BudgetKind:
    """A kind of budget: the base model's total, and how much of it a plan's pruned model keeps."""

    base: Callable[[Setting], float]
    count: Callable[[Setting], Count]


def _on_target(s: Setting) -> OnTarget:
    assert s.target is not None, "a latency budget needs plan.target (runner.config checks it)"
    return s.target


def _told(ks: Mapping[str, int], t: TargetTimed) -> None:
    log.info("latency budget: a plan pruning %d units timed %.2f ms [%.2f, %.2f], %.3f of the base's %.2f ms "
             "(at most %.3f)", sum(1 for k in ks.values() if k), t.ms, t.low, t.high, t.kept, t.base_ms, t.bound)


BUDGET_KINDS: dict[str, BudgetKind] = {
    **{kind: BudgetKind(base=lambda s, k=kind: getattr(s.base_counts, k),
                        count=lambda s, k=kind: counter(s.base, s.units.orders, k, s.image_size))
       for kind in ("macs", "params")},
    # the base's median time on plan.target, and a plan's pruned model timed there (docs/latency.md)
    "latency": BudgetKind(base=lambda s: _on_target(s).table.base_ms,
                          count=lambda s: _on_target(s).count(s.base, s.units.orders, s.image_size, _told))}


@dataclass(frozen=True)
class Chosen:
    """A method's plan: the first one, the one kept after correction (`corrected.plan`), and the channels it
    removes when they are not the units' ranked orders cut at its Ks (global's own importance)."""

    first: Plan
    corrected: Corrected
    removal: Removal | None = None

    def removal_of(self, s: Setting) -> Removal:
        return self.removal if self.removal is not None else removal_from(self.corrected.plan.ks, s.units.orders)


Choose = Callable[[Setting, Budget, str, Count], "Chosen | None"]  # (setting, budget, plan name, count)


def _from_curves(method: str, corrects: bool) -> Choose:
    """A method that plans from the sweep's curves (runner.planning.solve), its combined plan measured and,
    when `corrects`, corrected on the eval images. With a target, every budget plans with the latency table's
    curves (K only at the table's points); a latency budget's plan is the first whose measured time fits
    (`Timed.bound`), and it chooses only K on the table's lower envelope (a K slower than a smaller one costs time
    and accuracy)."""

    def choose(s: Setting, budget: Budget, name: str, count: Count) -> Chosen | None:
        p = s.grid.plan
        timed_budget = budget.kind == "latency"
        curves = s.curves if s.target is None else s.target.curves_for(budget.kind)
        planner = Planner(curves, budget.kind, budget.keep,
                          BUDGET_KINDS[budget.kind].base(s), method, 1 if p.round_to == "auto" else p.round_to,
                          p.min_keep, points_only=s.target is not None)
        plan = planner.fit(count, first=timed_budget)
        if plan is None:
            return None
        moves: list[Move] = []

        def moved(move: Move, now: Plan) -> None:
            moves.append(move)
            log.info("%s: correction %d of at most %d: %s K %d -> %d; predicted drop %.2f, measured %.2f "
                     "[%.2f, %.2f]", name, len(moves), p.max_corrections, move.unit, move.k_from, move.k_to,
                     now.predicted_drop, move.measured.drop, move.measured.low, move.measured.high)

        limit = p.max_corrections if corrects else 0
        measure = _measure(s)
        # a latency budget's moves re-plan on the table's prediction (timing every candidate would cost a
        # measurement each); the plan kept is then refitted on measured latency (runner.planning.target)
        corrected = correct(plan, (lambda caps: planner.plan(caps)) if timed_budget else
                            (lambda caps: planner.fit(count, caps)), measure, limit, moved,
                            search=p.correction == "search")
        if timed_budget and corrected.plan.ks != plan.ks:
            refit = planner.fit(count, corrected.plan.caps, first=True)
            if refit is None:
                log.warning("%s: the corrected plan cannot be refitted to the measured budget; keeping the first "
                            "plan", name)
                corrected = replace(corrected, plan=plan, measured=corrected.first)
            elif refit.ks != corrected.plan.ks:
                corrected = replace(corrected, plan=refit, measured=measure(refit))
        return Chosen(plan, corrected)

    return choose


def _global(s: Setting, budget: Budget, name: str, count: Count) -> Chosen | None:
    """Torch-Pruning's global pruner at the ratio that meets the budget (runner.planning.global_plan), its
    removal measured as a whole plan. For a latency budget the ratio is fitted on each pruned model's time on
    the target (`Timed.bound`, as the other methods), and the plan reads the latency table's curves."""
    gradients = calibration_gradients(s.data.calibration, *s.loaded.normalisation, s.grid.sweep.batch_size) \
        if s.criterion in NEEDS_GRADIENTS else None
    curves, amount = s.curves, None
    if budget.kind == "latency":
        on = _on_target(s)
        curves = on.curves

        def amount(model: torch.nn.Module) -> float:
            t = on.time(model)
            log.info("%s: a global pruning ratio timed %.2f ms [%.2f, %.2f], %.3f of the base's %.2f ms (at most "
                     "%.3f)", name, t.ms, t.low, t.high, t.kept, t.base_ms, t.bound)
            return t.bound * on.table.base_ms

    chosen = global_choice(s.base, s.criterion, budget.kind, budget.keep, s.image_size, curves,
                           list(s.units.channels), BUDGET_KINDS[budget.kind].base(s),
                           lambda removal: measure_removal(s, removal), gradients, amount)
    if chosen is None:
        return None
    plan, corrected, removal = chosen
    return Chosen(plan, corrected, removal)


def _measure(s: Setting) -> Callable[[Plan], Measured]:
    """A candidate plan's measured drop (`measure_removal` of its channels)."""
    return lambda candidate: measure_removal(s, removal_from(candidate.ks, s.units.orders))


def measure_removal(s: Setting, removal: Mapping[str, Any]) -> Measured:
    """A whole plan's drop on the images that choose plans, with all its masks at once (and adaptive BN when the
    plan reads recalibrated curves)."""
    if s.images.recalibration is not None:
        return paired_drop(s.images.base_eval, score_recalibrated(s.on_device, removal, s.image_size,
                                                                  s.images.recalibration, s.images.evalset))
    with masked(s.on_device, removal, s.image_size):
        return paired_drop(s.images.base_eval, score(s.on_device, s.images.evalset))


# uniform and global are never corrected: uniform takes one ratio whatever the curves say and global takes
# Torch-Pruning's own ranking; each is the baseline it stands for, and measured all the same
METHODS: dict[str, Choose] = {"knapsack": _from_curves("knapsack", True),
                              "threshold": _from_curves("threshold", True),
                              "uniform": _from_curves("uniform", False),
                              "global": _global}


@dataclass(frozen=True)
class Removed:
    """The plan as masks and as a physically smaller network, each scored on the scoring images."""

    removal: Removal
    model: torch.nn.Module  # CPU, eval mode
    counts: Counts
    masked: Evaluation
    removed: Evaluation

    @property
    def differ(self) -> int:
        return int(np.count_nonzero(self.masked.correct != self.removed.correct))


def remove(s: Setting, removal: Removal) -> Removed:
    with masked(s.on_device, removal, s.image_size):
        masked_eval = score(s.on_device, s.images.scoreset)
    pruned = pruned_copy(s.base, removal, s.image_size)
    removed_eval = score(place(copy.deepcopy(pruned), s.images.scoreset.inputs[0].device), s.images.scoreset)
    return Removed(removal, pruned, counts(pruned, s.image_size), masked_eval, removed_eval)


@dataclass(frozen=True)
class Timed:
    device: str
    batch: int
    base_ms: float
    pruned_ms: float
    runs: int


def timed(s: Setting, pruned: torch.nn.Module) -> list[Timed]:
    """Base vs pruned, batch 1 and 64, on the CPU and on the GPU when there is one (runner.planning.latency)."""
    shape = (3, s.image_size, s.image_size)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [Timed(device, t.batch, round(t.base_ms, 4), round(t.pruned_ms, 4), t.runs) for device in devices
            for t in latency(copy.deepcopy(s.base), copy.deepcopy(pruned), shape, (1, 64), device)]


def make_plan(s: Setting, budget: Budget, method: str, count: Count) -> dict[str, Any] | None:
    """One budget x method: chosen, removed, timed, saved. Returns its plan.json (None when the budget is out of
    reach)."""
    name = f"{budget.label}-{method}"
    chosen = METHODS[method](s, budget, name, count)
    if chosen is None:
        log.warning("%s: no plan keeps at most %s of the %s with the measured K (prune more: larger K in "
                    "sweep.k, or more units)", name, f"{budget.keep:g}", budget.kind)
        return None
    removed = remove(s, chosen.removal_of(s))
    if removed.differ:
        log.warning("%s: the pruned model and the masked plan disagree on %d images", name, removed.differ)
    # with a target, the plan is timed there instead (latency_ms ...); torch at batch 1 and 64 only without one
    on_target = on_target_columns(s, budget, chosen, removed) if s.target else None
    record = save(s, budget, name, chosen, removed, [] if s.target else timed(s, removed.model), on_target)
    c = chosen.corrected
    log.info("%s: MACs kept %.3f, params kept %.3f; predicted drop %.2f, measured %.2f [%.2f, %.2f] (first plan: "
             "%.2f predicted, %.2f measured; %d corrections); accuracy before fine-tuning %.2f%% (base %.2f%%)", name,
             record["macs_kept"], record["params_kept"], c.plan.predicted_drop, c.measured.drop, c.measured.low,
             c.measured.high, chosen.first.predicted_drop, c.first.drop, len(c.moves), removed.removed.accuracy,
             s.images.base_score.accuracy)
    return record


def on_target_columns(s: Setting, budget: Budget, chosen: Chosen, removed: Removed) -> dict[str, Any]:
    """The plan timed on plan.target against the base (for onnxruntime its pruned.onnx, which verification
    writes again after fine-tuning: the same graph with the final weights), with the table's prediction: the
    plans.csv columns target, latency_ms, latency_low, latency_high, latency_kept, latency_predicted_ms, ..."""
    on = s.target
    assert on is not None
    if on.target.runtime == "onnxruntime":
        folder = plan_files.plan_folder(s.grid.folder, budget.label, chosen.first.method)
        folder.mkdir(parents=True, exist_ok=True)
        mean, std = s.loaded.normalisation
        export_onnx(folder / "pruned.onnx", removed.model, mean, std, s.image_size)
        t = on.time(folder / "pruned.onnx")
    else:
        t = on.time(copy.deepcopy(removed.model))
    final = chosen.corrected.plan
    summed_macs = sum(o.macs for o in final.choice.values())
    overlap = (s.base_counts.macs - removed.counts.macs) / summed_macs if summed_macs else 1.0
    columns = latency_columns(on, t, final.ks, overlap)
    log.info("%s-%s on %s: %.2f ms [%.2f, %.2f], %.3f of the base's %.2f ms (table predicted %.2f ms)",
             budget.label, final.method, on.label, t.ms, t.low, t.high, t.kept, t.base_ms,
             columns["latency_predicted_ms"])
    return columns


def save(s: Setting, budget: Budget, name: str, chosen: Chosen, removed: Removed, times: list[Timed],
         on_target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan's files: removed.pt (and pruned.pt when there is no fine-tuning), the per-image verdicts, then
    plan.json (with the plan's figures on plan.target, when there is one); returns plan.json's content."""
    folder = plan_files.plan_folder(s.grid.folder, budget.label, chosen.first.method)
    folder.mkdir(parents=True, exist_ok=True)
    meta = _pruned_meta(s, name, removed.removed.accuracy)
    save_pruned(folder / REMOVED, removed.model, removed.removal, meta)
    if not s.grid.plan.finetune.epochs:
        save_pruned(folder / PRUNED, removed.model, removed.removal, meta)
    save_array(folder / CORRECT.format("masked"), removed.masked.correct)
    save_array(folder / CORRECT.format("removed"), removed.removed.correct)
    c = chosen.corrected
    record = plan_record(c.plan, budget.label, budget.keep, s.units.channels, removed.removal, removed.counts,
                         s.base_counts, c, s.units.left_out)
    record.update(first_plan={"ks": chosen.first.ks, "predicted_drop": chosen.first.predicted_drop},
                  criterion=s.criterion, chosen_on=s.images.chosen_on, scored_on=s.images.scored_on,
                  scored=_scored(s, removed), masked_vs_removed_differ=removed.differ,
                  latency=[vars(t) for t in times])
    if on_target is not None:
        record["target"] = on_target
    plan_files.write_plan_json(folder, record)
    return record


def _scored(s: Setting, removed: Removed) -> dict[str, Any]:
    base = s.images.base_score
    drop = paired_drop(base, removed.removed)
    return {"images": removed.removed.count, "classes": int(len(np.unique(s.images.scored.labels))),
            "baseline_accuracy": base.accuracy,
            "accuracy_masked": removed.masked.accuracy, "accuracy_removed": removed.removed.accuracy,
            "drop_removed": {"drop": drop.drop, "low": drop.low, "high": drop.high}}


def _pruned_meta(s: Setting, name: str, accuracy: float) -> dict[str, Any]:
    mean, std = s.loaded.normalisation
    return {**spec_meta(spec_of(s.grid.model), s.image_size), "mean": list(mean), "std": list(std),
            "plan": name, "criterion": s.criterion, "base_checkpoint": str(s.loaded.path),
            "base_checkpoint_sha256": s.loaded.sha256, "finetuned": False, "accuracy_removed": accuracy,
            "classes": list(s.loaded.meta.get("classes") or [])}


def row_of(folder: Path, finetune_epochs: int) -> dict[str, Any]:
    """The plan's plans.csv row, from its files: plan.json, the fine-tuned verdicts (when fine-tuned) and the
    verification's figures (when verified)."""
    record = plan_files.read_plan_json(folder)
    scored, m = record["scored"], record["measured"]
    nan = {"pruned_ms": float("nan"), "base_ms": float("nan")}  # timed on plan.target instead
    cpu = {1: nan, 64: nan, **{t["batch"]: t for t in record["latency"] if t["device"] == "cpu"}}
    row = {"budget": record["budget"], "method": record["method"], "macs_kept": record["macs_kept"],
           "params_kept": record["params_kept"], "latency_ms_b1": cpu[1]["pruned_ms"],
           "latency_ms_b64": cpu[64]["pruned_ms"], "predicted_drop": record["predicted_drop"],
           "accuracy_masked": scored["accuracy_masked"], "accuracy_removed": scored["accuracy_removed"],
           "accuracy_finetuned": float("nan"), "finetuned_low": float("nan"), "finetuned_high": float("nan"),
           "baseline_accuracy": scored["baseline_accuracy"], "measured_drop": m["drop"], "measured_low": m["low"],
           "measured_high": m["high"], "corrections": len(record["corrections"]), "accepted": record["accepted"],
           "measured_plans": record["measured_plans"], "base_latency_ms_b1": cpu[1]["base_ms"],
           "base_latency_ms_b64": cpu[64]["base_ms"], "macs": record["macs"], "params": record["params"],
           "units": len(record["units"]), "units_pruned": sum(1 for u in record["units"] if u["k"]),
           "criterion": record["criterion"], "scored_images": scored["images"], "scored_classes": scored["classes"],
           "finetune_epochs": finetune_epochs,
           "masked_vs_removed_differ": record["masked_vs_removed_differ"], "folder": str(folder),
           **(record.get("target") or {})}
    for t in record["latency"]:
        if t["device"] != "cpu":
            row[f"{t['device']}_latency_ms_b{t['batch']}"] = t["pruned_ms"]
            row[f"{t['device']}_base_latency_ms_b{t['batch']}"] = t["base_ms"]
    if finetuned(folder):
        correct = np.load(Path(folder) / CORRECT.format("finetuned"))
        row["accuracy_finetuned"] = float(100 * correct.sum() / len(correct))
    verified = Path(folder) / VERIFIED
    if verified.is_file():
        row.update(json.loads(verified.read_text(encoding="utf-8"))["figures"])
    return row
