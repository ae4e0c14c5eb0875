"""The prune job (docs/prune.md): the sweep's curves -> a plan per budget x method -> the combined plan measured
and corrected -> channels removed for real -> counted, timed, saved -> fine-tuned as Ray Tune trials ->
verified (pruned.pt read back with our loader, pruned.onnx with onnxruntime alone) -> plans.csv and the report.

The sweep's results in the same output folder are the input; points the grid asks for and results.csv lacks
are measured first (the sweep, resumed). Which images do what: the plan is chosen and corrected on the sweep's
eval images; its final figures are scored on `plan.score_on` (the same images, flattered, or the test images
the sweep did not evaluate), and plan.json, plans.csv and the report say which.

Every stage leaves files that say it is done (plan.json, correct_finetuned.npy, verified.json), written whole;
`--resume` runs only what they do not cover, and plans.csv is rebuilt from them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from model import checkpoint as model_files
from model.groups import Group
from runner.config import Grid
from runner.engine.criteria import CRITERIA
from runner.engine.device import pick_device, place
from runner.engine.measure import EvalSet
from runner.errors import InputError, plural
from runner.inputs import checkpoints
from runner.inputs.data import Dataset, checked_shape, class_counts, load_data
from runner.inputs.models import spec_of
from runner.inputs.train import recipe_of
from runner.inputs.trials import IMAGE_SIZE, TrialPlan
from runner.job.folder import changed_keys, folder_lock, identity, points_of, resume_check
from runner.job.options import Options
from runner.job.plan import BUDGET_KINDS, make_plan, row_of
from runner.job.setting import Setting, check_scoring, chosen_on, scoring_images, setting_of
from runner.job.sweep import blamed, prepare, run_sweep
from runner.job.verification import problems_of, verify, versus_uniform
from runner.outputs import plans as plan_files
from runner.outputs.plans import finetuned, made, verified
from runner.outputs.rankings import NAME as RANKINGS
from runner.outputs.results import key_of, read_rows
from runner.outputs.tracking import RunSpec, Tracking, model_artifact
from runner.planning.curves import check_round_to
from runner.planning.export import export_onnx, onnx_predictions, open_pruned, pruned_meta
from runner.planning.global_plan import plan_methods
from runner.planning.scoring import score
from runner.planning.target import OnTarget, open_target, table_words
from runner.planning.timing import check_target
from runner.planning.units import plan_criterion

log = logging.getLogger(__name__)

ADDABLE = {"plan.budgets", "plan.methods"}  # plan keys a resumed job may change, to add plans


@dataclass
class PruneOutcome:
    folder: Path
    rows: list[dict[str, Any]]
    failed: list[str] = field(default_factory=list)  # plans that could not be made, fine-tuned or verified
    seconds: float = 0.0


def run_prune(opts: Options) -> PruneOutcome:
    """The job, start to end (module docstring): each stage for the plans that lack it."""
    started = time.time()
    grid, trials = prepare(opts)
    criterion = _check_plannable(grid)
    check_inputs(grid, trials, opts.resume)
    _sweep_missing(opts, grid, trials)
    methods, skipped = plan_methods_of(grid, criterion)
    s = replace(setting_of(grid, trials, criterion), methods=tuple(methods), skipped=skipped)
    log.info("planning %d units (criterion %s) of %s; %d left out%s", len(s.units.channels), criterion,
             grid.model.arch, len(s.units.left_out), f": {', '.join(s.units.left_out)}" if s.units.left_out else "")
    with folder_lock(grid.folder):
        check_plans(grid, opts.resume)  # again, now that no other job can be writing there
        job = _job(s, opts.resume)
        if grid.plan.target:  # before the job's record: an unreachable latency budget leaves none
            s = replace(s, target=_on_target(s))
        plan_files.write_job(grid.folder, job)
        try:
            names, failed = _plan_all(s)
            if names and grid.plan.finetune.epochs:
                failed += _finetune(opts, s, job, names)
            failed += _verify_all(s, names)
            rows = _rows(grid, names)
            table = plan_files.write_plans_csv(grid.folder, rows.values()) if rows else None
        finally:
            if s.target is not None:
                s.target.close()
        words = job["words"]
        if s.target is not None:
            from runner.outputs.latency import write_cost

            latency_words = table_words(s.target, time.time() - started)
            write_cost(grid.folder, latency_words)
            words = {**latency_words, **words}
            # kept in the job's record, so that a report written later (sweep --resume) has the latency section
            plan_files.write_job(grid.folder, {**job, "words": words})
    if table is not None:
        plan_files.write_plans_section(grid.folder, table, words)
        log.info("wrote %s, %s and %s", grid.folder / plan_files.CSV, grid.folder / plan_files.FOLDER,
                 grid.folder / "report.md")
    return PruneOutcome(grid.folder, list(rows.values()), sorted(set(failed)), time.time() - started)


def plan_names(grid: Grid, methods: Sequence[str] | None = None) -> dict[str, tuple[Any, str]]:
    """Every plan of the grid (of `methods`, default plan.methods): <budget>-<method> -> (budget, method),
    budgets first."""
    return {f"{b.label}-{m}": (b, m) for b in grid.plan.budgets for m in (grid.plan.methods if methods is None
                                                                          else methods)}


def _folder(grid: Grid, name: str) -> Path:
    budget, method = plan_names(grid)[name]
    return plan_files.plan_folder(grid.folder, budget.label, method)


def _plan_all(s: Setting) -> tuple[list[str], list[str]]:
    """Make every plan that is not made yet (plans.csv rewritten as they are made); returns the plans made (in
    this run or before) and those whose budget is out of reach."""
    grid = s.grid
    names, failed, counts = [], [], {}
    for name, (budget, method) in plan_names(grid, s.methods).items():
        if made(_folder(grid, name)):
            log.info("%s: made by an earlier run (%s)", name, _folder(grid, name) / plan_files.PLAN_JSON)
            names.append(name)
            continue
        if budget.label not in counts:
            counts[budget.label] = BUDGET_KINDS[budget.kind].count(s)
        if make_plan(s, budget, method, counts[budget.label]) is None:
            failed.append(name)
            continue
        names.append(name)
        plan_files.write_plans_csv(grid.folder, _rows(grid, names).values())
    return names, failed


def _rows(grid: Grid, names: list[str]) -> dict[str, dict[str, Any]]:
    rows = {name: row_of(_folder(grid, name), grid.plan.finetune.epochs) for name in names}
    versus_uniform(rows, "finetuned" if grid.plan.finetune.epochs else "removed")
    return rows


def _verify_all(s: Setting, names: list[str]) -> list[str]:
    """Verify the plans that have their final model and no verification yet; returns the plans that failed a
    check (now or in an earlier run) or have no final model (fine-tuning failed)."""
    failed = []
    for name in names:
        folder = _folder(s.grid, name)
        if s.grid.plan.finetune.epochs and not finetuned(folder):
            failed.append(name)
        elif verified(folder):
            failed += problems_of(name, folder)
        else:
            failed += verify(s, name, folder)
    return failed


def check_plans(grid: Grid, resume: bool) -> None:
    """A new prune job never overwrites plans: a folder that holds some needs --resume."""
    held = (grid.folder / plan_files.CSV).is_file() or plan_files.read_job(grid.folder) is not None or \
        any((grid.folder / plan_files.FOLDER).glob(f"*/{plan_files.PLAN_JSON}"))
    if held and not resume:
        raise InputError("output", str(grid.folder), "this folder already holds plans of a prune job",
                         "a new folder, or --resume to continue that job",
                         "add --resume, or choose another name or --output")


def check_inputs(grid: Grid, trials: TrialPlan, resume: bool) -> None:
    """What the job refuses before it measures, trains or writes anything (the dry run makes the same checks):
    plans in the folder without --resume, score images that cannot exist, a round_to no swept unit allows, and
    a grid that changed what the recorded sweep or the prune job means."""
    check_plans(grid, resume)
    check_scoring(grid, checked_shape(grid.data, grid.model.num_classes).test)
    widths = {name: u.channels if isinstance(u, Group) else u.out_channels for name, u in trials.units.items()}
    check_round_to(1 if grid.plan.round_to == "auto" else grid.plan.round_to, grid.plan.min_keep, widths)
    loaded = checkpoints.existing(grid)
    if loaded is None:
        return
    if (grid.folder / "config.yaml").is_file():
        resume_check(grid, trials, loaded.sha256)  # the sweep this job resumes, or plans from
    job = plan_files.read_job(grid.folder) if resume else None
    if job is not None:
        _check_resume(grid, job["identity"], job_identity(grid, loaded.sha256), tell=False)


def job_identity(grid: Grid, sha: str) -> dict[str, Any]:
    """What makes two runs the same prune job: the sweep's identity and the plan section (budgets by label)."""
    plan = grid.as_dict()["plan"]
    plan["budgets"] = [b.label for b in grid.plan.budgets]
    if plan.get("target"):  # how precisely plans are timed, not what they are: a job may tighten it on --resume
        plan["target"].pop("precision", None)
        plan["target"].pop("passes", None)
    return {**identity(grid, sha), "plan": plan}


