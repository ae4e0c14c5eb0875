"""Training the shared checkpoint that a grid file names (`scripts/train.py`).

Training reports to a TrainLog that the caller passes in (the job layer's W&B train run, which logs the curves
and the checkpoint as a `model` artifact; the protocol and its do-nothing form live in runner.basics); this
layer never imports W&B.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import Checkpoint
from runner.basics import NullTrainLog, TrainLog, short
from runner.config import Grid, TrainConfig
from runner.engine.device import fast_math, pick_device, place, uses_channels_last
from runner.engine.evaluate import evaluate
from runner.engine.images import Images, augment, to_device
from runner.errors import InputError, plural
from runner.inputs import checkpoints
from runner.inputs.data import Dataset, Holdout, load_data
from runner.inputs.models import build_for
from runner.provenance import versions

log = logging.getLogger(__name__)


Recipe = TrainConfig  # a full recipe: a TrainConfig with every field set (RECIPES, recipe_of)

RECIPES: dict[str, Recipe] = {
    # SGD + Nesterov with a one-cycle schedule: the usual strong CIFAR-10 ResNet-18 recipe (about 94-95%).
    "standard": Recipe(recipe="standard", epochs=30, batch_size=512, optimizer="sgd", lr=0.2, momentum=0.9,
                       nesterov=True, weight_decay=5e-4, label_smoothing=0.1, schedule="onecycle",
                       normalise="dataset"),
    # The seed report's recipe: Adam 1e-2, wd 1e-5, batch 512, 30 epochs, cosine over the last 15 epochs, and
    # its normalisation: mean = std = 0.5 per channel.
    "seed": Recipe(recipe="seed", epochs=30, batch_size=512, optimizer="adam", lr=1e-2, momentum=0.9,
                   nesterov=False, weight_decay=1e-5, label_smoothing=0.0, schedule="seed", normalise="half"),
}


def normalisation(recipe: Recipe, data: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) the network is trained with: the train images' statistics, or 0.5 and 0.5."""
    if recipe.normalise == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return data.stats()


