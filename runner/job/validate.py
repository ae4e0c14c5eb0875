"""The validate job (docs/validation.md): does the sweep predict? For each budget, `validate.random_plans` random
plans that meet it and the plan methods' plans; for each plan its predicted drop from the plain and from the
recalibrated curves, its one-shot accuracy masked and after adaptive BN (the BatchNorm layers its masks reach
re-estimated on validate.bn_images calibration hold-out images, as the sweep's points are; both on the sweep's
eval images, which choose plans), and its accuracy after the plan section's fine-tuning (Ray Tune trials in
parallel, W&B runs of job type `validate`) on `plan.score_on`'s images. Outputs: validation.csv, plots/validation.png, the report's
validation section with each predictor's rank correlations over the random plans, and a W&B `validation` run.

Like `prune`, it trains and sweeps first what is missing. It resumes: a plan measured before
(validation/<plan>/measured.json) is not measured again, and one fine-tuned before (correct_finetuned.npy,
finetuned.json) is not fine-tuned again. validation/job.json records what the plans were made under (the prune
job's identity and the validate section); a grid that changes it is refused, one that only adds budgets,
methods or random plans is not, so nothing measured under other settings is read as this grid's.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runner.config import Budget
from runner.engine.evaluate import Evaluation
from runner.engine.measure import EvalSet
from runner.errors import InputError
from runner.inputs import checkpoints
from runner.inputs.models import spec_of
from runner.inputs.train import recipe_of
from runner.job.folder import folder_lock
from runner.job.plan import BUDGET_KINDS, METHODS, _pruned_meta
from runner.job.prune import (_check_plannable, _sweep_missing, adds_plans, changed_grid, grid_changes, job_identity,
                              new_experiment, plan_methods_of)
from runner.job.setting import Setting, setting_of
from runner.job.sweep import Options, prepare
from runner.outputs import validation as out
from runner.outputs.plans import CORRECT, PRUNED, REMOVED
from runner.outputs.results import read_rows
from runner.outputs.tracking import RunSpec, Tracking, model_artifact
from runner.outputs.wandb_tracker import make_tracker
from runner.planning.export import pruned_meta, save_pruned
from runner.planning.removal import counts, masked, pruned_copy, removal_from
from runner.planning.scoring import accuracy_interval, difference, score
from runner.planning.units import unit_curves
from runner.planning.adaptive import score_recalibrated
from runner.planning.global_plan import quick_counter
from runner.planning.validation import draw_ratios, predicted_drop, random_plan
from runner.storage import write_text

log = logging.getLogger(__name__)

MEASURED, FINETUNED, JOB = "measured.json", "finetuned.json", "job.json"


@dataclass
class ValidateOutcome:
    folder: Path
    rows: list[dict[str, Any]]
    correlations: list[dict[str, Any]]
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # stage -> CPU seconds


def _check(grid: Any, calibration: int | None = None) -> None:
    v = grid.validate
    if calibration is not None and v.bn_images > calibration:
        raise InputError("validate.bn_images", v.bn_images, f"more than the {calibration:,} calibration hold-out "
                         "images", f"at most data.calibration_size ({calibration:,})",
                         "lower validate.bn_images or raise data.calibration_size")
    if not grid.plan.finetune.epochs:
        raise InputError("plan.finetune.epochs", 0, "validation compares predictions with accuracy after "
                         "fine-tuning", "at least 1", "set plan.finetune.epochs (e.g. 1)")


def identity_of(grid: Any, sha256: str) -> dict[str, Any]:
    """What the plans in validation/ were made under: the prune job's identity and the validate section."""
    return {**job_identity(grid, sha256), "validate": grid.as_dict()["validate"]}


def check_same(grid: Any, root: Path, now: dict[str, Any], warn: bool = True) -> None:
    """Refuses a grid that changes what the plans measured in `root` mean (one line, naming the first key that
    changed and both values); one that only adds budgets, methods or random plans is fine. A folder without
    job.json (validated before it was kept) is taken as made under this grid."""
    before = _read_json(root / JOB)
    if before is None:
        if warn and root.is_dir() and any(root.glob(f"*/{MEASURED}")):
            log.warning("%s has plans measured before %s was kept: taking them as made under this grid", root, JOB)
        return

    def allowed(key: str, old: Any, new: Any) -> bool:
        if key == "validate.random_plans":
            return isinstance(old, int) and isinstance(new, int) and new >= old
        return adds_plans(key, old, new)

    _, fixed = grid_changes(before, now, allowed)
    if fixed:
        raise changed_grid("--grid", grid.folder, "validation", fixed, "the same grid, or one that only adds "
                           "budgets, methods or random plans", "restore it, or validate under another name or --output")


