"""The prune job (DESIGN §10): the sweep's curves -> a plan per budget x method -> the combined plan measured and
corrected -> channels removed for real -> counted, timed, saved -> fine-tuned as Ray Tune trials -> verified
(pruned.pt read back with our loader, pruned.onnx with onnxruntime alone) -> plans.csv and the report.

The sweep's results in the same output folder are the input; points the grid asks for and results.csv lacks
are measured first (the sweep, resumed). Which images do what: the plan is chosen and corrected on the sweep's
eval images; its final figures are scored on `plan.score_on` (the same images, flattered, or the test images
the sweep did not evaluate), and plan.json, plans.csv and the report say which.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from model.checkpoint import Checkpoint
from runner.config import Budget, Grid
from runner.engine.criteria import CRITERIA
from runner.engine.device import pick_device, place
from runner.engine.evaluate import Evaluation
from runner.engine.images import Images
from runner.engine.measure import EvalSet
from runner.errors import InputError
from runner.inputs import checkpoints
from runner.inputs.data import Dataset, load_data
from runner.inputs.models import spec_of
from runner.inputs.train import recipe_of
from runner.inputs.trials import IMAGE_SIZE, TrialPlan
from runner.job.folder import folder_lock, points_of
from runner.job.sweep import Options, prepare, run_sweep
from runner.outputs import plans as plan_files
from runner.outputs.rankings import NAME as RANKINGS, read_rankings
from runner.outputs.results import key_of, read_rows
from runner.outputs.tracking import RunSpec, Tracking, make_tracker, model_artifact
from runner.planning.correction import Corrected, Measured, Move, correct
from runner.planning.curves import Curve, check_round_to
from runner.planning.export import export_onnx, onnx_logits, open_pruned, save_pruned, spec_meta
from runner.planning.latency import latency
from runner.planning.target import OnTarget, Timed as TargetTimed, latency_columns, open_target, table_words
from runner.planning.timing import check_target
from runner.planning.record import plan_record
from runner.planning.removal import Counts, counter, counts, masked, pruned_copy, removal_from
from runner.planning.scoring import accuracy_interval, difference, paired_drop, score
from runner.planning.solve import Plan, Planner
from runner.planning.units import Units, plan_criterion, plan_units, unit_curves

log = logging.getLogger(__name__)

CORRECT = "correct_{}.npy"  # per scored image, right or wrong: masked, removed, finetuned (runner.job.finetune)


@dataclass
class PruneOutcome:
    folder: Path
    rows: list[dict[str, Any]]
    failed: list[str] = field(default_factory=list)  # plans that could not be made, fine-tuned or verified
    seconds: float = 0.0


@dataclass(frozen=True)
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
    evalset: EvalSet  # the sweep's eval images: they choose and correct the plan
    scoreset: EvalSet  # the images the final figures come from
    scored: Images
    scored_on: str  # words for the report
    chosen_on: str
    base_counts: Counts
    base_eval: Evaluation  # the base model on evalset
    base_score: Evaluation  # the base model on scoreset


def run_prune(opts: Options) -> PruneOutcome:
    """The job, start to end (module docstring)."""
    started = time.time()
    grid, trials = prepare(opts)
    criterion = _check_plannable(grid)
    _sweep_missing(opts, grid, trials)
    s = _setting(grid, trials, criterion)
    log.info("planning %d units (criterion %s) of %s; %d left out%s", len(s.units.channels), criterion,
             grid.model.arch, len(s.units.left_out), f": {', '.join(s.units.left_out)}" if s.units.left_out else "")
    rows: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    with folder_lock(grid.folder):
        on = _on_target(s, opts) if grid.plan.target else None
        for budget in grid.plan.budgets:
            if budget.kind == "latency":
                count = on.count(s.base, s.units.orders, s.image_size, _told(budget.label))
            else:
                count = counter(s.base, s.units.orders, budget.kind, s.image_size)
            for method in grid.plan.methods:
                name = f"{budget.label}-{method}"
                row = make_plan(s, budget, method, count, on)
                if row is None:
                    failed.append(name)
                else:
                    rows[name] = row
                    plan_files.write_plans_csv(grid.folder, rows.values())  # as plans are made
        if rows and grid.plan.finetune.epochs:
            failed += _finetune(opts, s, rows)
            plan_files.write_plans_csv(grid.folder, rows.values())
        for name, row in rows.items():
            failed += verify(s, name, row)
        _versus_uniform(rows, "finetuned" if grid.plan.finetune.epochs else "removed")
        table = plan_files.write_plans_csv(grid.folder, rows.values()) if rows else None
    if on is not None:
        on.close()
        from runner.outputs.latency import write_cost

        write_cost(grid.folder, table_words(on, time.time() - started))
    if table is not None:
        plan_files.write_plans_section(grid.folder, table, _words(s, on, time.time() - started))
        log.info("wrote %s, %s and %s", grid.folder / plan_files.CSV, grid.folder / plan_files.FOLDER,
                 grid.folder / "report.md")
    return PruneOutcome(grid.folder, list(rows.values()), sorted(set(failed)), time.time() - started)


def dry_run(opts: Options) -> list[str]:
    """The sweep's dry run, and what the prune job would make of it."""
    from runner.job.sweep import dry_run as sweep_dry_run

    grid, _ = prepare(opts)
    criterion = _check_plannable(grid)
    p = grid.plan
    ft = f"{p.finetune.epochs} epochs ({p.finetune.recipe} recipe, lr {p.finetune.lr:g})" if p.finetune.epochs \
        else "none"
    return sweep_dry_run(opts) + [
        f"plans: budgets {', '.join(b.label for b in p.budgets)} x methods {', '.join(p.methods)} "
        f"({len(p.budgets) * len(p.methods)} plans), criterion {criterion}, unit {grid.sweep.unit}",
        f"round_to {p.round_to}, min_keep {p.min_keep:g}, fine-tuning {ft}, scored on {p.score_on}"] + (
        [f"target {p.target.label}: a latency table of every unit x K, cached in {grid.folder / 'latency'}"]
        if p.target else [])