def _job(s: Setting, resume: bool) -> dict[str, Any]:
    """The job's record (plans/job.json), checked against the grid on --resume; the caller writes it."""
    grid = s.grid
    now = job_identity(grid, s.loaded.sha256)
    job = plan_files.read_job(grid.folder) if resume else None
    if job is None:
        job = {"job_id": uuid.uuid4().hex[:8], "started": datetime.now(timezone.utc).isoformat(),
               "tune_experiments": []}
    else:
        _check_resume(grid, job["identity"], now)
    job.update(identity=now, words=s.words())
    return job


def adds_plans(key: str, old: Any, new: Any) -> bool:
    """Whether a changed identity key only adds plans: budgets or methods."""
    return key in ADDABLE and set(old or ()) <= set(new or ())


def grid_changes(before: dict[str, Any], now: dict[str, Any], allowed: Callable[[str, Any, Any], bool] = adds_plans
                 ) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(every changed identity key, those `allowed` does not allow), each as (dotted key, then, now)."""
    if isinstance(before.get("plan"), dict):  # a job recorded before plan.correction corrected until accepted
        before["plan"].setdefault("correction", "accept")
    changes = changed_keys(before, now)
    return changes, [c for c in changes if not allowed(*c)]


def changed_grid(flag: str, folder: Path, job: str, fixed: list[tuple[str, Any, Any]], allowed: str, fix: str
                 ) -> InputError:
    """The one-line refusal of a grid whose identity changed: the first key that did, and both values."""
    key, old, new = fixed[0]
    more = f" and {len(fixed) - 1} more" if len(fixed) > 1 else ""
    return InputError(flag, str(folder), f"the grid changed since this {job} started ({key}: {old!r} then, "
                      f"{new!r} now{more})", allowed, fix)


def _check_resume(grid: Grid, before: dict[str, Any], now: dict[str, Any], tell: bool = True) -> None:
    """Refuses a grid that changes what the job's plans mean; one that only adds budgets or methods is fine
    (the new plans are made, and said when `tell`)."""
    changes, fixed = grid_changes(before, now)
    if fixed:
        raise changed_grid("--resume", grid.folder, "prune job", fixed, "the same grid, or one that only adds "
                           "budgets or methods", "restore it, or prune under another name or --output")
    for key, old, new in changes if tell else ():
        log.info("the grid adds %s %s: planning them", key.split(".")[1], ", ".join(x for x in new if x not in old))


def dry_run(opts: Options) -> list[str]:
    """The sweep's dry run, and what the prune job would make of it."""
    from runner.job.sweep import dry_run as sweep_dry_run

    grid, trials = prepare(opts)
    criterion = _check_plannable(grid)
    with blamed(opts):
        check_inputs(grid, trials, opts.resume)
    methods, skipped = plan_methods_of(grid, criterion)
    p = grid.plan
    ft = f"{plural(p.finetune.epochs, 'epoch')} ({p.finetune.recipe} recipe, lr {p.finetune.lr:g})" \
        if p.finetune.epochs else "none"
    return sweep_dry_run(opts, folder=False) + [
        f"plans: budgets {', '.join(b.label for b in p.budgets)} x methods {', '.join(methods)} "
        f"({len(p.budgets) * len(methods)} plans), criterion {criterion}, unit {grid.sweep.unit}",
        *(f"skipped: {m}: {why}" for m, why in skipped.items()),
        f"round_to {p.round_to}, min_keep {p.min_keep:g}, correction {p.correction} (at most "
        f"{plural(p.max_corrections, 'move')}), fine-tuning {ft}, scored on {p.score_on}"] + (
        [f"target {p.target.label}: a latency table of every unit x K, cached in {grid.folder / 'latency'}"]
        if p.target else [])