def recipe_of(cfg: TrainConfig) -> Recipe:
    """The named recipe with the grid's overrides applied (every field set, frozen)."""
    return RECIPES[cfg.recipe].model_copy(update=cfg.model_dump(exclude_none=True))


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier on the peak learning rate at optimizer step `step` of `total`."""
    t = step / max(1, total)
    if schedule == "onecycle":  # linear warm-up over 15%, then cosine to zero
        return t / 0.15 if t < 0.15 else 0.5 * (1 + math.cos(math.pi * (t - 0.15) / 0.85))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "seed":  # constant for the first half, cosine over the second half
        return 1.0 if t < 0.5 else 0.5 * (1 + math.cos(math.pi * (t - 0.5) / 0.5))
    raise ValueError(f"unknown schedule {schedule!r}")


def _optimizer(model: torch.nn.Module, r: Recipe) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases: no weight decay
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov)
    return torch.optim.Adam(groups, lr=r.lr)


def train_model(grid: Grid, data: Dataset, recipe: Recipe, device: torch.device, progress: bool = True,
                log_to: TrainLog | None = None) -> tuple[torch.nn.Module, list[float]]:
    """Train a fresh network; returns it (eval mode) and the mean training loss of each epoch."""
    torch.manual_seed(grid.seed)
    mean, std = normalisation(recipe, data)
    return fit_model(build_for(grid), data.train, recipe, device, mean, std, grid.seed, progress, log_to)


@dataclass
class TrainState:
    """Where training stands after a finished epoch: enough to continue it as if it had never stopped (the
    learning-rate schedule's position is `step`; `generator` draws the data order and the augmentation)."""

    epoch: int  # epochs finished
    step: int  # optimizer steps taken
    losses: list[float]
    model: dict[str, Any]  # state_dict
    optimizer: dict[str, Any]
    generator: torch.Tensor
    torch_rng: torch.Tensor  # torch's global generator (dropout, if the network has any)
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # each GPU's generator; empty on a CPU

    def payload(self) -> dict[str, Any]:
        """Tensors, lists and numbers only: what torch.load(weights_only=True) reads back."""
        return {k: getattr(self, k) for k in STATE_KEYS}

    @classmethod
    def of(cls, payload: dict[str, Any]) -> "TrainState":
        return cls(**{k: payload[k] for k in STATE_KEYS if k in payload})


STATE_KEYS = ("epoch", "step", "losses", "model", "optimizer", "generator", "torch_rng", "cuda_rng")


def fit_model(model: torch.nn.Module, train: Images, recipe: Recipe, device: torch.device,
              mean: tuple[float, ...], std: tuple[float, ...], seed: int, progress: bool = True,
              log_to: TrainLog | None = None, state: TrainState | None = None,
              keep: Callable[[TrainState], None] | None = None, channels_last: bool | None = None
              ) -> tuple[torch.nn.Module, list[float]]:
    """Train `model` (a fresh network, or a pruned one being fine-tuned) on the `train` images with `recipe`,
    inputs normalised with (mean, std); returns it on `device` in eval mode and the mean loss of each epoch.
    `state` continues training where it stood after an epoch; `keep` is handed the state after every epoch
    (before the epoch is reported). `channels_last`: the memory layout (default: the device's fastest)."""
    log_to = log_to or NullTrainLog()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    channels_last = uses_channels_last(device) if channels_last is None else channels_last
    model = place(model, device)
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    x_all = to_device(train.images, mean, std, device, channels_last=channels_last)
    y_all = torch.from_numpy(train.labels).to(device)
    opt = _optimizer(model, recipe)
    steps_per_epoch = math.ceil(len(y_all) / recipe.batch_size)
    total, step, losses, first = recipe.epochs * steps_per_epoch, 0, [], 0
    if state is not None:
        model.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        gen.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)
        if state.cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.cuda_rng)
        step, losses, first = state.step, list(state.losses), state.epoch
    for epoch in range(first, recipe.epochs):
        model.train()
        order = torch.randperm(len(y_all), generator=gen).to(device)
        # a bar on a terminal; in a log file a line at every tenth of the epoch (a bar there is a carriage return
        # per batch) and one per epoch
        on_terminal = sys.stderr.isatty()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch",
                   disable=not (progress and on_terminal), file=sys.stderr, leave=True, dynamic_ncols=True)
        tenths = _tenths(steps_per_epoch) if progress and not on_terminal else set()
        started = time.time()
        run_loss, run_hits, run_seen = 0.0, 0, 0
        for i in bar:
            idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            x, y = augment(x_all[idx], gen), y_all[idx]
            for g in opt.param_groups:
                g["lr"] = recipe.lr * lr_factor(recipe.schedule, step, total)
            with fast_math(device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run_loss += loss.item() * len(y)  # a sync per step: cheap next to a training step
            run_hits += int((logits.argmax(1) == y).sum())
            run_seen += len(y)
            bar.set_postfix(loss=f"{run_loss / run_seen:.3f}", acc=f"{100 * run_hits / run_seen:.1f}%")
            if i + 1 in tenths:
                spent = time.time() - started
                log.info("epoch %d/%d: %d of %d batches, loss %.3f, %.0f s, about %.0f s left in the epoch",
                         epoch + 1, recipe.epochs, i + 1, steps_per_epoch, run_loss / run_seen, spent,
                         spent * (steps_per_epoch - i - 1) / (i + 1))
        losses.append(run_loss / run_seen)
        if keep is not None:
            keep(TrainState(epoch + 1, step, list(losses), model.state_dict(), opt.state_dict(), gen.get_state(),
                            torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                            else []))
        log_to.epoch({"epoch": epoch + 1, "loss": losses[-1], "train_accuracy": 100 * run_hits / run_seen,
                      "lr": opt.param_groups[0]["lr"], "seconds": time.time() - started})
        log.info("epoch %d/%d: loss %.3f, train accuracy %.1f%% (%.0f s)", epoch + 1, recipe.epochs, losses[-1],
                 100 * run_hits / run_seen, time.time() - started)
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"training diverged at epoch {epoch + 1} (loss {losses[-1]}); lower the learning rate")
    return model.eval(), losses


def _tenths(steps: int) -> set[int]:
    """The batch counts at each tenth of an epoch of `steps` batches, the epoch's end excluded (its own line)."""
    return {math.ceil(steps * t / 10) for t in range(1, 10)} - {0, steps}


def test_accuracy(model: torch.nn.Module, data: Dataset, device: torch.device,
                  mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 1000) -> float:
    x = to_device(data.test.images, mean, std, device, channels_last=uses_channels_last(device))
    y = torch.from_numpy(data.test.labels).to(device)
    with fast_math(device):
        tally = evaluate(model, x.split(batch_size), y.split(batch_size), len(data.classes))
    return tally.result().accuracy