def score_file(opts: Options, path: str) -> str:
    """`prune-sweep score`: a pruned.pt read with our loader alone (or a pruned.onnx run with onnxruntime alone),
    scored on the images the grid's plan section scores plans on; returns the line to print."""
    grid, _ = prepare(opts)
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    scored, words = _scoring_images(grid, data)
    file = Path(path)
    if not file.is_file():
        raise InputError("--model", path, "no such file", "a pruned.pt or pruned.onnx written by prune-sweep prune",
                         "check the path (plans/<budget>-<method>/ in the output folder)")
    if file.suffix == ".onnx":
        images = scored.images.astype(np.float32).transpose(0, 3, 1, 2) / 255
        try:
            predicted = np.concatenate([onnx_logits(file, images[i:i + 1000]).argmax(1)
                                        for i in range(0, len(images), 1000)])
        except Exception as e:  # noqa: BLE001  onnxruntime's errors have no common type
            raise InputError("--model", path, f"onnxruntime cannot run it ({type(e).__name__})", "a pruned.onnx "
                             "written by prune-sweep prune", "export it again with prune-sweep prune") from None
        correct, how = predicted == scored.labels, "onnxruntime"
    else:
        opened = open_pruned(file)
        mean, std = opened.meta.get("mean"), opened.meta.get("std")
        device = pick_device()
        evalset = EvalSet.build(scored, mean, std, grid.model.num_classes, device, grid.sweep.batch_size)
        correct, how = score(place(opened.model, device), evalset).correct, "our loader"
    return (f"{path} ({how}): accuracy {100 * float(correct.mean()):.2f}% on {len(correct):,} images "
            f"({correct.sum():,} right): {words}")


def _check_plannable(grid: Grid) -> str:
    """What a plan needs of the sweep section: output channels pruned, a criterion that ranks them."""
    if grid.sweep.target != "output":
        raise InputError("sweep.target", grid.sweep.target, "a plan removes output channels for real",
                         "output", "sweep with target: output (the default) to plan from it")
    check_target(grid.plan.target)
    return plan_criterion(grid.plan.criterion, grid.sweep.criteria, {n: CRITERIA[n].draws for n in CRITERIA})


