"""Fine-tuning the pruned models as Ray Tune trials (docs/prune.md): one trial per plan, in parallel, with the
sweep's resources per trial (fractional GPUs when there are GPUs).

A trial reads its plan's un-fine-tuned `removed.pt` with our loader (the base architecture rebuilt, the plan's
channels removed, the state_dict loaded), trains it with the plan's fine-tuning recipe on the train split (the
calibration hold-out stays out), reports every epoch, scores it on the plan's scoring images, and writes the
fine-tuned weights to `pruned.pt` with the per-image verdicts beside it (`correct_finetuned.npy`, written last:
its presence means the plan is fine-tuned). After every epoch it writes `finetune.pt` (model, optimizer, the
schedule's position, the generators): a trial started again (Tune's restore, or a new experiment of a resumed
job) continues after its last finished epoch and draws the same batches, so its curve is the uninterrupted one.
The driver's callback turns the epochs into one W&B run per plan (job type `finetune`, ids stable across
--resume): its training curve, the base checkpoint as its parent and the fine-tuned model as its artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from model.zoo import Spec, build
from runner.config import TrainConfig
from runner.engine.device import place
from runner.engine.images import Images
from runner.engine.measure import EvalSet
from runner.inputs.train import TrainState, fit_model
from runner.job.trial import trial_device
from runner.outputs.plans import CHECKPOINT, CORRECT, PRUNED, REMOVED, finetuned, save_array
from runner.outputs.tracking import RunSpec, Tracking
from runner.outputs.wandb_tracker import make_tracker
from runner.planning.export import load_pruned, pruned_meta, save_pruned
from runner.planning.scoring import score
from runner.storage import atomic_path

log = logging.getLogger(__name__)

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


def read_state(folder: Path) -> TrainState | None:
    """The trial's state after its last finished epoch, or None (none yet, or one this torch cannot read)."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    return TrainState.of(torch.load(path, map_location="cpu", weights_only=True))


def _keeper(folder: Path) -> Any:
    def keep(state: TrainState) -> None:
        with atomic_path(folder / CHECKPOINT) as tmp:
            torch.save(state.payload(), tmp)

    return keep


class EpochReport:
    """fit_model's TrainLog inside a trial: every epoch goes to Tune (and from there to the driver's W&B run)."""

    def __init__(self, first: int) -> None:
        self.first = first  # the first epoch this start of the trial trains

    def start(self, config: dict[str, Any]) -> None:
        pass

    def epoch(self, values: dict[str, float]) -> None:
        tune.report({**values, "first_epoch": self.first})

    def trained(self, path: str, sha256: str, meta: dict[str, Any]) -> None:
        pass


def finetune_trial(config: dict[str, Any], shared: FinetuneShared) -> None:
    """The Tune trainable of one plan: load, fine-tune (from its last finished epoch), score, write."""
    device = trial_device()
    folder = Path(shared.folders[config["plan"]])
    if not finetuned(folder):
        _finetune(folder, shared, device)
    correct = np.load(folder / CORRECT.format("finetuned"))
    tune.report({"done": True, "accuracy_finetuned": float(100 * correct.sum() / len(correct)),
                 "scored_images": len(correct), "device": str(device),
                 "cpu_seconds": pruned_meta(folder / PRUNED).get("finetune_cpu_seconds", float("nan"))})


def _finetune(folder: Path, shared: FinetuneShared, device: torch.device) -> None:
    removed = load_pruned(folder / REMOVED, build(shared.spec, pretrained=False), shared.image_size)
    state = read_state(folder)
    torch.manual_seed(shared.seed)  # the global generator too: a network with dropout draws from it
    started, cpu = time.time(), time.process_time()
    # on the CPU in the plain layout: oneDNN's channels_last backward crashes (SIGSEGV) on some pruned widths
    # (a uniform plan's 7 and 13 channels)
    model, losses = fit_model(removed.model, shared.train, shared.recipe, device, shared.mean, shared.std,
                              shared.seed, progress=False, log_to=EpochReport(state.epoch + 1 if state else 1),
                              state=state, keep=_keeper(folder), channels_last=device.type == "cuda")
    evalset = EvalSet.build(shared.scored, shared.mean, shared.std, shared.spec.num_classes, device,
                            shared.batch_size)
    result = score(place(model, device), evalset)
    meta = {**removed.meta, "finetuned": True, "finetune_recipe": shared.recipe.model_dump(),
            "finetune_seconds": round(time.time() - started, 1),
            "finetune_cpu_seconds": round(time.process_time() - cpu, 1), "finetune_losses": losses,
            "accuracy_finetuned": result.accuracy}
    save_pruned(folder / PRUNED, model.cpu(), removed.removal, meta)
    save_array(folder / CORRECT.format("finetuned"), result.correct)
    (folder / CHECKPOINT).unlink(missing_ok=True)


