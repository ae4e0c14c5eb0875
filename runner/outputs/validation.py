"""validation.csv, plots/validation.png and the validation section of report.md (`prune-sweep validate`), from
plain rows. docs/validation.md says how to read them.

One row per plan: the random plans of each budget (`random-<budget>-00`, ...) and the methods' plans
(`<budget>-<method>`). Per plan the four predictors (predicted drop from the plain and from the recalibrated
curves, one-shot accuracy masked and after adaptive BN, on the sweep's eval images) and the accuracy after
fine-tuning on the scored images, each accuracy with its 95% Wilson interval (`_low`, `_high`).

How well a predictor ranks plans: Spearman's and Kendall's coefficients between it and the fine-tuned accuracy
over the random plans of a budget, each with a bootstrap 95% interval (plans resampled with replacement). A
drop predicts a lower accuracy, so it is correlated with its sign flipped: for every predictor, +1 means it
orders the plans exactly as fine-tuning does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from runner.outputs import figures
from runner.storage import atomic_path, write_text

CSV = "validation.csv"
FOLDER = "validation"
FIGURE = "plots/validation.png"
COLUMNS = ("plan", "budget", "method", "macs_kept", "params_kept", "predicted_drop_plain",
           "predicted_drop_recalibrated", "accuracy_masked", "accuracy_masked_low", "accuracy_masked_high",
           "accuracy_recalibrated", "accuracy_recalibrated_low", "accuracy_recalibrated_high", "accuracy_finetuned",
           "accuracy_finetuned_low", "accuracy_finetuned_high")
# predictor column -> (its words, sign: +1 when a larger value predicts a higher fine-tuned accuracy)
PREDICTORS = {
    "predicted_drop_plain": ("predicted drop, plain curves", -1.0),
    "predicted_drop_recalibrated": ("predicted drop, recalibrated curves", -1.0),
    "accuracy_masked": ("one-shot accuracy, masked", 1.0),
    "accuracy_recalibrated": ("one-shot accuracy after adaptive BN", 1.0),
}
TARGET = "accuracy_finetuned"
RANDOM = "random"
BOOTSTRAP = 2000


def random_name(budget: str, index: int) -> str:
    """random-macs0.5-00, ..."""
    return f"{RANDOM}-{budget}-{index:02d}"


def validation_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"validation.csv rows lack {', '.join(missing)}")
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


def write_validation_csv(output: Path, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    df = validation_table(rows)
    path = Path(output) / CSV
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (nan when either side is constant)."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either variable accounted for; nan when either side is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    den = math.sqrt(float(np.count_nonzero(dx)) * float(np.count_nonzero(dy)))
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def bootstrap(x: Sequence[float], y: Sequence[float], stat: Any, seed: int = 0,
              resamples: int = BOOTSTRAP) -> tuple[float, float]:
    """Percentile 95% interval of stat(x, y) over resamples of the pairs (resamples with a constant side, where
    the statistic is undefined, are left out)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(x), len(x))
        v = stat(x[idx], y[idx])
        if v == v:
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def correlations(table: pd.DataFrame, seed: int = 0) -> list[dict[str, Any]]:
    """Per budget and predictor, over the budget's random plans with a fine-tuned accuracy: Spearman's and
    Kendall's coefficients (sign-adjusted, module docstring) with bootstrap 95% intervals."""
    out = []
    random = table[table["method"] == RANDOM]
    for budget, rows in random.groupby("budget", sort=False):
        for column, (words, sign) in PREDICTORS.items():
            ok = rows[np.isfinite(rows[column].to_numpy(float)) & np.isfinite(rows[TARGET].to_numpy(float))]
            x, y = sign * ok[column].to_numpy(float), ok[TARGET].to_numpy(float)
            entry = {"budget": budget, "predictor": column, "words": words, "plans": len(ok)}
            if len(ok) >= 3:
                entry.update(spearman=spearman(x, y), kendall=kendall(x, y))
                entry["spearman_low"], entry["spearman_high"] = bootstrap(x, y, spearman, seed)
                entry["kendall_low"], entry["kendall_high"] = bootstrap(x, y, kendall, seed)
            else:
                entry.update({k: float("nan") for k in ("spearman", "kendall", "spearman_low", "spearman_high",
                                                        "kendall_low", "kendall_high")})
            out.append(entry)
    return out


def bn_gain(rows: Iterable[Mapping[str, Any]], criterion: str, least: float = 0.5) -> dict[str, float] | None:
    """What adaptive BN does to the sweep's one-shot accuracy over its points that prune at least `least` of a
    unit (results.csv rows of the plan criterion): mean of accuracy_recalibrated - accuracy (points), how many
    points, and the share it raised. None when the sweep has no recalibrated points."""
    diffs = []
    for r in rows:
        try:
            plain, recal, fraction = float(r["accuracy"]), float(r["accuracy_recalibrated"]), float(r["fraction"])
        except (KeyError, TypeError, ValueError):
            continue
        if r.get("criterion") == criterion and fraction >= least and plain == plain and recal == recal:
            diffs.append(recal - plain)
    if not diffs:
        return None
    d = np.asarray(diffs)
    return {"mean_gain": float(d.mean()), "points": len(d), "raised": float((d > 0).mean()), "least": least}