def _sweep_missing(opts: Options, grid: Grid, trials: TrialPlan) -> None:
    """Measure the points the grid asks for that results.csv lacks: the sweep, resumed in its folder (or run
    fresh when there is none)."""
    have = {key_of(r) for r in read_rows(grid.folder / "results.csv")}
    missing = len(points_of(trials) - have)
    if not missing and (grid.folder / RANKINGS).is_file():
        log.info("the sweep in %s has all %d points", grid.folder, trials.points)
        return
    resume = (grid.folder / "config.yaml").is_file()
    log.info("measuring %d missing points first (%s)", missing or trials.points,
             "the sweep, resumed" if resume else "a new sweep")
    outcome = run_sweep(replace(opts, grid=grid, resume=resume, dry_run=False, output=None))
    if outcome.failed or outcome.points < outcome.expected:
        raise RuntimeError(f"the sweep did not finish ({outcome.points}/{outcome.expected} points; failed trials: "
                           f"{', '.join(outcome.failed) or 'none'}): a plan needs every point")


def _setting(grid: Grid, trials: TrialPlan, criterion: str) -> Setting:
    loaded = checkpoints.load_for(grid)
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    scored, scored_on = _scoring_images(grid, data)
    image_size = grid.data.image_size or IMAGE_SIZE
    base = loaded.model.cpu().eval()
    units = plan_units(base, trials.units, grid.sweep.unit, criterion, read_rankings(grid.folder / RANKINGS),
                       image_size)
    if not units.channels:
        first = next(iter(units.left_out.items()))
        raise InputError("sweep.unit", grid.sweep.unit, f"no swept layer can be removed on its own ({first[0]}: "
                         f"{first[1]})", "unit: group, or layers whose channels are theirs alone",
                         "sweep with unit: group to plan every coupled group")
    check_round_to(grid.plan.round_to, grid.plan.min_keep, units.channels)
    curves = unit_curves(read_rows(grid.folder / "results.csv"), units.channels, criterion)
    device = pick_device()
    mean, std = loaded.normalisation
    evalset = EvalSet.build(data.test, mean, std, grid.model.num_classes, device, grid.sweep.batch_size)
    scoreset = evalset if scored is data.test else EvalSet.build(scored, mean, std, grid.model.num_classes, device,
                                                                 grid.sweep.batch_size)
    on_device = place(copy.deepcopy(base), device)
    base_eval = score(on_device, evalset)
    base_score = base_eval if scoreset is evalset else score(on_device, scoreset)
    chosen_on = f"the sweep's {len(data.test):,} eval images ({data.name} test images 1-{len(data.test):,})"
    return Setting(grid, loaded, data, criterion, units, curves, image_size, base, on_device, evalset, scoreset, scored,
                   scored_on, chosen_on, counts(base, image_size), base_eval, base_score)


def _scoring_images(grid: Grid, data: Dataset) -> tuple[Images, str]:
    """The images the final figures come from, and their description."""
    n = len(data.test)
    if grid.plan.score_on == "eval":
        return data.test, (f"the same {n:,} eval images that chose the plan (its figures are flattered: set "
                           "plan.score_on: test with data.eval_size below the test split for unseen images)")
    rest = load_data(grid.data.model_copy(update={"eval_size": None}), grid.model.num_classes, grid.seed).test
    if len(rest) <= n:
        raise InputError("plan.score_on", "test", f"the sweep evaluated all {len(rest):,} test images, so none is "
                         "left unseen", "eval, or test with data.eval_size below the test split",
                         f"set data.eval_size (e.g. {len(rest) // 2}) before sweeping, or plan.score_on: eval")
    return rest.take(slice(n, None)), (f"{len(rest) - n:,} test images the sweep never evaluated ({data.name} test "
                                       f"images {n + 1:,}-{len(rest):,})")