def _check_folder(grid: Any) -> None:
    """`check_same` before anything is trained, swept or written, where the checkpoint exists already."""
    loaded = checkpoints.existing(grid)
    if loaded is not None:
        check_same(grid, grid.folder / out.FOLDER, identity_of(grid, loaded.sha256))


def dry_run(opts: Options) -> list[str]:
    """What validate would run, computing nothing."""
    from runner.job.sweep import dry_run as sweep_dry_run

    grid, _ = prepare(opts)
    _check(grid, grid.data.calibration_size)
    _check_folder(grid)
    criterion = _check_plannable(grid)
    methods, skipped = plan_methods_of(grid, criterion)
    v, p = grid.validate, grid.plan
    per_budget = v.random_plans + len(methods)
    return sweep_dry_run(opts, folder=False) + [f"skipped: {m}: {why}" for m, why in skipped.items()] + [
        f"validate: per budget ({', '.join(b.label for b in p.budgets)}) {v.random_plans} random plans (seed "
        f"{v.seed}) + the plans of {', '.join(methods)} = {per_budget * len(p.budgets)} plans, criterion "
        f"{criterion}, unit {grid.sweep.unit}",
        f"each: predicted drop (plain and recalibrated curves), one-shot accuracy masked and after adaptive BN on "
        f"{v.bn_images} calibration images, then fine-tuned {p.finetune.epochs} epochs (lr {p.finetune.lr:g}) as "
        f"Ray Tune trials, scored on {p.score_on}",
        f"writes {grid.folder / out.CSV}, {grid.folder / out.FIGURE}, the report's validation section"]