def score_file(opts: Options, path: str) -> str:
    """`prune-sweep score`: a pruned.pt read with our loader alone (or a pruned.onnx run with onnxruntime alone),
    scored on the images the grid's plan section scores plans on, once its lineage (the base checkpoint, the
    classes, the image size) is that of the grid; returns the line to print."""
    with blamed(opts):
        grid, _ = prepare(opts)
        data = load_data(grid.data, grid.model.num_classes, grid.seed, training=False,
                         scored=grid.plan.score_on == "test")
        scored, words = scoring_images(grid, data)
        file = Path(path)
        if not file.is_file():
            raise InputError("--model", path, "no such file", "a pruned.pt or pruned.onnx written by prune-sweep "
                             "prune", "check the path (plans/<budget>-<method>/ in the output folder)")
        check_lineage(grid, data, file)
    if file.suffix == ".onnx":
        try:
            predicted = onnx_predictions(file, scored.images)
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
            f"({correct.sum():,} right): {_score_words(grid, data, file, words)}")


def check_lineage(grid: Grid, data: Dataset, file: Path) -> None:
    """The pruned model (pruned.pt's metadata; for pruned.onnx, the pruned.pt beside it) must come from the grid's
    checkpoint, classes and image size; the first difference is one line."""
    meta = pruned_meta(file.with_name("pruned.pt") if file.suffix == ".onnx" else file)
    checkpoint = Path(grid.checkpoint.path)
    ours = model_files.sha256(checkpoint) if checkpoint.is_file() else None
    size = grid.data.image_size or IMAGE_SIZE
    fix = "score it with the grid that planned it (config.yaml in that sweep's output folder)"
    if meta.get("base_checkpoint_sha256") != ours:
        theirs = str(meta.get("base_checkpoint_sha256") or "none recorded")[:12]
        raise InputError("--model", str(file), f"planned from the checkpoint with sha256 {theirs} "
                         f"({meta.get('base_checkpoint', 'unknown path')}), not from the grid's checkpoint.path "
                         f"{checkpoint} ({ours[:12] if ours else 'missing'})", "a pruned model planned from the "
                         "grid's checkpoint", fix)
    if list(meta.get("classes") or []) != list(data.classes):
        raise InputError("--model", str(file), f"its classes ({', '.join(meta.get('classes') or [])[:60]}) differ "
                         f"from the grid's data ({', '.join(data.classes)[:60]})", "a model of the grid's classes",
                         fix)
    if meta.get("image_size") != size:
        raise InputError("--model", str(file), f"planned at image size {meta.get('image_size')}, the grid's data "
                         f"is {size}", "a model planned at the grid's image size", fix)