def make_plan(s: Setting, budget: Budget, method: str, count: Callable[[Mapping[str, int]], float],
              on: OnTarget | None = None) -> dict[str, Any] | None:
    """One budget x method: plan, correct, remove, count, time, save. Returns its plans.csv row (None when the
    budget is out of reach). With a target, every method plans with the latency table's curves."""
    name = f"{budget.label}-{method}"
    p = s.grid.plan
    timed_budget = budget.kind == "latency"
    base_total = on.table.base_ms if timed_budget else getattr(s.base_counts, budget.kind)
    planner = Planner(on.curves if on else s.curves, budget.kind, budget.keep, base_total, method,
                      1 if p.round_to == "auto" else p.round_to, p.min_keep, points_only=on is not None)
    plan = planner.fit(count, first=timed_budget)
    if plan is None:
        log.warning("%s: no plan keeps at most %s of the %s with the measured K (prune more: larger K in "
                    "sweep.k, or more units)", name, f"{budget.keep:g}", budget.kind)
        return None

    def measure(candidate: Plan) -> Measured:
        with masked(s.on_device, removal_from(candidate.ks, s.units.orders), s.image_size):
            return paired_drop(s.base_eval, score(s.on_device, s.evalset))

    moves: list[Move] = []

    def moved(move: Move, now: Plan) -> None:
        moves.append(move)
        log.info("%s: correction %d of at most %d: %s K %d -> %d; predicted drop %.2f, measured %.2f [%.2f, %.2f]",
                 name, len(moves), p.max_corrections, move.unit, move.k_from, move.k_to, now.predicted_drop,
                 move.measured.drop, move.measured.low, move.measured.high)

    # uniform takes one ratio whatever the curves say: there is no prediction to correct, and a corrected uniform
    # plan would no longer be the baseline it stands for; it is measured all the same
    limit = 0 if method == "uniform" else p.max_corrections
    # a latency budget's moves re-plan on the table's prediction (timing every candidate would cost a
    # measurement each); the plan kept is then refitted on measured latency (runner.planning.target)
    corrected = correct(plan, (lambda caps: planner.plan(caps)) if timed_budget else
                        (lambda caps: planner.fit(count, caps)), measure, limit, moved)
    if timed_budget and corrected.plan.ks != plan.ks:
        refit = planner.fit(count, corrected.plan.caps, first=True)
        if refit is None:
            log.warning("%s: the corrected plan cannot be refitted to the measured budget; keeping the first plan",
                        name)
            corrected = replace(corrected, plan=plan, measured=corrected.first)
        elif refit.ks != corrected.plan.ks:
            corrected = replace(corrected, plan=refit, measured=measure(refit))
    final = corrected.plan
    removal = removal_from(final.ks, s.units.orders)
    with masked(s.on_device, removal, s.image_size):
        masked_eval = score(s.on_device, s.scoreset)
    pruned = pruned_copy(s.base, removal, s.image_size)
    pruned_counts = counts(pruned, s.image_size)
    removed_eval = score(place(copy.deepcopy(pruned), s.scoreset.inputs[0].device), s.scoreset)
    differ = int(np.count_nonzero(masked_eval.correct != removed_eval.correct))
    if differ:
        log.warning("%s: the pruned model and the masked plan disagree on %d images", name, differ)
    # with a target, the plan is timed there instead (latency_ms ...); torch at batch 1 and 64 only without one
    timed = [] if on else _latency(s, pruned)
    folder = plan_files.plan_folder(s.grid.folder, budget.label, method)
    folder.mkdir(parents=True, exist_ok=True)
    on_target = _time_on_target(s, on, pruned, folder) if on else None
    save_pruned(folder / "pruned.pt", pruned, removal, _pruned_meta(s, name, removed_eval.accuracy))
    np.save(folder / CORRECT.format("masked"), masked_eval.correct)
    np.save(folder / CORRECT.format("removed"), removed_eval.correct)
    record = plan_record(final, budget.label, budget.keep, s.units.channels, removal, pruned_counts, s.base_counts,
                         corrected, s.units.left_out)
    record.update(first_plan={"ks": plan.ks, "predicted_drop": plan.predicted_drop},
                  criterion=s.criterion, chosen_on=s.chosen_on, scored_on=s.scored_on,
                  scored=_scored(s, masked_eval, removed_eval), masked_vs_removed_differ=differ,
                  latency=[vars(t) for t in timed])
    plan_files.write_plan_json(folder, record)
    nan = Timed("cpu", 0, float("nan"), float("nan"), 0)
    by_batch = {1: nan, 64: nan, **{t.batch: t for t in timed if t.device == "cpu"}}
    row = {"budget": budget.label, "method": method, "macs_kept": record["macs_kept"],
           "params_kept": record["params_kept"], "latency_ms_b1": by_batch[1].pruned_ms,
           "latency_ms_b64": by_batch[64].pruned_ms, "predicted_drop": final.predicted_drop,
           "accuracy_masked": masked_eval.accuracy, "accuracy_removed": removed_eval.accuracy,
           "accuracy_finetuned": float("nan"), "finetuned_low": float("nan"), "finetuned_high": float("nan"),
           "baseline_accuracy": s.base_score.accuracy, **_measured_columns(corrected),
           "base_latency_ms_b1": by_batch[1].base_ms, "base_latency_ms_b64": by_batch[64].base_ms,
           "macs": pruned_counts.macs, "params": pruned_counts.params, "units": len(s.units.channels),
           "units_pruned": sum(1 for k in final.ks.values() if k), "criterion": s.criterion,
           "scored_images": removed_eval.count, "finetune_epochs": s.grid.plan.finetune.epochs,
           "masked_vs_removed_differ": differ, "folder": str(folder)}
    if on_target is not None:
        summed_macs = sum(o.macs for o in final.choice.values())
        overlap = (s.base_counts.macs - pruned_counts.macs) / summed_macs if summed_macs else 1.0
        columns = latency_columns(on, on_target, final.ks, overlap)
        row.update(columns)
        record["target"] = columns
        plan_files.write_plan_json(folder, record)
        log.info("%s on %s: %.2f ms [%.2f, %.2f], %.3f of the base's %.2f ms (table predicted %.2f ms)", name,
                 on.label, on_target.ms, on_target.low, on_target.high, on_target.kept, on_target.base_ms,
                 row["latency_predicted_ms"])
    for t in timed:
        if t.device != "cpu":
            row[f"{t.device}_latency_ms_b{t.batch}"] = t.pruned_ms
            row[f"{t.device}_base_latency_ms_b{t.batch}"] = t.base_ms
    log.info("%s: MACs kept %.3f, params kept %.3f; predicted drop %.2f, measured %.2f [%.2f, %.2f] (first plan: "
             "%.2f predicted, %.2f measured; %d corrections); accuracy before fine-tuning %.2f%% (base %.2f%%)", name,
             record["macs_kept"], record["params_kept"], final.predicted_drop, corrected.measured.drop,
             corrected.measured.low, corrected.measured.high, plan.predicted_drop, corrected.first.drop,
             len(corrected.moves), removed_eval.accuracy, s.base_score.accuracy)
    return row