def train_checkpoint(grid: Grid, data: Dataset | None = None, device: torch.device | None = None,
                     progress: bool = True, log_to: TrainLog | None = None) -> str:
    """Train exactly the checkpoint the grid names and write it to checkpoint.path; returns the path. `log_to`
    receives the curves and, at the end, the checkpoint written."""
    if grid.checkpoint.train is None:
        raise InputError("checkpoint.train", None, "no training recipe, so the missing checkpoint cannot be made",
                         "a checkpoint.train section ({recipe: standard, epochs: ...})",
                         f"add checkpoint.train to the grid, or put a checkpoint at {grid.checkpoint.path}")
    data = data or load_data(grid.data, grid.model.num_classes, grid.seed)
    device = device or pick_device()
    recipe = recipe_of(grid.checkpoint.train)
    arch = grid.model.arch + (f" width {grid.model.width:g}" if grid.model.arch == "resnet18" else "")
    log.info("training %s on %s (%d images, %s) for %s", arch, data.name, len(data.train), device,
             plural(recipe.epochs, "epoch"))
    log_to = log_to or NullTrainLog()
    log_to.start({"recipe": recipe.model_dump(), "device": str(device), "train_images": len(data.train),
                  "data_subsets": data.subsets()})
    started = time.time()
    model, losses = train_model(grid, data, recipe, device, progress, log_to)
    seconds = time.time() - started
    mean, std = normalisation(recipe, data)
    accuracy = test_accuracy(model, data, device, mean, std)
    meta = {
        "arch": grid.model.arch, "width": float(grid.model.width), "num_classes": grid.model.num_classes,
        "kwargs": dict(grid.model.kwargs),
        "classes": list(data.classes), "mean": list(mean), "std": list(std), "dataset": data.name,
        "train_images": len(data.train), "calibration_images": len(data.calibration),
        "calibration_holdout": data.holdout.as_dict() if data.holdout else None,
        "recipe": recipe.model_dump(), "epoch_losses": losses, "test_accuracy": accuracy,
        "test_images": len(data.test), "seed": grid.seed, "train_seconds": round(seconds, 1),
        "device": str(device), "versions": versions(), "created": datetime.now(timezone.utc).isoformat(),
    }
    digest = checkpoints.save(grid.checkpoint.path, model.cpu(), meta)
    log.info("test accuracy %.2f%% after %.0f s; wrote %s (sha256 %s)", accuracy, seconds,
             grid.checkpoint.path, short(digest))
    log_to.trained(str(grid.checkpoint.path), digest, meta)
    return str(Path(grid.checkpoint.path))


def ensure_checkpoint(grid: Grid, data: Dataset, loaded: Checkpoint | None = None,
                      log_to: TrainLog | None = None) -> Checkpoint:
    """The shared checkpoint (trained first, reporting to `log_to`, when it is missing and the grid has a
    recipe), checked against the data it will be evaluated on."""
    loaded = loaded or checkpoints.existing(grid)
    if loaded is None:
        log.info("checkpoint %s is missing: training it first", grid.checkpoint.path)
        train_checkpoint(grid, data, log_to=log_to)
        loaded = checkpoints.load_for(grid)
    check_trained_on(grid, loaded, data.name, data.classes)
    return loaded


@dataclass
class SweepCheckpoint:
    """The sweep's checkpoint, owned in one place: opened once (its hold-out checked before anything starts),
    trained when missing, and checked once against the data it is evaluated on."""

    grid: Grid
    loaded: Checkpoint | None  # None until trained
    holdout: str = "unknown"  # the hold-out verdict (checkpoints.check_holdout)
    checked: bool = False  # against the data's classes

    @classmethod
    def open(cls, grid: Grid) -> "SweepCheckpoint":
        """The checkpoint on disk, if any (None: to be trained)."""
        return cls(grid, checkpoints.existing(grid))

    def check_holdout(self, holdout: Holdout | None) -> None:
        """An existing checkpoint's calibration hold-out against the sweep's, before anything starts."""
        if self.loaded is not None:
            self.holdout = checkpoints.check_holdout(self.grid, self.loaded, holdout)

    def ready(self, data: Dataset, log_to: TrainLog | None = None) -> Checkpoint:
        """The checkpoint, trained first when missing (its hold-out then checked against `data`'s), checked
        against `data`'s classes once."""
        if self.loaded is None:
            self.loaded = ensure_checkpoint(self.grid, data, None, log_to)
            self.holdout = checkpoints.check_holdout(self.grid, self.loaded, data.holdout)
        elif not self.checked:
            ensure_checkpoint(self.grid, data, self.loaded)
        self.checked = True
        return self.loaded
def check_trained_on(grid: Grid, loaded: Checkpoint, dataset: str, classes: tuple[str, ...]) -> None:
    """A checkpoint of ours must have been trained on the dataset and classes the grid evaluates."""
    trained_on = loaded.meta.get("dataset"), tuple(loaded.meta.get("classes", ()))
    if not loaded.meta.get("foreign") and trained_on != (dataset, tuple(classes)):
        raise InputError(checkpoints.FIELD, grid.checkpoint.path, f"trained on {trained_on[0]} with classes "
                         f"{', '.join(trained_on[1][:3])}..., but the grid evaluates {dataset}",
                         "a checkpoint trained on the grid's dataset", "point checkpoint.path at one, or retrain")