def _score_words(grid: Grid, data: Dataset, file: Path, words: str) -> str:
    """What the scored images are, and whether they chose the plan: plan.json beside the model says which images
    chose it; without one, the scored images are only named. The grid's unseen test images are unseen by the
    model's plan only when the plan was chosen on the grid's eval images."""
    record = file.with_name(plan_files.PLAN_JSON)
    said = json.loads(record.read_text(encoding="utf-8")).get("chosen_on") if record.is_file() else None
    chosen = chosen_on(data)
    if grid.plan.score_on == "test":
        if said is None:
            return f"{words}; no {plan_files.PLAN_JSON} beside the model says which images chose its plan"
        return words if said == chosen else f"{words}; but its plan was chosen on {said}, not on the grid's eval " \
                                            "images, so these may include images that chose it"
    n = len(data.test)
    named = f"{data.name} test images 1-{n:,}"
    if said is None:
        return f"{named} (the grid's {n:,} eval images; no {plan_files.PLAN_JSON} beside the model says which " \
               "images chose its plan)"
    return words if said == chosen else f"{named} (the grid's eval images; its plan was chosen on {said})"


def plan_methods_of(grid: Grid, criterion: str) -> tuple[list[str], dict[str, str]]:
    """plan.methods less those this criterion cannot run (`global_plan.plan_methods`), and why."""
    return plan_methods(grid.plan.methods, "methods" in grid.plan.model_fields_set, criterion)