def _measured_columns(c: Corrected) -> dict[str, Any]:
    return {"measured_drop": c.measured.drop, "measured_low": c.measured.low, "measured_high": c.measured.high,
            "corrections": len(c.moves), "accepted": c.accepted, "measured_plans": c.measured_plans}


def _scored(s: Setting, masked_eval: Evaluation, removed_eval: Evaluation) -> dict[str, Any]:
    drop = paired_drop(s.base_score, removed_eval)
    return {"images": removed_eval.count, "baseline_accuracy": s.base_score.accuracy,
            "accuracy_masked": masked_eval.accuracy, "accuracy_removed": removed_eval.accuracy,
            "drop_removed": {"drop": drop.drop, "low": drop.low, "high": drop.high}}


@dataclass(frozen=True)
class Timed:
    device: str
    batch: int
    base_ms: float
    pruned_ms: float
    runs: int


def _latency(s: Setting, pruned: torch.nn.Module) -> list[Timed]:
    """Base vs pruned, batch 1 and 64, on the CPU and on the GPU when there is one (runner.planning.latency)."""
    shape = (3, s.image_size, s.image_size)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        for t in latency(copy.deepcopy(s.base), copy.deepcopy(pruned), shape, (1, 64), device):
            out.append(Timed(device, t.batch, round(t.base_ms, 4), round(t.pruned_ms, 4), t.runs))
    return out