def run_validate(opts: Options) -> ValidateOutcome:
    """The job, start to end (module docstring)."""
    started, cpu0 = time.time(), time.process_time()
    grid, trials = prepare(opts)
    _check(grid, grid.data.calibration_size)
    _check_folder(grid)
    criterion = _check_plannable(grid)
    methods, skipped = plan_methods_of(grid, criterion)
    swept = time.time()
    _sweep_missing(opts, grid, trials)
    wall = {"sweep of missing points": time.time() - swept}
    s = replace(setting_of(grid, trials, criterion), methods=tuple(methods), skipped=skipped)
    plain, recal = _curves_of(s)
    cpu: dict[str, float] = {"setup and sweep (driver)": time.process_time() - cpu0}
    mean, std = s.loaded.normalisation
    calibration = EvalSet.build(s.data.calibration.take(slice(0, grid.validate.bn_images)), mean, std,
                                grid.model.num_classes, s.images.evalset.inputs[0].device, grid.sweep.batch_size)
    root = grid.folder / out.FOLDER
    rows: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    with folder_lock(grid.folder):
        now = identity_of(grid, s.loaded.sha256)
        check_same(grid, root, now, warn=False)  # again under the lock; _check_folder has warned
        root.mkdir(parents=True, exist_ok=True)
        write_text(root / JOB, json.dumps(now, indent=1, sort_keys=True))
        t, w = time.process_time(), time.time()
        for b, budget in enumerate(grid.plan.budgets):
            count = BUDGET_KINDS[budget.kind].count(s)
            quick = quick_counter(s.base, s.units.orders, budget.kind, s.image_size)
            for name, method, make in _plans(s, b, budget, count, quick):
                folder = root / name
                row = _read_json(folder / MEASURED)
                if row is None:
                    made = make()
                    if made is None:
                        failed.append(name)
                        continue
                    row = _measure(s, name, budget, method, made, (plain, recal), calibration, folder)
                rows[name] = row
        cpu["plans and one-shot measurements"] = time.process_time() - t
        wall["plans and one-shot measurements"] = time.time() - w
        for row in rows.values():
            row.update(accuracy_finetuned=float("nan"), accuracy_finetuned_low=float("nan"),
                       accuracy_finetuned_high=float("nan"))
        out.write_validation_csv(grid.folder, rows.values())  # the predictors, before the long part
        # the methods' plans first: their comparison is read even when the job is stopped before the end
        todo = {n: r for n, r in sorted(rows.items(), key=lambda nr: nr[1]["method"] == out.RANDOM)
                if not (Path(r["folder"]) / CORRECT.format("finetuned")).is_file()}
        t, w = time.process_time(), time.time()
        if todo:
            failed += _finetune(opts, s, todo)
        cpu["fine-tuning (driver)"] = time.process_time() - t
        wall["fine-tuning"] = time.time() - w
        cpu["fine-tuning (trials)"] = 0.0
        for row in rows.values():
            correct = Path(row["folder"]) / CORRECT.format("finetuned")
            if not correct.is_file():
                continue
            verdicts = np.load(correct)
            low, high = _wilson(verdicts)
            done = _read_json(Path(row["folder"]) / FINETUNED) or {}
            row.update(accuracy_finetuned=100 * float(verdicts.mean()), accuracy_finetuned_low=low,
                       accuracy_finetuned_high=high, finetune_cpu_seconds=done.get("cpu_seconds", float("nan")))
            cpu["fine-tuning (trials)"] += float(done.get("cpu_seconds") or 0.0)
        table = out.write_validation_csv(grid.folder, rows.values())
        corr = out.correlations(table, grid.validate.seed)
        versus = _versus(rows, methods)
        gain = out.bn_gain(read_rows(grid.folder / "results.csv"), s.criterion)
        out.write_validation_section(grid.folder, table, corr, versus, {**_words(s, cpu, wall), "bn_gain": gain})
        _record(s, table, corr, versus, cpu, gain)
    log.info("CPU seconds: %s; wall seconds: %s", ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()),
             ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    log.info("wrote %s, %s and the validation section of %s", grid.folder / out.CSV, grid.folder / out.FIGURE,
             grid.folder / "report.md")
    for c in corr:
        log.info("%s %s: Spearman %+.2f [%+.2f, %+.2f], Kendall %+.2f [%+.2f, %+.2f] over %d random plans",
                 c["budget"], c["predictor"], c["spearman"], c["spearman_low"], c["spearman_high"], c["kendall"],
                 c["kendall_low"], c["kendall_high"], c["plans"])
    return ValidateOutcome(grid.folder, list(rows.values()), corr, sorted(set(failed)), time.time() - started, cpu)


def _curves_of(s: Setting) -> tuple[list, list | None]:
    """The units' plain curves, and their recalibrated ones when the sweep measured them (sweep.bn_recalibration)."""
    rows = read_rows(s.grid.folder / "results.csv", skipped=True)
    plain = unit_curves(rows, s.units.channels, s.criterion, "plain")
    recal = unit_curves(rows, s.units.channels, s.criterion, "recalibrated") if s.grid.sweep.bn_recalibration \
        else None
    return plain, recal


def _plans(s: Setting, b: int, budget: Budget, count: Any, quick: Any) -> list[tuple[str, str, Any]]:
    """(name, method, make) per plan of the budget: `make()` returns (ks, removal) or None. Random plans are
    fitted with `quick` (quick_counts) and checked with `count`, which the methods use."""
    v, p = s.grid.validate, s.grid.plan
    target = getattr(s.base_counts, budget.kind) * budget.keep
    plans = []
    for i in range(v.random_plans):
        def make(i: int = i) -> tuple[dict[str, int], dict[str, list[int]]] | None:
            ratios = draw_ratios(v.seed, b, i, len(s.curves))
            ks = random_plan(s.curves, ratios, target, quick, p.round_to, p.min_keep)
            if ks is None:
                log.warning("%s: even every unit at its largest measured K misses the budget",
                            out_name(budget, i))
                return None
            if count(ks) != quick(ks):
                raise RuntimeError(f"{out_name(budget, i)}: quick_counts {quick(ks)} != counts {count(ks)}")
            return ks, removal_from(ks, s.units.orders)
        plans.append((out_name(budget, i), out.RANDOM, make))
    for method in s.methods:
        def make(method: str = method) -> tuple[dict[str, int], dict[str, list[int]]] | None:
            chosen = METHODS[method](s, budget, f"{budget.label}-{method}", count)
            if chosen is None:
                return None
            removal = chosen.removal_of(s)
            return ({u: len(idx) for u, idx in removal.items()} if method == "global" else chosen.corrected.plan.ks,
                    {u: list(idx) for u, idx in removal.items()})
        plans.append((f"{budget.label}-{method}", method, make))
    return plans


