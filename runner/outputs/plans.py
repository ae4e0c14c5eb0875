"""plans.csv (one row per budget x method) and plans/<budget>-<method>/plan.json, from plain values.

plans.csv compares the plans: MACs and params kept (fractions of the base model, counted on the pruned
model), latency (ms, median, base and pruned), the predicted and the measured drop of the combined plan, and
accuracy masked (all the plan's masks at once), removed (the physically pruned model, before fine-tuning; equal
to masked to the image), fine-tuned (with its paired 95% interval), against the base model's accuracy. Accuracy
in percent of the scored images; drops in points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from runner.storage import atomic_path, write_text

FOLDER = "plans"
CSV = "plans.csv"
PLAN_JSON = "plan.json"
COLUMNS = ("budget", "method", "macs_kept", "params_kept", "latency_ms_b1", "latency_ms_b64", "predicted_drop",
           "accuracy_masked", "accuracy_removed", "accuracy_finetuned", "finetuned_low", "finetuned_high",
           "baseline_accuracy")
# written after COLUMNS when a row has them
OPTIONAL = ("measured_drop", "measured_low", "measured_high", "corrections", "base_latency_ms_b1",
            "base_latency_ms_b64", "macs", "params", "units", "chosen_on", "scored_on", "finetune_epochs")


def plan_folder(output: Path, budget: str, method: str) -> Path:
    """<output>/plans/<budget>-<method>, e.g. plans/macs0.5-knapsack."""
    return Path(output) / FOLDER / f"{budget}-{method}"


def write_plan_json(folder: Path, plan: Mapping[str, Any]) -> Path:
    """plan.json in `folder` (created), written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLAN_JSON
    write_text(path, json.dumps(plan, indent=1, allow_nan=True) + "\n")
    return path


def read_plan_json(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / PLAN_JSON).read_text(encoding="utf-8"))


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