def _check_plannable(grid: Grid) -> str:
    """What a plan needs of the sweep section: output channels pruned, a criterion that ranks them."""
    if grid.sweep.target != "output":
        raise InputError("sweep.target", grid.sweep.target, "a plan removes output channels for real",
                         "output", "sweep with target: output (the default) to plan from it")
    if grid.plan.curves == "recalibrated" and not grid.sweep.bn_recalibration:
        raise InputError("plan.curves", "recalibrated", "the sweep measures no recalibrated curves "
                         "(sweep.bn_recalibration: 0)", "plain, or recalibrated with sweep.bn_recalibration > 0",
                         "set sweep.bn_recalibration (e.g. 512), or plan.curves: plain")
    check_target(grid.plan.target)
    return plan_criterion(grid.plan.criterion, grid.sweep.criteria, {n: CRITERIA[n].draws for n in CRITERIA})


def _on_target(s: Setting) -> OnTarget:
    """The job's target: its latency table (cached entries reused) logged on disk and on W&B, and every latency
    budget checked against what the table says is reachable."""
    mean, std = s.loaded.normalisation
    on = open_target(s.grid, s.base, s.units.orders, s.curves, s.loaded.sha256, s.image_size,
                     lambda path, model: export_onnx(path, model, mean, std, s.image_size))
    least = min((b.keep for b in s.grid.plan.budgets if b.kind == "latency"), default=None)
    if least is not None:  # the tightest latency budget; the fastest plan is timed only if the table allows it
        label = next(b.label for b in s.grid.plan.budgets if b.kind == "latency" and b.keep == least)
        on.check_budget(label, least, on.count(s.base, s.units.orders, s.image_size))
    _log_table(s.grid, table_words(on))
    return on


def _log_table(grid: Grid, words: dict[str, Any]) -> None:
    """The latency table's heatmap on disk, and the table with it on W&B (a run of the sweep's group)."""
    from runner.outputs.latency import heatmap
    from runner.outputs.wandb_tracker import make_tracker

    lat = words["latency"]
    picture = heatmap(lat, Path(grid.folder) / "plots" / "latency_table.png")
    tracking = Tracking(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, Path(grid.folder),
                        grid.as_dict(), False)
    spec = RunSpec(f"latency/{lat['target']}", "latency-table", {"target": lat["key"], "base_ms": lat["base_ms"]})
    with closing(make_tracker(tracking)) as tracker:
        tracker.log_table(spec, "latency_table", lat["rows"], {"latency_heatmap": picture})


def _sweep_missing(opts: Options, grid: Grid, trials: TrialPlan) -> None:
    """Measure the points the grid asks for that results.csv lacks: the sweep, resumed in its folder (or run
    fresh when there is none)."""
    have = {key_of(r) for r in read_rows(grid.folder / "results.csv", skipped=True)}
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


