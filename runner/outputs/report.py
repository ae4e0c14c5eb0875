"""The sweep's report: plots and report.md, written from results.csv (DESIGN §4).

It answers "which layers can I prune, and how far?": layers ranked by sensitivity, the largest K per layer
that keeps the drop under 1 and 5 points, criteria compared, with the provenance of every number.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from runner import storage
from runner.outputs import figures
from runner.outputs.results import by_trial

THRESHOLDS = (1.0, 5.0)  # accuracy drop, percentage points

TARGET_MEANING = {
    "output": "filter and BN channel removed: the channel is zero after the layer's BN",
    "input": "input channel zeroed in the conv's weights (the seed's operation)",
}


@dataclass(frozen=True)
class ReportMeta:
    """What the report says about where its numbers come from."""

    name: str
    baseline: float  # accuracy, percent
    eval_images: int
    dataset: str
    calibration: str  # which images ranked the channels, in words
    arch: str
    width: float
    target: str
    checkpoint: str
    checkpoint_sha256: str
    trained_accuracy: str
    versions: dict[str, str]
    wandb: str  # where the W&B runs are, in words

    @property
    def target_meaning(self) -> str:
        return TARGET_MEANING[self.target]


def safe_k(points: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The largest K such that it and every smaller measured K keep the drop under `threshold`."""
    best = None
    for p in sorted(points, key=lambda r: r["k"]):
        if p["accuracy_drop"] >= threshold:
            break
        best = p
    return best