def _on_target(s: Setting, opts: Options) -> OnTarget:
    """The job's target: its latency table (cached entries reused) logged on disk and on W&B, and every latency
    budget checked against what the table says is reachable."""
    from runner.outputs.latency import log_table

    mean, std = s.loaded.normalisation
    on = open_target(s.grid, s.base, s.units.orders, s.curves, s.loaded.sha256, s.image_size,
                     lambda path, model: export_onnx(path, model, mean, std, s.image_size))
    log_table(s.grid, table_words(on))
    least = min((b.keep for b in s.grid.plan.budgets if b.kind == "latency"), default=None)
    if least is not None:  # the tightest latency budget; the fastest plan is timed only if the table allows it
        label = next(b.label for b in s.grid.plan.budgets if b.kind == "latency" and b.keep == least)
        on.check_budget(label, least, on.count(s.base, s.units.orders, s.image_size))
    return on


def _told(label: str) -> Callable[[Mapping[str, int], TargetTimed], None]:
    def told(ks: Mapping[str, int], t: TargetTimed) -> None:
        log.info("%s: a plan pruning %d units timed %.2f ms [%.2f, %.2f], %.3f of the base's %.2f ms", label,
                 sum(1 for k in ks.values() if k), t.ms, t.low, t.high, t.kept, t.base_ms)
    return told


def _time_on_target(s: Setting, on: OnTarget, pruned: torch.nn.Module, folder: Path) -> TargetTimed:
    """The plan on the target, against the base: for onnxruntime its pruned.onnx (verify writes it again after
    fine-tuning, the same graph with the final weights)."""
    if on.target.runtime == "onnxruntime":
        mean, std = s.loaded.normalisation
        export_onnx(folder / "pruned.onnx", pruned, mean, std, s.image_size)
        return on.time(folder / "pruned.onnx")
    return on.time(copy.deepcopy(pruned))


def _pruned_meta(s: Setting, name: str, accuracy: float) -> dict[str, Any]:
    mean, std = s.loaded.normalisation
    return {**spec_meta(spec_of(s.grid.model), s.image_size), "mean": list(mean), "std": list(std),
            "plan": name, "criterion": s.criterion, "base_checkpoint": str(s.loaded.path),
            "base_checkpoint_sha256": s.loaded.sha256, "finetuned": False, "accuracy_removed": accuracy,
            "classes": list(s.loaded.meta.get("classes") or [])}


def _finetune(opts: Options, s: Setting, rows: dict[str, dict[str, Any]]) -> list[str]:
    """Fine-tune every plan as a Ray Tune trial; fills each row's fine-tuned accuracy. Returns failed plans."""
    from runner.job import cluster
    from runner.job.finetune import FinetuneShared, run_finetuning
    from runner.job.ray_env import cluster_address, set_ray_env
    from runner.job.tuner import trial_resources

    grid, data = s.grid, s.data
    mean, std = s.loaded.normalisation
    recipe = recipe_of(grid.plan.finetune)
    folders = {name: row["folder"] for name, row in rows.items()}
    shared = FinetuneShared(spec_of(grid.model), s.image_size, data.train, s.scored, tuple(mean), tuple(std), recipe,
                            grid.seed, grid.sweep.batch_size, folders)
    address = cluster_address(opts.address)
    set_ray_env(address)
    tracking = Tracking(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, grid.folder,
                        grid.as_dict(), False)
    parent = model_artifact(s.loaded.path, s.loaded.sha256)
    specs = {name: RunSpec(f"plan/{name}", "finetune", {"plan": name, "recipe": recipe.model_dump(),
                                                         "macs_kept": row["macs_kept"],
                                                         "accuracy_removed": row["accuracy_removed"]},
                           uses=parent) for name, row in rows.items()}
    log.info("fine-tuning %d pruned models for %d epochs (%s, lr %g) on %d train images", len(rows),
             recipe.epochs, recipe.optimizer, recipe.lr, len(data.train))
    with closing(make_tracker(tracking)) as tracker, \
            cluster.ray_session(address, grid.resources.ray_dashboard, grid.resources, len(rows)):
        results, failed = run_finetuning(shared, trial_resources(grid), grid.resources.max_concurrent,
                                         str(grid.tune_root), _experiment(grid), tracker, specs)
    for name, row in rows.items():
        if name in results:
            row["accuracy_finetuned"] = results[name]["accuracy_finetuned"]
    for name in failed:
        log.error("fine-tuning %s failed (Tune's error file is under %s)", name, grid.tune_root)
    return failed


def _experiment(grid: Grid) -> str:
    n = 1
    while (grid.folder / ("finetune" if n == 1 else f"finetune-{n}")).exists():
        n += 1
    return "finetune" if n == 1 else f"finetune-{n}"


