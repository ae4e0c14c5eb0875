"""plans.csv (one row per budget x method) and plans/<budget>-<method>/plan.json, from plain values.

plans.csv compares the plans: MACs and params kept (fractions of the base model, counted on the pruned
model), latency (ms, median, base and pruned), the predicted and the measured drop of the combined plan, and
accuracy masked (all the plan's masks at once), removed (the physically pruned model, before fine-tuning; equal
to masked to the image), fine-tuned (with its 95% Wilson interval), against the base model's accuracy; then
each plan against its budget's uniform plan (paired, same images), the ONNX check, latency of the base.
Accuracy in percent of the scored images; drops and differences in points. Also the plans section of
report.md and its plot (`write_plans_section`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from runner.outputs import figures
from runner.storage import atomic_path, write_text

FOLDER = "plans"
CSV = "plans.csv"
# a plan's folder, plans/<budget>-<method>: each file is written whole, and the one written last by a stage
# says the stage is done (plan.json: made; correct_finetuned.npy: fine-tuned; verified.json: verified)
PLAN_JSON = "plan.json"
REMOVED = "removed.pt"  # the model as removed, before fine-tuning (never changed once written)
PRUNED = "pruned.pt"  # the model a user takes: fine-tuned (or the removed one when there is no fine-tuning)
CORRECT = "correct_{}.npy"  # per scored image, right or wrong: masked, removed, finetuned
CHECKPOINT = "finetune.pt"  # a fine-tuning trial's state after its last finished epoch (gone once fine-tuned)
VERIFIED = "verified.json"  # the verification's figures and problems, written after pruned.onnx
COLUMNS = ("budget", "method", "macs_kept", "params_kept", "latency_ms_b1", "latency_ms_b64", "predicted_drop",
           "accuracy_masked", "accuracy_removed", "accuracy_finetuned", "finetuned_low", "finetuned_high",
           "baseline_accuracy")
# written after COLUMNS when a row has them
OPTIONAL = ("target", "latency_ms", "latency_low", "latency_high", "latency_kept", "latency_kept_se",
            "latency_predicted_ms", "latency_base_ms", "latency_predicted_kept", "latency_predicted_se",
            "latency_summed_ms", "macs_overlap", "vs_uniform", "vs_uniform_low", "vs_uniform_high", "measured_drop", "measured_low", "measured_high",
            "corrections", "accepted", "measured_plans", "accuracy_final", "final_low", "final_high", "accuracy_onnx",
            "onnx_differ", "masked_vs_removed_differ", "finetuned_drop", "finetuned_drop_low", "finetuned_drop_high",
            "base_latency_ms_b1", "base_latency_ms_b64", "macs", "params", "units", "units_pruned", "criterion",
            "scored_images", "scored_classes", "chosen_on", "scored_on", "finetune_epochs", "folder")


def plan_folder(output: Path, budget: str, method: str) -> Path:
    """<output>/plans/<budget>-<method>, e.g. plans/macs0.5-knapsack."""
    return Path(output) / FOLDER / f"{budget}-{method}"


def write_plan_json(folder: Path, plan: Mapping[str, Any]) -> Path:
    """plan.json in `folder` (created), written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLAN_JSON
    write_text(path, json.dumps(plan, indent=1, allow_nan=True) + "\n")
    return path


def save_array(path: Path, values: np.ndarray) -> None:
    """An .npy file written whole or not at all."""
    with atomic_path(Path(path)) as tmp:
        np.save(tmp, values)


def made(folder: Path) -> bool:
    """Whether the plan in `folder` is made: plan.json (written last) and the removed, un-fine-tuned model."""
    return (Path(folder) / PLAN_JSON).is_file() and (Path(folder) / REMOVED).is_file()


def finetuned(folder: Path) -> bool:
    """Whether the plan in `folder` is fine-tuned: its verdicts are the trial's last file."""
    return (Path(folder) / CORRECT.format("finetuned")).is_file()


