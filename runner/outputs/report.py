"""The sweep's report: plots and report.md, written from results.csv and rankings.json (docs/outputs.md).

It answers "which layers can I prune, and how far?": layers ranked by sensitivity, and for every criterion side
by side the largest K that keeps the drop under 1 and 5 points, judged by the upper end of each point's paired
95% interval. No criterion is picked per layer: picking the best of several noisy curves on the same images
that are then reported would report the luckiest one (the winner's curse). Random orders are drawn several
times and shown as mean and spread. The provenance of every number, and what the numbers do not mean, are
stated beside them.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from runner import storage
from runner.outputs import figures, plans
from runner.outputs.rankings import NAME as RANKINGS, read_rankings
from runner.outputs.results import TrialId, by_trial

THRESHOLDS = (1.0, 5.0)  # accuracy drop, percentage points
LIMIT = 12  # layers shown at each end of a long table
SHOWN_KS = 6  # K values per layer in the random-orders table
SHOWN_CHANNELS = 16  # channel indices listed per safe K
HALF = 0.5  # the layer table's mean drop is taken up to this fraction of the channels
CHANCE_MARGIN = 5.0  # points: a base accuracy at most this far above chance (100 / classes) is near chance

TARGET_MEANING = {
    "output": "filter and BN channel removed: the channel is zero after the layer's BN",
    "input": "input channel zeroed in the conv's weights (the seed's operation)",
}
INTERVAL = ("Newcombe's hybrid score interval for the difference of paired proportions (Newcombe 1998, method 10), "
            "computed from the images that flipped between the baseline and K")
HOLDOUT = {
    "checked": "The checkpoint records the training images it was trained without, and the calibration images are "
               "among them (checked).",
    "unknown": "**The calibration hold-out could not be checked**: the checkpoint does not record which training "
               "images it was trained without (it was trained before prune-sweep recorded that), so the calibration "
               "images may have been trained on.",
    "foreign": "**The checkpoint is foreign** (`checkpoint.foreign: true`): it was not trained here on this split, so "
               "the calibration images may have been trained on.",
    "test": "",  # the calibration sentence already says the test images ranked the channels
}


@dataclass(frozen=True)
class ReportMeta:
    """What the report says about where its numbers come from."""

    name: str
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
    holdout: str = "checked"  # checked | unknown | foreign | test (runner.inputs.checkpoints.check_holdout)
    roles: dict[str, str] = field(default_factory=dict)  # swept layer -> stem | conv1 | conv2 | shortcut
    criteria: Sequence[str] = ()
    random_repeats: int = 1
    random_seed: int = 0
    seed_procedure: str | None = None  # how `criterion: seed` differs from the report's procedure, if it does
    order_by: str | None = None  # the criterion the layer table is sorted by (the plan's); None: the first swept
    classes: int = 0  # the model's classes: chance accuracy is 100 / classes (0: not known)
    eval_classes: str = ""  # which test images the eval images are, and of how many classes, in words

    @property
    def target_meaning(self) -> str:
        return TARGET_MEANING[self.target]

    @property
    def image_points(self) -> float:
        """What one eval image is worth, in accuracy points."""
        return 100 / self.eval_images


def near_chance(accuracy: float, classes: int) -> str | None:
    """A warning when the base accuracy is at most CHANCE_MARGIN points above chance (100 / classes); else None."""
    chance = 100 / classes if classes else float("nan")
    if not accuracy <= chance + CHANCE_MARGIN:  # NaN (nothing measured, classes unknown) compares False
        return None
    return (f"the base accuracy {accuracy:.2f}% is within {CHANCE_MARGIN:g} points of chance ({chance:.2f}% for "
            f"{classes} classes): the network has learnt little, so its curves say little about a trained one; "
            "train the checkpoint further (checkpoint.train.epochs) or point checkpoint.path at a trained one")


def reference_baseline(rows: Sequence[dict[str, Any]]) -> float:
    """The baseline most trials measured (they all agree on one device and precision)."""
    counts = Counter(r["baseline_accuracy"] for r in rows)
    return counts.most_common(1)[0][0] if counts else float("nan")


def curve(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One trial's points, one per K: a criterion with one order as measured; random orders as the mean over
    the draws, with their spread, and the union of the draws' intervals (`drop_low` the lowest lower end,
    `drop_high` the highest upper end), so that a safe K is safe for every draw."""
    by_k: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        by_k[p["k"]].append(p)
    out = []
    for k in sorted(by_k):
        draws = by_k[k]
        drops = [d["accuracy_drop"] for d in draws]
        first = draws[0]
        out.append({
            "layer": first["layer"], "criterion": first["criterion"], "k": k, "fraction": first["fraction"],
            "channels": first["channels"], "draws": len(draws),
            "baseline_accuracy": statistics.fmean(d["baseline_accuracy"] for d in draws),
            "accuracy": statistics.fmean(d["accuracy"] for d in draws), "accuracy_drop": statistics.fmean(drops),
            "drop_sd": statistics.stdev(drops) if len(drops) > 1 else 0.0,
            "drop_min": min(drops), "drop_max": max(drops),
            "drop_low": min(d["drop_low"] for d in draws), "drop_high": max(d["drop_high"] for d in draws),
        })
    return out


