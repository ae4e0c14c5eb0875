"""The latency table and the plans' times on the target, as files, W&B and report lines (docs/latency.md).

From plain values (`runner.planning.target.table_words`: the table's rows, target, cost) and plans.csv:
`plots/latency_table.png` (heatmap, unit x K, ms saved), the same table and heatmap on W&B (one run,
`latency/<target>`), `latency/cost.json` (what measuring the table cost, read by `scripts/bench.py
--latency`), `plots/plans_latency.png` (accuracy vs measured latency) and the report's lines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runner.outputs import figures
from runner.storage import write_text

COST = "cost.json"


def heatmap(words: Mapping[str, Any], path: Path) -> Path:
    """plots/latency_table.png: per unit (rows) and K (columns, as the fraction of the unit pruned), ms saved."""
    rows = words["rows"]
    units = list(dict.fromkeys(r["unit"] for r in rows))
    ks = {u: sorted(r["k"] for r in rows if r["unit"] == u) for u in units}
    width = max(len(v) for v in ks.values())
    grid = np.full((len(units), width), np.nan)
    for i, u in enumerate(units):
        by_k = {r["k"]: r["saved_ms"] for r in rows if r["unit"] == u}
        grid[i, :len(ks[u])] = [by_k[k] for k in ks[u]]
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * width, 1.0 + 0.35 * len(units)))
    lim = float(np.nanmax(np.abs(grid))) or 1.0
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i, u in enumerate(units):
        for j, k in enumerate(ks[u]):
            ax.text(j, i, f"K={k}\n{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ax.set_xticks(range(width), [f"{j + 1}" for j in range(width)])
    ax.set_xlabel("table entry (K ascending)")
    ax.set_title(f"ms saved per unit and K on {words['target']} (base {words['base_ms']:.2f} ms; red = slower)")
    fig.colorbar(im, ax=ax, label="ms saved")
    path.parent.mkdir(parents=True, exist_ok=True)
    figures._save(fig, path)
    return path


def write_cost(folder: Path, words: Mapping[str, Any]) -> Path:
    """latency/cost.json: how long the table took in this job, per entry, and the job's whole time."""
    lat = words["latency"]
    cost = {k: lat[k] for k in ("target", "file", "entries", "measured", "table_seconds", "entry_seconds",
                                "job_seconds")}
    cost["per_entry_seconds"] = lat["entry_seconds"] / lat["entries"] if lat["entries"] else math.nan
    path = Path(folder) / "latency" / COST
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(cost, indent=1) + "\n")
    return path


def section(table: Any, words: Mapping[str, Any]) -> list[str]:
    """The report's lines on the target: the table's cost, each plan's measured time against the table's
    prediction, round_to auto's avoided counts."""
    lat = words["latency"]
    lines = ["", f"### Latency on {lat['target']}", "",
             f"The latency table ({lat['entries']} unit x K entries, each unit pruned alone and timed in alternation "
             f"with the base) is `{Path(lat['file']).name}` in [latency/](latency/); base {lat['base_ms']:.2f} ms. "
             f"This job measured {lat['measured']} entries in {lat['table_seconds']:.0f} s"
             + (f" ({lat['table_seconds'] / lat['job_seconds']:.0%} of the job's {lat['job_seconds']:.0f} s)"
                if lat.get("job_seconds") else "") + "; the rest were reused from the cache.", "",
             "Kept fractions are of the base's time in the same rounds (measured) or of the table's base time "
             "(predicted), each +- its standard error; the error compares the two, and is *beyond the timing "
             "noise* when it exceeds twice their combined standard error: then the table's sum of one-unit "
             "savings misses how this plan's units interact.", "",
             "| plan | measured ms [25%, 75%] | kept of base | table's prediction | prediction error | MACs kept |",
             "|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        if not _finite(r.get("latency_ms")):
            continue
        err = (r["latency_predicted_kept"] - r["latency_kept"]) / r["latency_kept"]
        lines.append(f"| {r['budget']}-{r['method']} | {r['latency_ms']:.2f} [{r['latency_low']:.2f}, "
                     f"{r['latency_high']:.2f}] | {r['latency_kept']:.3f}{_se(r.get('latency_kept_se'))} | "
                     f"{r['latency_predicted_kept']:.3f}{_se(r.get('latency_predicted_se'))} | {err:+.1%}"
                     f"{' (beyond the timing noise)' if beyond_noise(r) else ''} | {r['macs_kept']:.3f} |")
    lines += versus(table)
    lines += ["", "![accuracy vs measured latency](plots/plans_latency.png)",
              "![ms saved per unit and K](plots/latency_table.png)"]
    avoided = {u: v for u, v in (lat.get("avoided") or {}).items() if v}
    if lat.get("auto"):
        lines += ["", "round_to: auto avoided these channel counts (each slower than a larger count): "
                  + ("; ".join(f"{u} keeps {', '.join(map(str, v))}" for u, v in avoided.items()) or "none") + "."]
    return lines


def beyond_noise(r: Mapping[str, Any]) -> bool:
    """Whether a plan's predicted kept fraction is more than two combined standard errors from its measured
    one (False where either error is unknown)."""
    a, b = r.get("latency_kept_se"), r.get("latency_predicted_se")
    if not (_finite(a) and _finite(b)):
        return False
    return abs(r["latency_predicted_kept"] - r["latency_kept"]) > 2 * math.hypot(a, b)


def _se(x: Any) -> str:
    return f" +- {x:.3f}" if _finite(x) else ""


def versus(table: Any) -> list[str]:
    """For each method with both a MACs (or params) plan and a latency plan: was the first slower on the target
    than the second (their kept fractions, each of the base in its own rounds), and at what accuracy each
    (fine-tuned when it was, else removed)."""
    rows = table.to_dict("records")
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        timed = [r for r in rows if r["method"] == method and _finite(r.get("latency_ms"))]
        fast = [r for r in timed if str(r["budget"]).startswith("latency")]
        counted = [r for r in timed if not str(r["budget"]).startswith("latency")]
        for a in counted:
            for b in fast:
                ratio = a["latency_kept"] / b["latency_kept"]  # each of the base in its own rounds
                how = (f"{ratio - 1:.0%} slower than" if ratio > 1 else
                       f"{1 - ratio:.0%} faster than" if ratio < 1 else "as fast as")
                lines.append(f"- `{method}`: the {a['budget']} plan runs at {a['latency_ms']:.2f} ms "
                             f"({a['latency_kept']:.3f} of the base), {how} the {b['budget']} plan at "
                             f"{b['latency_ms']:.2f} ms ({b['latency_kept']:.3f}); accuracy {_accuracy(a)} against "
                             f"{_accuracy(b)}, MACs kept {a['macs_kept']:.3f} against {b['macs_kept']:.3f}.")
    return ["", "MACs plans against latency plans of the same method, on the target:", "", *lines] if lines else []


def _accuracy(r: Mapping[str, Any]) -> str:
    if _finite(r.get("accuracy_final")):
        return f"{r['accuracy_final']:.2f}% [{r['final_low']:.2f}, {r['final_high']:.2f}]"
    return f"{r['accuracy_removed']:.2f}% (removed, not fine-tuned)"


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