def _finetune(opts: Options, s: Setting, job: dict[str, Any], names: list[str]) -> list[str]:
    """Fine-tune, as Ray Tune trials, the plans not fine-tuned yet (a trial started again continues after its
    last finished epoch). Returns the plans whose trial failed."""
    from runner.job import cluster
    from runner.job.finetune import FinetuneShared, can_restore, run_finetuning
    from runner.job.ray_env import cluster_address, set_ray_env
    from runner.job.tuner import trial_resources

    grid, data = s.grid, s.data
    todo = [n for n in names if not finetuned(_folder(grid, n))]
    if not todo:
        log.info("every plan is fine-tuned")
        return []
    mean, std = s.loaded.normalisation
    recipe = recipe_of(grid.plan.finetune)
    folders = {name: str(_folder(grid, name)) for name in names}
    shared = FinetuneShared(spec_of(grid.model), s.image_size, data.train, s.images.scored, tuple(mean), tuple(std),
                            recipe, grid.seed, grid.sweep.batch_size, folders)
    address = cluster_address(opts.address)
    set_ray_env(address)
    last = job["tune_experiments"][-1] if job["tune_experiments"] else None
    restore = last is not None and can_restore(f"{grid.tune_root}/{last}", todo)
    experiment = last if restore else new_experiment(grid)
    if not restore:
        job["tune_experiments"].append(experiment)
        plan_files.write_job(grid.folder, job)
    log.info("fine-tuning %s for %s (%s, lr %g) on %s%s", plural(len(todo), "pruned model"),
             plural(recipe.epochs, "epoch"), recipe.optimizer, recipe.lr, plural(len(data.train), "train image"),
             f" ({len(names) - len(todo)} fine-tuned by an earlier run)" if len(todo) < len(names) else "")
    with cluster.ray_session(address, grid.resources.ray_dashboard, grid.resources, len(todo)):
        failed = run_finetuning(shared, todo, trial_resources(grid), grid.resources.max_concurrent,
                                str(grid.tune_root), experiment, restore, _runs(s, job, names))
    for name in failed:
        log.error("fine-tuning %s failed (Tune's error file is under %s)", name, grid.tune_root)
    return failed


def _runs(s: Setting, job: dict[str, Any], names: list[str]) -> Any:
    """The W&B side of fine-tuning: one run per plan, its id stable across --resume (from the job's id)."""
    from runner.job.finetune import RunsContext

    grid = s.grid
    subsets = {**s.data.subsets(), "scored": class_counts(s.images.scored.labels)}
    tracking = Tracking(grid.wandb.mode, grid.wandb.project, grid.wandb.entity, grid.name, grid.folder,
                        {**grid.as_dict(), "data_subsets": subsets}, False, job["job_id"])
    parent = model_artifact(s.loaded.path, s.loaded.sha256)
    recipe = recipe_of(grid.plan.finetune).model_dump()
    specs = {}
    for name in names:
        row = row_of(_folder(grid, name), grid.plan.finetune.epochs)
        specs[name] = RunSpec(f"plan/{name}", "finetune", {"plan": name, "recipe": recipe,
                                                            "macs_kept": row["macs_kept"],
                                                            "accuracy_removed": row["accuracy_removed"]},
                              uses=parent)
    return RunsContext(tracking, specs, {n: str(_folder(grid, n)) for n in names}, grid.plan.finetune.epochs)


def new_experiment(grid: Grid, prefix: str = "finetune") -> str:
    """A Tune experiment name not used yet: finetune, finetune-2, ... (stamped with the time in a tune_storage
    that is not a local folder)."""
    root = str(grid.tune_root)
    if "://" in root:
        return f"{prefix}-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    n = 1
    while (Path(root) / (prefix if n == 1 else f"{prefix}-{n}")).exists():
        n += 1
    return prefix if n == 1 else f"{prefix}-{n}"