def verify(s: Setting, name: str, row: dict[str, Any]) -> list[str]:
    """The files as a user gets them: pruned.pt read back with our loader alone (`open_pruned`) and scored,
    then exported to pruned.onnx and run with onnxruntime alone; both must give the accuracy the row reports,
    image by image. Fills the row's final accuracy (fine-tuned when there was fine-tuning) and its interval."""
    folder = Path(row["folder"])
    final = "finetuned" if s.grid.plan.finetune.epochs else "removed"
    if final == "finetuned" and not np.isfinite(row["accuracy_finetuned"]):
        return [name]
    opened = open_pruned(folder / "pruned.pt")
    device = s.scoreset.inputs[0].device
    result = score(place(opened.model, device), s.scoreset)
    expected = np.load(folder / CORRECT.format(final))
    problems = []
    if not np.array_equal(result.correct, expected):
        differ = int(np.count_nonzero(result.correct != expected))
        problems.append(f"pruned.pt read back gives {result.accuracy:.2f}% ({differ} images differ from the {final} "
                        "model)")
    mean, std = s.loaded.normalisation
    export_onnx(folder / "pruned.onnx", opened.model.cpu(), mean, std, s.image_size)
    images = s.scored.images.astype(np.float32).transpose(0, 3, 1, 2) / 255
    predicted = np.concatenate([onnx_logits(folder / "pruned.onnx", images[i:i + 1000]).argmax(1)
                                for i in range(0, len(images), 1000)])
    onnx_correct = predicted == s.scored.labels
    torch_predicted = _predictions(opened.model, s.scoreset)
    onnx_differ = int(np.count_nonzero(predicted != torch_predicted))
    if onnx_differ:
        problems.append(f"pruned.onnx predicts {onnx_differ} images differently from torch")
    low, high = accuracy_interval(result)
    row.update(accuracy_final=result.accuracy, final_low=low, final_high=high,
               accuracy_onnx=100 * float(onnx_correct.mean()), onnx_differ=onnx_differ)
    if final == "finetuned":
        row.update(finetuned_low=low, finetuned_high=high)
        drop = paired_drop(s.base_score, result)
        row.update(finetuned_drop=drop.drop, finetuned_drop_low=drop.low, finetuned_drop_high=drop.high)
    for problem in problems:
        log.error("%s: %s", name, problem)
    return [name] if problems else []


def _versus_uniform(rows: dict[str, dict[str, Any]], final: str) -> None:
    """Each plan against the uniform plan of its budget, image by image on the scored images (paired 95%
    interval): the columns vs_uniform, vs_uniform_low, vs_uniform_high."""
    for name, row in rows.items():
        uniform = rows.get(f"{row['budget']}-uniform")
        if uniform is None or row["method"] == "uniform":
            continue
        try:
            ours = np.load(Path(row["folder"]) / CORRECT.format(final))
            theirs = np.load(Path(uniform["folder"]) / CORRECT.format(final))
        except OSError:  # a fine-tuning trial that failed wrote none
            continue
        d = difference(theirs, ours)
        row.update(vs_uniform=d.drop, vs_uniform_low=d.low, vs_uniform_high=d.high)


def _predictions(model: torch.nn.Module, evalset: EvalSet) -> np.ndarray:
    """Predictions of `model` (on the CPU, float32: what the ONNX file is compared with)."""
    model = model.cpu().float().eval()
    with torch.inference_mode():
        return torch.cat([model(x.float().cpu()).argmax(1) for x in evalset.inputs]).numpy()


def _words(s: Setting, on: OnTarget | None = None, seconds: float = 0.0) -> dict[str, Any]:
    """What the report says about the plans besides plans.csv."""
    return {**(table_words(on, seconds) if on else {}), "criterion": s.criterion, "unit": s.grid.sweep.unit, "chosen_on": s.chosen_on, "scored_on": s.scored_on,
            "left_out": dict(s.units.left_out), "units": len(s.units.channels),
            "finetune": recipe_of(s.grid.plan.finetune).model_dump() if s.grid.plan.finetune.epochs else None,
            "base_macs": s.base_counts.macs, "base_params": s.base_counts.params}