@dataclass(frozen=True)
class RunsContext:
    """What the driver's callback needs (pickled with Tune's experiment, so a restored one has it too)."""

    tracking: Tracking
    specs: dict[str, RunSpec]
    folders: dict[str, str]
    epochs: int


class FinetuneRuns(tune.Callback):
    """On the driver: the log line of every epoch, and one W&B run per plan, its epochs logged as they arrive;
    the fine-tuned model as an artifact whose parent is the base checkpoint (W&B lineage, online). Its tracker
    is made in `setup` (Tune pickles callbacks with the experiment and restores them) and closed at the end."""

    def __init__(self, context: RunsContext) -> None:
        self.context = context
        self.tracker: Any = None
        self.logs: dict[str, Any] = {}
        self.started: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"context": self.context, "tracker": None, "logs": {}, "started": set()}

    def setup(self, **info: Any) -> None:
        self.tracker = make_tracker(self.context.tracking)

    def _log(self, name: str) -> Any:
        if name not in self.logs and self.tracker is not None:
            self.logs[name] = self.tracker.train_log(self.context.specs[name])
            self.logs[name].start({"plan_folder": self.context.folders[name]})
        return self.logs.get(name)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = trial.config["plan"]
        if result.get("done"):
            log.info("fine-tuned %s: accuracy %.2f%% on %d images", name, result["accuracy_finetuned"],
                     result["scored_images"])
            return
        if "epoch" not in result:
            return
        if name not in self.started and result.get("first_epoch", 1) > 1:
            log.info("fine-tuning %s: continued after epoch %d (its checkpoint)", name, result["first_epoch"] - 1)
        self.started.add(name)
        run = self._log(name)
        if run is not None:
            run.epoch({k: result[k] for k in ("epoch", "loss", "train_accuracy", "lr", "seconds") if k in result})
        log.info("fine-tuning %s: epoch %d of %d, loss %.3f, train accuracy %.1f%%, lr %.3g (%.0f s)", name,
                 result["epoch"], self.context.epochs, result["loss"], result["train_accuracy"], result["lr"],
                 result["seconds"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.config["plan"]
        folder = Path(self.context.folders[name])
        run = self._log(name)
        if run is not None and finetuned(folder):
            from model.checkpoint import sha256

            correct = np.load(folder / CORRECT.format("finetuned"))
            path = str(folder / PRUNED)
            run.trained(path, sha256(path), {"test_accuracy": float(100 * correct.sum() / len(correct)),
                                             "test_images": len(correct)})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.tracker is not None:
            self.tracker.close()  # runs of trials that did not finish end as failed


def can_restore(path: str, plans: list[str]) -> bool:
    """Whether the Tune experiment at `path` can be restored to fine-tune `plans` (each one of its trials)."""
    from runner.job.tuner import can_restore as restorable

    if not restorable(path):
        return False
    try:
        trials = {t.config.get("plan") for t in tune.ExperimentAnalysis(path).trials}
    except Exception:  # noqa: BLE001  Tune's state unreadable: a new experiment fine-tunes them all the same
        return False
    return set(plans) <= trials


def run_finetuning(shared: FinetuneShared, plans: list[str], resources: dict[str, float], max_concurrent: int | None,
                   storage: str, experiment: str, restore: bool, context: RunsContext) -> list[str]:
    """Fine-tune `plans` (inside `runner.job.cluster.ray_session`; `shared.folders` holds every plan of the job,
    which a restored trial may name), restoring Tune's experiment when `restore`; returns the plans whose trial
    failed."""
    from runner.job.tuner import QuietProgress

    trainable = tune.with_resources(tune.with_parameters(finetune_trial, shared=shared), resources)
    path = f"{storage}/{experiment}"
    if restore:
        log.info("fine-tuning: resuming Tune's experiment %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"plan": tune.grid_search(plans)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                        trial_name_creator=lambda t: t.config["plan"],
                                        trial_dirname_creator=lambda t: t.config["plan"]),
            run_config=tune.RunConfig(name=experiment, storage_path=storage, verbose=0,
                                      callbacks=[FinetuneRuns(context), QuietProgress()]))
    results = tuner.fit()
    return sorted(r.config["plan"] for r in results if r.error and r.config["plan"] in plans)