def summary_values(corr: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The correlations as flat W&B summary keys: <budget>/<predictor>/spearman, ..._low, ..._high, kendall."""
    out = {}
    for c in corr:
        for k in ("spearman", "spearman_low", "spearman_high", "kendall", "kendall_low", "kendall_high"):
            out[f"{c['budget']}/{c['predictor']}/{k}"] = c[k]
    return out


def _f(v: Any, digits: int = 2) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if v != v else f"{v:+.{digits}f}" if digits == 2 and abs(v) <= 1 else f"{v:.{digits}f}"


def validation_figure(table: pd.DataFrame, path: Path) -> None:
    """Fine-tuned accuracy against each predictor: random plans as grey dots (95% intervals), the methods'
    plans in their colours; the title of each panel gives Spearman's rho over the random plans."""
    plt = figures.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), squeeze=False)
    for ax, (column, (words, sign)) in zip(axes.ravel(), PREDICTORS.items()):
        for method, rows in table.groupby("method", sort=False):
            x, y = rows[column].to_numpy(float), rows[TARGET].to_numpy(float)
            if not np.isfinite(x).any():
                continue
            err = np.vstack([y - rows["accuracy_finetuned_low"].to_numpy(float),
                             rows["accuracy_finetuned_high"].to_numpy(float) - y])
            colour, marker = ("tab:gray", "o") if method == RANDOM else figures.METHOD_STYLE.get(method,
                                                                                                  ("black", "x"))
            ax.errorbar(x, y, yerr=err, fmt=marker, color=colour, ms=5, capsize=2, alpha=0.8,
                        label="random plans" if method == RANDOM else method)
        random = table[table["method"] == RANDOM]
        ok = np.isfinite(random[column].to_numpy(float)) & np.isfinite(random[TARGET].to_numpy(float))
        rho = spearman(sign * random[column].to_numpy(float)[ok], random[TARGET].to_numpy(float)[ok]) \
            if ok.sum() >= 3 else float("nan")
        ax.set_title(f"{words}\nSpearman {_f(rho)} over {int(ok.sum())} random plans", fontsize=9)
        ax.set_xlabel(words + (" (points)" if "drop" in column else " (%)"), fontsize=8)
        ax.set_ylabel("accuracy after fine-tuning (%)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    figures._save(fig, path)


START, END = "<!-- validation: written by prune-sweep validate -->", "<!-- end of validation -->"


def validation_section(table: pd.DataFrame, corr: Sequence[Mapping[str, Any]], versus: Sequence[Mapping[str, Any]],
                       words: Mapping[str, Any]) -> list[str]:
    """The report's validation section (markdown lines)."""
    lines = [START, "## Validation: do the curves rank plans the way fine-tuning does?", "",
             f"{words['random_plans']} random plans per budget (random per-unit ratios scaled to the budget on the "
             f"counted model, channels in the `{words['criterion']}` order) and the methods' plans, each fine-tuned "
             f"by the same recipe ({words['finetune']}). Predictors on {words['chosen_on']}; fine-tuned accuracy on "
             f"{words['scored_on']}. Adaptive BN: the BatchNorm layers each plan's masks reach re-estimated on "
             f"{words['bn_images']} calibration hold-out images. Coefficients over the random plans, bootstrap 95% intervals; drops are sign-flipped "
             "so that +1 always means the predictor orders the plans exactly as fine-tuning does.", "",
             "| budget | predictor | plans | Spearman [95%] | Kendall [95%] |", "|---|---|---|---|---|"]
    for c in corr:
        lines.append(f"| {c['budget']} | {c['words']} (`{c['predictor']}`) | {c['plans']} | "
                     f"{_f(c['spearman'])} [{_f(c['spearman_low'])}, {_f(c['spearman_high'])}] | "
                     f"{_f(c['kendall'])} [{_f(c['kendall_low'])}, {_f(c['kendall_high'])}] |")
    if versus:
        lines += ["", "Paired differences after fine-tuning, on the scored images (points; positive: the first plan "
                  "is better):", ""]
        lines += [f"- {v['plan']} minus {v['other']}: {v['difference']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]"
                  for v in versus]
    lines += ["", "| plan | MACs kept | predicted drop plain / recal. | masked | adaptive BN | fine-tuned [95%] |",
              "|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        lines.append(f"| {r['plan']} | {r['macs_kept']:.3f} | {_f(r['predicted_drop_plain'], 1)} / "
                     f"{_f(r['predicted_drop_recalibrated'], 1)} | {_f(r['accuracy_masked'], 1)} | "
                     f"{_f(r['accuracy_recalibrated'], 1)} | {_f(r['accuracy_finetuned'])} "
                     f"[{_f(r['accuracy_finetuned_low'])}, {_f(r['accuracy_finetuned_high'])}] |")
    gain = words.get("bn_gain")
    if gain:
        lines += ["", f"Adaptive BN on the sweep's points that prune at least {gain['least']:g} of a unit "
                  f"({gain['points']} points): one-shot accuracy {gain['mean_gain']:+.2f} points on average "
                  f"(raised at {100 * gain['raised']:.0f}% of them)."]
    if words.get("cpu"):
        lines += ["", "Cost: CPU seconds " + ", ".join(f"{k} {v:,.0f}" for k, v in words["cpu"].items())
                  + "; wall seconds " + ", ".join(f"{k} {v:,.0f}" for k, v in (words.get("wall") or {}).items())
                  + "."]
    lines += ["", f"![fine-tuned accuracy vs each predictor]({FIGURE})", "",
              "How to read it: docs/validation.md.", "", END]
    return lines


def write_validation_section(folder: Path, table: pd.DataFrame, corr: Sequence[Mapping[str, Any]],
                             versus: Sequence[Mapping[str, Any]], words: Mapping[str, Any]) -> Path:
    """plots/validation.png, and the validation section of report.md (replacing an earlier one)."""
    folder = Path(folder)
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    validation_figure(table, folder / FIGURE)
    path = folder / "report.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    section = "\n".join(validation_section(table, corr, versus, words))
    if START in text:
        head, _, rest = text.partition(START)
        text = head.rstrip("\n") + "\n\n" + section + rest.partition(END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(path, text)
    return path