def out_name(budget: Budget, i: int) -> str:
    return out.random_name(budget.label, i)


def _wilson(correct: np.ndarray) -> tuple[float, float]:
    return accuracy_interval(Evaluation(100 * float(correct.mean()), 0.0, (), len(correct), correct))


def _measure(s: Setting, name: str, budget: Budget, method: str, made: tuple[dict[str, int], dict[str, list[int]]],
             curves: tuple[list, list | None], calibration: EvalSet, folder: Path) -> dict[str, Any]:
    """One plan's predictions and one-shot accuracies; its pruned model saved for fine-tuning."""
    ks, removal = made
    plain, recal = curves
    with masked(s.on_device, removal, s.image_size):
        masked_eval = score(s.on_device, s.images.evalset)
    pruned = pruned_copy(s.base, removal, s.image_size)
    kept = counts(pruned, s.image_size)
    recal_eval = score_recalibrated(s.on_device, removal, s.image_size, calibration, s.images.evalset)
    folder.mkdir(parents=True, exist_ok=True)
    save_pruned(folder / REMOVED, pruned, removal, _pruned_meta(s, name, float("nan")))
    m_low, m_high = accuracy_interval(masked_eval)
    r_low, r_high = accuracy_interval(recal_eval)
    row = {"plan": name, "budget": budget.label, "method": method,
           "macs_kept": kept.macs / s.base_counts.macs, "params_kept": kept.params / s.base_counts.params,
           "predicted_drop_plain": predicted_drop(ks, plain),
           "predicted_drop_recalibrated": predicted_drop(ks, recal) if recal is not None else float("nan"),
           "accuracy_masked": masked_eval.accuracy, "accuracy_masked_low": m_low, "accuracy_masked_high": m_high,
           "accuracy_recalibrated": recal_eval.accuracy, "accuracy_recalibrated_low": r_low,
           "accuracy_recalibrated_high": r_high, "baseline_accuracy": s.images.base_eval.accuracy,
           "units_pruned": sum(1 for k in ks.values() if k), "ks": json.dumps(ks, sort_keys=True),
           "folder": str(folder)}
    write_text(folder / MEASURED, json.dumps({**row, "removal": removal}, indent=1))
    log.info("%s: MACs kept %.3f; predicted drop %.1f (plain) / %.1f (recalibrated); one-shot %.1f%% masked, %.1f%% "
             "after adaptive BN", name, row["macs_kept"], row["predicted_drop_plain"],
             row["predicted_drop_recalibrated"], row["accuracy_masked"], row["accuracy_recalibrated"])
    return row


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    d = json.loads(path.read_text(encoding="utf-8"))
    d.pop("removal", None)
    return d


