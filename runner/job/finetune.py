"""Fine-tuning the pruned models as Ray Tune trials: one trial per plan, in parallel, with the
sweep's resources per trial (fractional GPUs when there are GPUs).

A trial reads its plan's `pruned.pt` with our loader (the base architecture rebuilt, the plan's channels removed,
the state_dict loaded), trains it with the plan's fine-tuning recipe on the train split (the calibration
hold-out stays out), reports every epoch, scores it on the plan's scoring images, and writes the fine-tuned
weights back to `pruned.pt` (same plan, written whole) with the per-image verdicts beside it. The driver's
callback turns the epochs into one W&B run per plan (job type `finetune`): its training curve, the base
checkpoint as its parent and the fine-tuned model as its artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from model.zoo import Spec, build
from runner.config import TrainConfig
from runner.engine.device import place
from runner.engine.images import Images
from runner.engine.measure import EvalSet
from runner.inputs.train import fit_model
from runner.job.trial import trial_device
from runner.planning.export import load_pruned, save_pruned
from runner.planning.scoring import score
from runner.outputs.tracking import RunSpec, Tracker

log = logging.getLogger(__name__)

CORRECT = "correct_{}.npy"  # per scored image: right (True) or wrong, for masked / removed / finetuned


@dataclass(frozen=True)
class FinetuneShared:
    """What every fine-tuning trial needs, put in the object store once."""

    spec: Spec
    image_size: int
    train: Images
    scored: Images
    mean: tuple[float, ...]
    std: tuple[float, ...]
    recipe: TrainConfig  # a full recipe (every field set)
    seed: int
    batch_size: int  # evaluation batch
    folders: dict[str, str]  # plan name (<budget>-<method>) -> its folder


class EpochReport:
    """fit_model's TrainLog inside a trial: every epoch goes to Tune (and from there to the driver's W&B run)."""

    def start(self, config: dict[str, Any]) -> None:
        pass

    def epoch(self, values: dict[str, float]) -> None:
        tune.report(dict(values))

    def trained(self, path: str, sha256: str, meta: dict[str, Any]) -> None:
        pass


def finetune_trial(config: dict[str, Any], shared: FinetuneShared) -> None:
    """The Tune trainable of one plan: load, fine-tune, score, write back."""
    device = trial_device()
    folder = Path(shared.folders[config["plan"]])
    pruned = load_pruned(folder / "pruned.pt", build(shared.spec, pretrained=False), shared.image_size)
    started, cpu = time.time(), time.process_time()
    # on the CPU in the plain layout: oneDNN's channels_last backward crashes (SIGSEGV) on some pruned widths
    # (a uniform plan's 7 and 13 channels)
    model, _ = fit_model(pruned.model, shared.train, shared.recipe, device, shared.mean, shared.std, shared.seed,
                         progress=False, log_to=EpochReport(), channels_last=device.type == "cuda")
    evalset = EvalSet.build(shared.scored, shared.mean, shared.std, shared.spec.num_classes, device,
                            shared.batch_size)
    result = score(place(model, device), evalset)
    np.save(folder / CORRECT.format("finetuned"), result.correct)
    meta = {**pruned.meta, "finetuned": True, "finetune_recipe": shared.recipe.model_dump(),
            "finetune_seconds": round(time.time() - started, 1), "accuracy_finetuned": result.accuracy}
    save_pruned(folder / "pruned.pt", model.cpu(), pruned.removal, meta)
    tune.report({"done": True, "accuracy_finetuned": result.accuracy, "scored_images": result.count,
                 "device": str(device), "cpu_seconds": round(time.process_time() - cpu, 1)})


class FinetuneRuns(tune.Callback):
    """On the driver: one W&B run per plan, its epochs logged as they arrive; the fine-tuned model as an
    artifact whose parent is the base checkpoint (W&B lineage, online)."""

    def __init__(self, tracker: Tracker, specs: dict[str, RunSpec], folders: dict[str, str]) -> None:
        self.tracker, self.specs, self.folders = tracker, specs, folders
        self.logs: dict[str, Any] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its experiment state
        return {"tracker": None, "specs": self.specs, "folders": self.folders, "logs": {}, "results": {}}

    def _log(self, name: str) -> Any:
        if name not in self.logs and self.tracker is not None:
            self.logs[name] = self.tracker.train_log(self.specs[name])
            self.logs[name].start({"plan_folder": self.folders[name]})
        return self.logs.get(name)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = trial.config["plan"]
        run = self._log(name)
        if result.get("done"):
            self.results[name] = {k: result[k] for k in ("accuracy_finetuned", "scored_images", "device",
                                                         "cpu_seconds") if k in result}
            log.info("fine-tuned %s: accuracy %.2f%%", name, result["accuracy_finetuned"])
        elif run is not None and "epoch" in result:
            run.epoch({k: result[k] for k in ("epoch", "loss", "train_accuracy", "lr", "seconds") if k in result})
        if "epoch" in result and not result.get("done"):
            log.info("fine-tuning %s: epoch %d, loss %.3f", name, result["epoch"], result["loss"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["plan"]
        run = self._log(name)
        if run is not None and name in self.results:
            from model.checkpoint import sha256

            path = str(Path(self.folders[name]) / "pruned.pt")
            run.trained(path, sha256(path), {"test_accuracy": self.results[name]["accuracy_finetuned"],
                                             "test_images": self.results[name]["scored_images"]})


def run_finetuning(shared: FinetuneShared, resources: dict[str, float],
                   max_concurrent: int | None, storage: str, experiment: str, tracker: Tracker,
                   specs: dict[str, RunSpec]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Fine-tune every plan (inside `runner.job.cluster.ray_session`); returns each plan's final result and the
    plans whose trial failed."""
    runs = FinetuneRuns(tracker, specs, shared.folders)
    trainable = tune.with_resources(tune.with_parameters(finetune_trial, shared=shared), resources)
    tuner = tune.Tuner(
        trainable, param_space={"plan": tune.grid_search(list(shared.folders))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                    trial_name_creator=lambda t: t.config["plan"],
                                    trial_dirname_creator=lambda t: t.config["plan"]),
        run_config=tune.RunConfig(name=experiment, storage_path=storage, verbose=0, callbacks=[runs]))
    results = tuner.fit()
    failed = sorted(r.config["plan"] for r in results if r.error)
    return runs.results, failed