def trial_summary(points: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """What describes one trial (a layer and criterion) as a whole, for W&B's runs table and parallel-coordinates
    view: the largest safe K under each drop threshold (0 when even the smallest K is past it), the area under
    the drop curve over the fraction pruned (percentage points x fraction, from no channel pruned), and the
    accuracy at each fraction measured."""
    pts = sorted(points, key=lambda r: r["k"])
    out: dict[str, float | int] = {"points": len(pts), "max_k": pts[-1]["k"] if pts else 0}
    for t in THRESHOLDS:
        best = safe_k(pts, t)
        out[f"safe_k_{t:g}pt"] = best["k"] if best else 0
        out[f"safe_fraction_{t:g}pt"] = best["fraction"] if best else 0.0
    area, last = 0.0, (0.0, 0.0)
    for p in pts:
        area += (p["fraction"] - last[0]) * (p["accuracy_drop"] + last[1]) / 2
        last = (p["fraction"], p["accuracy_drop"])
    out["drop_auc"] = area
    for p in pts:
        out[f"accuracy_at_{fraction_label(p['fraction'])}"] = p["accuracy"]
    return out


def fraction_label(fraction: float) -> str:
    """0.125 -> "12p5pct", 0.25 -> "25pct": a fraction as a key W&B's filters and panels take (no dots)."""
    return f"{100 * fraction:.4g}".replace(".", "p") + "pct"


def layer_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer, with the criterion that prunes it best (lowest mean drop): sensitivity and safe K."""
    trials = by_trial(rows)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    summary = []
    for layer in layers:
        options = {t.criterion: pts for t, pts in trials.items() if t.layer == layer}
        criterion, pts = min(options.items(), key=lambda kv: statistics.fmean(p["accuracy_drop"] for p in kv[1]))
        summary.append({
            "layer": layer, "channels": pts[0]["channels"], "criterion": criterion,
            "mean_drop": statistics.fmean(p["accuracy_drop"] for p in pts), "max_k": pts[-1]["k"],
            "drop_at_max_k": pts[-1]["accuracy_drop"],
            **{f"safe_{t:g}": safe_k(pts, t) for t in THRESHOLDS},
        })
    return sorted(summary, key=lambda s: -s["mean_drop"])


def _k(p: dict[str, Any] | None) -> str:
    return "none" if p is None else f"{p['k']} ({100 * p['fraction']:.0f}%)"


def _sensitivity_table(summary: list[dict[str, Any]], limit: int = 12) -> list[str]:
    lines = ["| layer | channels | best criterion | mean drop (pts) | drop at largest K | largest K, drop < 1 pt "
             "| largest K, drop < 5 pts |", "|---|---:|---|---:|---:|---:|---:|"]
    shown = summary if len(summary) <= 2 * limit else summary[:limit] + [None] + summary[-limit:]
    for s in shown:
        if s is None:
            lines.append(f"| ... {len(summary) - 2 * limit} more layers ... | | | | | | |")
            continue
        lines.append(f"| `{s['layer']}` | {s['channels']} | {s['criterion']} | {s['mean_drop']:.2f} | "
                     f"{s['drop_at_max_k']:.2f} at K={s['max_k']} | {_k(s['safe_1'])} | {_k(s['safe_5'])} |")
    return lines


def _criteria_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by[r["criterion"]].append(r["accuracy_drop"])
    wins: dict[str, int] = defaultdict(int)
    for s in layer_summary(rows):
        wins[s["criterion"]] += 1
    lines = ["| criterion | mean drop over all points (pts) | layers where it is best |", "|---|---:|---:|"]
    for c, drops in sorted(by.items(), key=lambda kv: statistics.fmean(kv[1])):
        lines.append(f"| {c} | {statistics.fmean(drops):.2f} | {wins[c]} |")
    return lines


def write_plots(rows: Sequence[dict[str, Any]], baseline: float, folder: Path) -> dict[str, Path]:
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = {"accuracy_vs_k": plots / "accuracy_vs_k.png", "sensitivity": plots / "sensitivity.png"}
    if rows:
        figures.accuracy_vs_k(rows, baseline, paths["accuracy_vs_k"])
        figures.sensitivity_heatmap(rows, paths["sensitivity"])
    return paths


def write_report(rows: Sequence[dict[str, Any]], meta: ReportMeta, failed: Sequence[str], folder: Path,
                 expected_points: int) -> Path:
    """report.md in `folder`; `meta` holds the provenance (see runner.job.sweep)."""
    lines = [f"# Pruning sensitivity: {meta.name}", ""]
    lines += [f"Baseline accuracy **{meta.baseline:.2f}%** on {meta.eval_images:,} {meta.dataset} test "
              f"images; channels ranked on {meta.calibration}. Model {meta.arch} width {meta.width:g}, "
              f"target `{meta.target}` ({meta.target_meaning}).", ""]
    lines += [f"Points measured: {len(rows)} of {expected_points}"
              + (f"; **{len(failed)} trials failed**: {', '.join(failed)}" if failed else "") + ".", ""]
    if rows:
        summary = layer_summary(rows)
        lines += ["## Which layers can I prune, and how far?", "",
                  "Layers from most to least sensitive (mean accuracy drop over the K values tried, with the "
                  "criterion that hurts that layer least). *Largest K* is the largest K tried such that it and every "
                  "smaller K stay under the drop.", ""]
        lines += _sensitivity_table(summary)
        robust = [s["layer"] for s in summary if s["safe_1"] is not None and s["safe_1"]["k"] == s["max_k"]]
        if robust:
            lines += ["", f"Prunable up to the largest K tried with under 1 point lost: {', '.join(robust)}."]
        lines += ["", "## Criteria compared", ""] + _criteria_table(rows)
    lines += ["", "## Plots", "", "![accuracy vs K](plots/accuracy_vs_k.png)", "",
              "![sensitivity](plots/sensitivity.png)", "",
              "Feature maps for a few K per layer are in [feature_maps/](feature_maps/) "
              "(pruned layer's BN output: pruned channels are flat; final stage: top 64 channels by mean).", "",
              "## Provenance", "",
              f"- checkpoint: `{meta.checkpoint}` (sha256 `{meta.checkpoint_sha256}`)",
              f"- checkpoint test accuracy when trained: {meta.trained_accuracy}",
              "- resolved grid: [config.yaml](config.yaml); every row of [results.csv](results.csv) carries the "
              "checkpoint sha256",
              f"- libraries: {', '.join(f'{k} {v}' for k, v in meta.versions.items())}",
              f"- W&B: {meta.wandb}", ""]
    path = folder / "report.md"
    storage.write_text(path, "\n".join(lines))
    return path