def _finetune(opts: Options, s: Setting, rows: Mapping[str, dict[str, Any]]) -> list[str]:
    """Fine-tune the plans as Ray Tune trials (W&B job type `validate`); writes each plan's finetuned.json."""
    from runner.job import cluster
    from runner.job.finetune import FinetuneShared, RunsContext, run_finetuning
    from runner.job.ray_env import cluster_address, set_ray_env
    from runner.job.tuner import trial_resources

    grid = s.grid
    mean, std = s.loaded.normalisation
    recipe = recipe_of(grid.plan.finetune)
    folders = {name: row["folder"] for name, row in rows.items()}
    shared = FinetuneShared(spec_of(grid.model), s.image_size, s.data.train, s.images.scored, tuple(mean), tuple(std),
                            recipe, grid.seed, grid.sweep.batch_size, folders)
    address = cluster_address(opts.address)
    set_ray_env(address)
    tracking = Tracking(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, grid.folder,
                        grid.as_dict(), False)
    parent = model_artifact(s.loaded.path, s.loaded.sha256)
    specs = {name: RunSpec(f"validate/{name}", "validate", {"plan": name, "recipe": recipe.model_dump(),
                                                             "macs_kept": row["macs_kept"],
                                                             "accuracy_masked": row["accuracy_masked"],
                                                             "accuracy_recalibrated": row["accuracy_recalibrated"]},
                           uses=parent) for name, row in rows.items()}
    log.info("fine-tuning %d plans for %d epochs (%s, lr %g) on %d train images", len(rows), recipe.epochs,
             recipe.optimizer, recipe.lr, len(s.data.train))
    context = RunsContext(tracking, specs, folders, recipe.epochs)
    with cluster.ray_session(address, grid.resources.ray_dashboard, grid.resources, len(rows)):
        failed = run_finetuning(shared, list(rows), trial_resources(grid), grid.resources.max_concurrent,
                                str(grid.tune_root), new_experiment(grid, "validate"), False, context)
    for name, folder in folders.items():
        correct = Path(folder) / CORRECT.format("finetuned")
        if name in failed or not correct.is_file():
            continue
        verdicts = np.load(correct)
        meta = pruned_meta(Path(folder) / PRUNED)
        write_text(Path(folder) / FINETUNED, json.dumps({
            "accuracy_finetuned": float(100 * verdicts.sum() / len(verdicts)), "scored_images": len(verdicts),
            "cpu_seconds": meta.get("finetune_cpu_seconds", float("nan"))}, indent=1))
    for name in failed:
        log.error("fine-tuning %s failed (Tune's error file is under %s)", name, grid.tune_root)
    return failed


def _versus(rows: Mapping[str, dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Each method's plan minus each later method's plan of the same budget, after fine-tuning, image by image
    on the scored images (paired 95% interval)."""
    pairs = []
    budgets = dict.fromkeys(r["budget"] for r in rows.values())
    for budget in budgets:
        for i, a in enumerate(methods):
            for other in methods[i + 1:]:
                ra, rb = rows.get(f"{budget}-{a}"), rows.get(f"{budget}-{other}")
                fa = Path(ra["folder"]) / CORRECT.format("finetuned") if ra else None
                fb = Path(rb["folder"]) / CORRECT.format("finetuned") if rb else None
                if fa is None or fb is None or not fa.is_file() or not fb.is_file():
                    continue
                d = difference(np.load(fb), np.load(fa))
                pairs.append({"plan": f"{budget}-{a}", "other": f"{budget}-{other}", "difference": d.drop,
                              "low": d.low, "high": d.high})
    return pairs


def _words(s: Setting, cpu: Mapping[str, float], wall: Mapping[str, float]) -> dict[str, Any]:
    recipe = recipe_of(s.grid.plan.finetune)
    return {"random_plans": s.grid.validate.random_plans, "criterion": s.criterion, "chosen_on": s.images.chosen_on,
            "scored_on": s.images.scored_on, "bn_images": s.grid.validate.bn_images,
            "finetune": f"{recipe.epochs} epochs, {recipe.optimizer}, lr {recipe.lr:g}, {recipe.schedule}",
            "cpu": dict(cpu), "wall": dict(wall)}


def _record(s: Setting, table: Any, corr: list[dict[str, Any]], versus: list[dict[str, Any]],
            cpu: Mapping[str, float], gain: Mapping[str, float] | None) -> None:
    """The W&B `validation` run (job type validate): the table, the figure, the correlations in its summary."""
    grid = s.grid
    tracking = Tracking(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, grid.folder,
                        grid.as_dict(), False)
    values: dict[str, Any] = out.summary_values(corr)
    values.update({f"{v['plan']}-minus-{v['other']}": v["difference"] for v in versus})
    values.update({f"cpu_seconds/{k}": round(v, 1) for k, v in cpu.items()})
    values.update({f"adaptive_bn/{k}": v for k, v in (gain or {}).items()})
    rows = [{k: (v if not isinstance(v, float) or v == v else None) for k, v in r.items()}
            for r in table.to_dict("records")]
    with closing(make_tracker(tracking)) as tracker:
        tracker.record(RunSpec("validation", "validate"), values, {"validation": grid.folder / out.FIGURE}, rows)
