"""The files as a user gets them, checked (docs/prune.md): pruned.pt read back with our loader alone and scored,
exported to pruned.onnx and run with onnxruntime alone; and each plan against its budget's uniform plan."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.engine.device import place
from runner.engine.measure import EvalSet
from runner.job.setting import Setting
from runner.outputs.plans import CORRECT, PRUNED, VERIFIED
from runner.planning.export import export_onnx, onnx_predictions, open_pruned
from runner.planning.scoring import accuracy_interval, difference, paired_drop, score
from runner.storage import write_text

log = logging.getLogger(__name__)


def verify(s: Setting, name: str, folder: Path) -> list[str]:
    """Both files must give the accuracy the plan's verdicts say (fine-tuned when there was fine-tuning), image
    by image. Writes pruned.onnx, then verified.json (the row's final accuracy, its interval, the ONNX check,
    and the problems found). Returns [name] when a check fails."""
    final = "finetuned" if s.grid.plan.finetune.epochs else "removed"
    opened = open_pruned(folder / PRUNED)
    scoreset = s.images.scoreset
    result = score(place(opened.model, scoreset.inputs[0].device), scoreset)
    expected = np.load(folder / CORRECT.format(final))
    problems = []
    if not np.array_equal(result.correct, expected):
        differ = int(np.count_nonzero(result.correct != expected))
        problems.append(f"pruned.pt read back gives {result.accuracy:.2f}% ({differ} images differ from the {final} "
                        "model)")
    mean, std = s.loaded.normalisation
    export_onnx(folder / "pruned.onnx", opened.model.cpu(), mean, std, s.image_size)
    scored = s.images.scored
    predicted = onnx_predictions(folder / "pruned.onnx", scored.images)
    onnx_differ = int(np.count_nonzero(predicted != _predictions(opened.model, scoreset)))
    if onnx_differ:
        problems.append(f"pruned.onnx predicts {onnx_differ} images differently from torch")
    low, high = accuracy_interval(result)
    figures: dict[str, Any] = {"accuracy_final": result.accuracy, "final_low": low, "final_high": high,
                               "accuracy_onnx": 100 * float((predicted == scored.labels).mean()),
                               "onnx_differ": onnx_differ}
    if final == "finetuned":
        drop = paired_drop(s.images.base_score, result)
        figures.update(finetuned_low=low, finetuned_high=high, finetuned_drop=drop.drop,
                       finetuned_drop_low=drop.low, finetuned_drop_high=drop.high)
    for problem in problems:
        log.error("%s: %s", name, problem)
    write_text(folder / VERIFIED, json.dumps({"figures": figures, "problems": problems}, indent=1) + "\n")
    return [name] if problems else []


def problems_of(name: str, folder: Path) -> list[str]:
    """[name] when the plan's verification (done in an earlier run of the job) found a problem."""
    return [name] if json.loads((Path(folder) / VERIFIED).read_text(encoding="utf-8"))["problems"] else []


def versus_uniform(rows: dict[str, dict[str, Any]], final: str) -> None:
    """Each plan against the uniform plan of its budget, image by image on the scored images (paired 95%
    interval): the columns vs_uniform, vs_uniform_low, vs_uniform_high."""
    for row in rows.values():
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