def verified(folder: Path) -> bool:
    return (Path(folder) / VERIFIED).is_file()


def read_plan_json(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / PLAN_JSON).read_text(encoding="utf-8"))


JOB = "job.json"  # plans/job.json: the prune job's record (its id, identity, Tune experiments, the report's words)


def write_job(output: Path, job: Mapping[str, Any]) -> None:
    folder = Path(output) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / JOB, json.dumps(job, indent=1) + "\n")


def read_job(output: Path) -> dict[str, Any] | None:
    """The prune job's record, or None when no prune job ran in `output`."""
    path = Path(output) / FOLDER / JOB
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def plans_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows as plans.csv's table: COLUMNS first (each required), then the OPTIONAL ones present, then any
    others; sorted by budget and method."""
    df = pd.DataFrame(list(rows))
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"plans.csv rows lack {', '.join(missing)}")
    order = list(COLUMNS) + [c for c in OPTIONAL if c in df.columns]
    order += [c for c in df.columns if c not in order]
    return df[order].sort_values(["budget", "method"], kind="stable").reset_index(drop=True)


def write_plans_csv(output: Path, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """<output>/plans.csv from one row per plan; returns the table written."""
    df = plans_table(rows)
    path = Path(output) / CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def read_plans_csv(output: Path) -> pd.DataFrame:
    return pd.read_csv(Path(output) / CSV)


START, END = "<!-- plans: written by prune-sweep prune -->", "<!-- end of plans -->"
METHOD_WORDS = {
    "knapsack": "one K per unit, the least summed predicted drop that meets the budget (exact multiple-choice "
                "knapsack over the measured points)",
    "threshold": "one drop threshold for every unit, each taking its largest K under it, binary-searched to meet "
                 "the budget (PaddleSlim, AIMET, ModelOpt)",
    "uniform": "one kept ratio for every unit: the usual baseline",
    "global": "Torch-Pruning's global pruning (its importance for the plan criterion, one ratio across all coupled "
              "groups, fitted to the budget on the counted model): what a user gets without sweeping",
}


def _pm(v: float, low: float, high: float) -> str:
    return "-" if not _finite(v) else f"{v:.2f} [{low:.2f}, {high:.2f}]"


def _finite(v: Any) -> bool:
    try:
        return v == v and v is not None and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False


def plans_section(table: pd.DataFrame, words: Mapping[str, Any]) -> list[str]:
    """The report's section on the plans (markdown lines), from plans.csv and the job's own words."""
    left = words.get("left_out") or {}
    tuned = words.get("finetune")
    lines = [START, "## Plans: a smaller model under a budget", "",
             f"From the curves of criterion `{words['criterion']}`, {words['units']} units (`unit: {words['unit']}`)"
             + (f"; {len(left)} swept layers left out because their channels cannot be removed on their own: "
                + "; ".join(f"{u} ({why})" for u, why in list(left.items())[:6])
                + (f" and {len(left) - 6} more" if len(left) > 6 else "") if left else "") + ".",
             "",
             f"- **chosen and corrected on** {words['chosen_on']}",
             f"- **scored on** {words['scored_on']}",
             "- MACs and params **counted on the pruned model** (torch.utils.flop_counter; base "
             f"{words['base_macs']:,} MACs, {words['base_params']:,} params per image)",
             "- " + ("fine-tuning: " + ", ".join(f"{k} {v}" for k, v in tuned.items() if k != "recipe")
                     if tuned else "no fine-tuning (plan.finetune.epochs: 0)"),
             "", "Methods: " + "; ".join(f"`{m}`: {METHOD_WORDS[m]}" for m in dict.fromkeys(table["method"])
                                         if m in METHOD_WORDS) + ".",
             *(f"Skipped: `{m}`: {why}." for m, why in (words.get("skipped") or {}).items()), "",
             "| budget | method | MACs kept | params kept | predicted drop | measured drop [95%] | corrections | "
             "masked | removed | fine-tuned [95%] | vs uniform [95%] | ms b1 / b64 (base) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        vs = _pm(r.get("vs_uniform"), r.get("vs_uniform_low"), r.get("vs_uniform_high")) \
            if r["method"] != "uniform" else "-"
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['macs_kept']:.3f} | {r['params_kept']:.3f} | "
            f"{r['predicted_drop']:.2f} | {_pm(r.get('measured_drop'), r.get('measured_low'), r.get('measured_high'))}"
            f" | {r.get('corrections', 0)} | {r['accuracy_masked']:.2f} | {r['accuracy_removed']:.2f} | "
            f"{_pm(r['accuracy_finetuned'], r['finetuned_low'], r['finetuned_high'])} | {vs} | "
            f"{r['latency_ms_b1']:.2f} / {r['latency_ms_b64']:.1f} ({r.get('base_latency_ms_b1', float('nan')):.2f}"
            f" / {r.get('base_latency_ms_b64', float('nan')):.1f}) |")
    lines += ["", f"Base model: {table['baseline_accuracy'].iloc[0]:.2f}% on the scored images.", "",
              "![accuracy vs MACs kept](plots/plans.png)", "",
              "How to read it: *predicted drop* is the sum of the units' drops measured one at a time; *measured "
              "drop* is the whole plan measured at once on the images that chose it, with its paired 95% interval "
              "(a plan whose measured drop exceeded the prediction by more than the interval was corrected: budget "
              "moved away from the unit whose move measured best, *corrections* counts the moves, and the plan kept "
              "is the one that measured least of all the plans measured on the way"
              + ("; with `plan.correction: search` every plan took all the moves it could, accepted or not, so its "
                 "measured drop is the least of many measured on those images, and flattered"
                 if words.get("correction") == "search" else "") + "). *masked* and "
              "*removed* are the same plan as masks and as a physically smaller network (they agree image by "
              "image); *fine-tuned* carries its 95% interval (Wilson); *vs uniform* is the paired difference from "
              "the uniform plan of the same budget on the same images (positive: better than uniform). Latency: "
              "median forward time, CPU, batch 1 and 64, base in brackets. Each plan's files are in "
              "[plans/](plans/): plan.json, pruned.pt (load with `runner.planning.export.open_pruned`), "
              "pruned.onnx (float32 [N, 3, H, W] images in [0, 1], normalisation inside)."]
    if "latency" in words:
        from runner.outputs.latency import section

        lines += section(table, words)
    return lines + ["", END]


def saved_section(folder: Path) -> list[str]:
    """The plans section from what the prune job saved in `folder` (plans.csv and its record), for a report
    written after it (a later `sweep --resume`); [] when there are no plans."""
    job = read_job(folder)
    if job is None or not (Path(folder) / CSV).is_file():
        return []
    return ["", *plans_section(read_plans_csv(folder), job["words"]), ""]


def write_plans_section(folder: Path, table: pd.DataFrame, words: Mapping[str, Any]) -> Path:
    """plots/plans.png, and the plans section of report.md (replacing an earlier one; the sweep's part kept)."""
    folder = Path(folder)
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    figures.plans_figure(table, float(table["baseline_accuracy"].iloc[0]), folder / "plots" / "plans.png")
    if "latency" in words and "latency_kept" in table.columns:
        figures.plans_figure(table, float(table["baseline_accuracy"].iloc[0]), folder / "plots" / "plans_latency.png",
                             "latency_kept", f"latency kept (fraction of the base's measured median on "
                             f"{words['latency']['target']})")
    path = folder / "report.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if START in text:
        head, _, rest = text.partition(START)
        tail = rest.partition(END)[2]
        text = head.rstrip("\n") + "\n\n" + "\n".join(plans_section(table, words)) + tail
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(plans_section(table, words)) + "\n"
    write_text(path, text)
    return path