def curves(rows: Sequence[dict[str, Any]]) -> dict[TrialId, list[dict[str, Any]]]:
    return {t: curve(pts) for t, pts in by_trial(rows).items()}


def safe_k(points: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The largest K such that it and every smaller measured K have the upper end of the drop's interval under
    `threshold`."""
    best = None
    for p in sorted(points, key=lambda r: r["k"]):
        if p["drop_high"] >= threshold:
            break
        best = p
    return best


def trial_summary(points: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """What describes one trial (a layer and criterion) as a whole, for W&B's runs table and parallel-coordinates
    view: the largest safe K under each drop threshold (0 when even the smallest K is past it), the area under
    the drop curve over the fraction pruned (percentage points x fraction, from no channel pruned), and the
    accuracy at each fraction measured (random: the mean over its draws; safe K from the union of their
    intervals, as in the report)."""
    pts = curve(points)
    out: dict[str, float | int] = {"points": len(points), "max_k": pts[-1]["k"] if pts else 0}
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


def drop_to_half(points: Sequence[dict[str, Any]]) -> float:
    """The mean drop over the first half of the channels: the area under the drop curve (linear between the
    measured fractions, from no channel pruned) from 0 to 50% of the channels, divided by 0.5. A curve measured
    only below 50% is averaged over what was measured."""
    area, last, end = 0.0, (0.0, 0.0), 0.0
    for p in sorted(points, key=lambda q: q["fraction"]):
        f, d = p["fraction"], p["accuracy_drop"]
        if f > HALF:  # up to 50% along the segment that crosses it
            d, f = last[1] + (d - last[1]) * (HALF - last[0]) / (f - last[0]), HALF
        area += (f - last[0]) * (d + last[1]) / 2
        last, end = (f, d), f
        if f >= HALF:
            break
    return area / end if end else 0.0


def order_criterion(criteria: Sequence[str], wanted: str | None) -> str | None:
    """The criterion the layer table is sorted by: `wanted` when it was swept, else the first swept one."""
    return wanted if wanted in criteria else next(iter(criteria), None)


def layer_summary(rows: Sequence[dict[str, Any]], order_by: str | None = None) -> list[dict[str, Any]]:
    """Per layer, every criterion's safe K and mean drop up to half the channels; most sensitive first by the
    `order_by` criterion (default: the first one measured): the smallest safe fraction under 1 point first,
    ties broken by the larger mean drop up to half the channels."""
    by_layer: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for t, pts in curves(rows).items():
        by_layer[t.layer][t.criterion] = pts
    summary = []
    for layer, options in by_layer.items():
        first = next(iter(options.values()))
        summary.append({
            "layer": layer, "channels": first[0]["channels"],
            "max_k": max(p["k"] for pts in options.values() for p in pts),
            "criteria": {c: {t: safe_k(pts, t) for t in THRESHOLDS}
                         | {"max_k": pts[-1]["k"], "half": drop_to_half(pts)} for c, pts in options.items()},
        })
    order_by = order_by or next((c for s in summary for c in s["criteria"]), None)

    def key(s: dict[str, Any]) -> tuple[float, float]:
        mine = s["criteria"].get(order_by)
        if mine is None:  # not measured on this layer: after the others
            return (2.0, 0.0)
        safe = mine[1.0]
        return (safe["fraction"] if safe else 0.0, -mine["half"])

    return sorted(summary, key=key)


def _k(p: dict[str, Any] | None) -> str:
    return "none" if p is None else f"{p['k']} ({100 * p['fraction']:.0f}%)"


def _shown(items: list[Any]) -> list[Any]:
    """All of a long list's items, or its first and last LIMIT with None between them."""
    return items if len(items) <= 2 * LIMIT else items[:LIMIT] + [None] + items[-LIMIT:]


def _sensitivity_table(summary: list[dict[str, Any]], criteria: list[str], order_by: str) -> list[str]:
    lines = [f"| layer | channels | {order_by}: mean drop up to 50% (pts) | "
             + " | ".join(f"{c}: safe K < 1 / < 5 pts" for c in criteria) + " |",
             "|---|---:|---:|" + "---:|" * len(criteria)]
    for s in _shown(summary):
        if s is None:
            lines.append(f"| ... {len(summary) - 2 * LIMIT} more layers ... | | |" + " |" * len(criteria))
            continue
        cells = []
        for c in criteria:
            safe = s["criteria"].get(c)
            cells.append("-" if safe is None else f"{_k(safe[1.0])} / {_k(safe[5.0])}")
        mine = s["criteria"].get(order_by)
        half = "-" if mine is None else f"{mine['half']:.2f}"
        lines.append(f"| `{s['layer']}` | {s['channels']} | {half} | " + " | ".join(cells) + " |")
    return lines


def _criteria_table(rows: Sequence[dict[str, Any]], summary: list[dict[str, Any]]) -> list[str]:
    points: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for pts in curves(rows).values():
        points[pts[0]["criterion"]] += pts
    lines = ["| criterion | mean drop over all K (pts) | mean upper end (pts) | layers with a safe K under 1 pt |",
             "|---|---:|---:|---:|"]
    for c, pts in sorted(points.items(), key=lambda kv: statistics.fmean(p["accuracy_drop"] for p in kv[1])):
        safe = sum(1 for s in summary if s["criteria"].get(c, {}).get(1.0) is not None)
        lines.append(f"| {c} | {statistics.fmean(p['accuracy_drop'] for p in pts):.2f} | "
                     f"{statistics.fmean(p['drop_high'] for p in pts):.2f} | {safe} of {len(summary)} |")
    return lines


def _spread_ks(pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(pts) <= SHOWN_KS:
        return pts
    return [pts[round(i * (len(pts) - 1) / (SHOWN_KS - 1))] for i in range(SHOWN_KS)]


def _random_table(rows: Sequence[dict[str, Any]], summary: list[dict[str, Any]], meta: ReportMeta) -> list[str]:
    random = {t.layer: pts for t, pts in curves(rows).items() if t.criterion == "random"}
    if not random:
        return []
    if meta.random_repeats == 1:
        return ["", "`random` was drawn once per layer (`sweep.random_repeats: 1`): one draw shows no spread, and is "
                "a weak baseline; draw it several times to see how much the order alone moves the drop."]
    lines = ["", "## Random orders: mean and spread", "",
             f"`random` draws {meta.random_repeats} orders per layer (seeds from `sweep.random_seed` = "
             f"{meta.random_seed}, each measured at every K; one row per draw in results.csv, column `repeat`). "
             "Mean accuracy drop over the draws ± their standard deviation (lowest to highest), points"
             + (f"; {SHOWN_KS} K values per layer, all in results.csv" if any(len(p) > SHOWN_KS
                                                                            for p in random.values()) else "")
             + ":", "", "| layer | K: mean drop ± sd (lowest to highest) |", "|---|---|"]
    for s in _shown([s for s in summary if s["layer"] in random]):
        if s is None:
            lines.append("| ... | |")
            continue
        cells = [f"K={p['k']}: {p['accuracy_drop']:.2f} ± {p['drop_sd']:.2f} ({p['drop_min']:.2f} to "
                 f"{p['drop_max']:.2f})" for p in _spread_ks(random[s["layer"]])]
        lines.append(f"| `{s['layer']}` | " + "; ".join(cells) + " |")
    return lines


def _channels(summary: list[dict[str, Any]], folder: Path) -> list[str]:
    """Which channels each deterministic criterion's safe K (under 1 point) removes, from rankings.json."""
    path = folder / RANKINGS
    if not path.is_file():
        return []
    entries = read_rankings(path)
    lines = []
    for s in _shown(summary):
        if s is None:
            lines.append("- ...")
            continue
        parts = []
        for c, safe in s["criteria"].items():
            entry, p = entries.get(TrialId(s["layer"], c).key), safe[1.0]
            if p is None or entry is None or (entry["order"] and isinstance(entry["order"][0], list)):
                continue  # no safe K, or orders that differ per draw
            chosen = entry["order"][:p["k"]]
            shown = ", ".join(map(str, chosen[:SHOWN_CHANNELS])) + (", ..." if len(chosen) > SHOWN_CHANNELS else "")
            parts.append(f"{c} K={p['k']}: {shown}")
        if parts:
            lines.append(f"- `{s['layer']}`: " + "; ".join(parts))
    if not lines:
        return []
    return ["", "## Channels a safe K removes", "",
            f"Under 1 point (upper end), per criterion, the channels removed, in pruning order (all orders and scores: "
            f"[{RANKINGS}]({RANKINGS})):", ""] + lines


def _notes(meta: ReportMeta, criteria: list[str]) -> list[str]:
    notes = []
    if HOLDOUT.get(meta.holdout):
        notes.append(HOLDOUT[meta.holdout])
    residual = sorted(layer for layer, role in meta.roles.items() if role in ("conv2", "shortcut"))
    if meta.target == "output" and residual:
        notes.append("Output pruning of a residual block's `conv2` or shortcut conv (here: "
                     + ", ".join(f"`{x}`" for x in residual[:4]) + (", ..." if len(residual) > 4 else "")
                     + ") zeroes that branch's channel before the residual sum: the residual channel itself stays "
                     "alive (the other branch still adds to it), so a real implementation keeps the stream's width "
                     "and scatters the narrower conv's output back into it with an index add.")
    if meta.target == "output" and "mean_activation" in criteria:
        notes.append("`mean_activation` at the output target is the mean of the BN output, before the ReLU and the "
                     "residual sum: it ranks channels mostly by BN's beta (the shift), not by what the channel passes "
                     "on after the ReLU.")
    if meta.seed_procedure:
        notes.append(f"`criterion: seed` here is **not the report's procedure**: {meta.seed_procedure}.")
    return notes


def write_plots(rows: Sequence[dict[str, Any]], baseline: float, folder: Path) -> dict[str, Path]:
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = {"accuracy_vs_k": plots / "accuracy_vs_k.png", "sensitivity": plots / "sensitivity.png"}
    if rows:
        points = [p for pts in curves(rows).values() for p in pts]
        figures.accuracy_vs_k(points, baseline, paths["accuracy_vs_k"])
        figures.sensitivity_heatmap(points, paths["sensitivity"])
    return paths


def _baselines(rows: Sequence[dict[str, Any]]) -> str:
    seen = sorted({(r["baseline_accuracy"], r.get("device") or "?", r.get("dtype") or "?") for r in rows})
    where = ", ".join(f"{b:.2f}% on {device} {dtype}" for b, device, dtype in seen)
    if len({b for b, _, _ in seen}) == 1:
        return f"Baseline accuracy **{seen[0][0]:.2f}%** ({seen[0][1]}, {seen[0][2]})"
    return f"Baseline accuracy **{reference_baseline(rows):.2f}%** on most trials (each trial measures its own: " \
        f"{where})"


def _points(value: float) -> str:
    """Accuracy points as words: `1 point`, `0.5 points`."""
    shown = f"{value:.3g}"
    return f"{shown} point" if shown == "1" else f"{shown} points"


def write_report(rows: Sequence[dict[str, Any]], meta: ReportMeta, failed: Sequence[str], folder: Path,
                 expected_points: int) -> Path:
    """report.md in `folder`; `meta` holds the provenance (see runner.job.sweep)."""
    criteria = [c for c in meta.criteria if any(r["criterion"] == c for r in rows)] or \
        sorted({r["criterion"] for r in rows})
    lines = [f"# Pruning sensitivity: {meta.name}", ""]
    start = _baselines(rows) if rows else "No points measured yet"
    which = f" ({meta.eval_classes})" if meta.eval_classes else ""
    lines += [f"{start} on {meta.eval_images:,} {meta.dataset} test images{which}, measured by every trial through "
              f"its own cached network; one image is worth {_points(meta.image_points)}. Channels ranked on "
              f"{meta.calibration}. Model {meta.arch}{f' width {meta.width:g}' if meta.arch == 'resnet18' else ''}, "
              f"target `{meta.target}` "
              f"({meta.target_meaning}).", ""]
    warning = near_chance(reference_baseline(rows), meta.classes) if rows else None
    for note in ([f"**Warning: {warning}.**"] if warning else []) + _notes(meta, criteria):
        lines += [note, ""]
    lines += [f"Points measured: {len(rows)} of {expected_points}"
              + (f"; **{len(failed)} trials failed**: {', '.join(failed)}" if failed else "") + ".", ""]
    if rows:
        order_by = order_criterion(criteria, meta.order_by)
        summary = layer_summary(rows, order_by)
        lines += ["## Which layers can I prune, and how far?", "",
                  f"Every drop carries a 95% interval: {INTERVAL}. *Safe K* under 1 or 5 points is the largest K "
                  "tried such that it and every smaller K have the **upper end** of that interval under the "
                  "threshold: a drop the measurement rules out, not just one it did not see"
                  + (" (for `random`, the highest upper end over its draws)" if "random" in criteria else "")
                  + ". Every criterion is shown side by side, none is picked per layer on these same images.", "",
                  f"Order: most sensitive first by `{order_by}`"
                  + (" (the criterion `prune` plans with)" if order_by == meta.order_by else "")
                  + ": the smallest safe K under 1 point as a fraction of the layer's channels first; ties by the "
                  "larger mean drop up to 50% of the channels (the area under the drop curve from 0 to 50%, "
                  "divided by 0.5).", ""]
        lines += _sensitivity_table(summary, criteria, order_by)
        robust = []
        for s in summary:
            whole = [c for c, safe in s["criteria"].items()
                     if safe[1.0] is not None and safe[1.0]["k"] == safe["max_k"]]
            if whole:
                robust.append(f"{s['layer']} ({', '.join(whole)})")
        if robust:
            lines += ["", "Prunable up to the largest K tried with the upper end under 1 point (by criterion): "
                      + ", ".join(robust) + "."]
        lines += ["", "## Criteria compared", ""] + _criteria_table(rows, summary)
        lines += _random_table(rows, summary, meta)
        lines += _channels(summary, folder)
    maps = "pruned channels are flat" if meta.target == "output" else \
        "input pruning leaves the layer's output channels all there, so none is flat"
    lines += ["", "## Plots", "", "![accuracy vs K](plots/accuracy_vs_k.png)", "",
              "Bands: the 95% paired interval of each point (for `random`, from the lowest to the highest end "
              "over its draws, around their mean).", "",
              "![sensitivity](plots/sensitivity.png)", "",
              f"Feature maps for a few K per layer are in [feature_maps/](feature_maps/) (pruned layer's BN output: "
              f"{maps}; final stage: top {figures.FINAL_TILES} channels by mean).", "",
              "## Provenance", "",
              f"- checkpoint: `{meta.checkpoint}` (sha256 `{meta.checkpoint_sha256}`)",
              f"- checkpoint test accuracy when trained: {meta.trained_accuracy}",
              "- resolved grid: [config.yaml](config.yaml); every row of [results.csv](results.csv) carries the "
              "checkpoint sha256, its own baseline, and the device and precision that measured it",
              f"- channel orders and scores: [{RANKINGS}]({RANKINGS})",
              f"- libraries: {', '.join(f'{k} {v}' for k, v in meta.versions.items())}",
              f"- W&B: {meta.wandb}", ""]
    lines += plans.saved_section(folder)  # a prune job's section survives the sweep's report
    path = folder / "report.md"
    storage.write_text(path, "\n".join(lines))
    return path
