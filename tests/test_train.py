"""Training the shared checkpoint: the loss goes down, runs are reproducible, the file is what the sweep reads."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from e2e_helpers import grid_dict

from model.resnet import build
from runner.config import TrainConfig, parse_grid
from runner.errors import InputError
from runner.inputs import checkpoints, synthetic
from runner.basics import NullTrainLog
from runner.inputs.data import class_counts, load_data
from runner.inputs.train import RECIPES, lr_factor, normalisation, recipe_of, train_checkpoint, train_model
from runner.inputs.train import test_accuracy as accuracy_of

CPU = torch.device("cpu")


def small_grid(tmp, train_size: int, epochs: int, batch_size: int, **recipe):
    raw = grid_dict(tmp, data={"train_size": train_size},
                    checkpoint={"train": {"epochs": epochs, "batch_size": batch_size, **recipe}})
    return parse_grid(raw, "tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run (width 0.125, 200 synthetic images, 3 epochs of 2 steps), written as a checkpoint.

    Cosine schedule: the standard recipe's one-cycle warm-up would spend these few steps at a tiny learning rate.
    """
    grid = small_grid(tmp_path_factory.mktemp("train"), train_size=200, epochs=3, batch_size=100, schedule="cosine")
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    path = train_checkpoint(grid, data, CPU, progress=False)
    return grid, data, path


def test_short_training_lowers_the_loss(trained):
    grid, _, path = trained
    losses = checkpoints.load(path, "resnet18", 0.125, 10).meta["epoch_losses"]
    assert len(losses) == 3
    assert all(math.isfinite(x) for x in losses)
    assert 1.8 < losses[0] < 3.5  # about ln(10) = 2.30 at the start, plus label smoothing and noise
    assert losses[-1] < losses[0] - 0.1


def test_train_checkpoint_writes_what_load_reads(trained):
    grid, data, path = trained
    assert path == grid.checkpoint.path
    ck = checkpoints.load(path, grid.model.arch, grid.model.width, grid.model.num_classes)
    meta = ck.meta
    assert ck.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert (meta["arch"], meta["width"], meta["num_classes"]) == ("resnet18", 0.125, 10)
    assert meta["classes"] == list(synthetic.CLASSES)
    assert (meta["train_images"], meta["calibration_images"], meta["test_images"]) == (200, 100, 200)
    assert (meta["dataset"], meta["seed"], meta["device"]) == ("synthetic", 0, "cpu")
    assert (tuple(meta["mean"]), tuple(meta["std"])) == data.stats()
    assert meta["recipe"] == {**vars(RECIPES["standard"]), "epochs": 3, "batch_size": 100, "schedule": "cosine"}
    assert {"torch", "numpy", "python"} <= set(meta["versions"])
    # test_accuracy is the accuracy of exactly these weights on the test split
    assert 0.0 <= meta["test_accuracy"] <= 100.0
    assert accuracy_of(ck.model, data, CPU, *data.stats()) == pytest.approx(meta["test_accuracy"], abs=0.5)
    # the training images it was trained without: the grid's calibration hold-out
    assert meta["calibration_holdout"] == data.holdout.as_dict()
    assert meta["calibration_holdout"]["size"] == 100 and meta["calibration_holdout"]["seed"] == 0


def test_training_is_deterministic_on_cpu(tmp_path):
    grid = small_grid(tmp_path, train_size=100, epochs=1, batch_size=50)  # two optimizer steps
    data = load_data(grid.data, 10, grid.seed)
    recipe = recipe_of(grid.checkpoint.train)
    (a, a_loss), (b, b_loss) = (train_model(grid, data, recipe, CPU, progress=False) for _ in range(2))
    assert a.training is False and len(a_loss) == 1
    assert a_loss == b_loss
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(grid.seed)
    init = build("resnet18", 0.125, 10).state_dict()
    assert not torch.equal(init["conv1.weight"], sa["conv1.weight"])  # it did train
    assert not torch.equal(init["bn1.running_mean"], sa["bn1.running_mean"])


def test_train_checkpoint_without_a_recipe(tmp_path):
    grid = parse_grid(grid_dict(tmp_path, checkpoint={"train": None}), "tiny")
    with pytest.raises(InputError) as err:
        train_checkpoint(grid, progress=False)
    assert str(err.value) == (
        "checkpoint.train: no training recipe, so the missing checkpoint cannot be made: got None; "
        "allowed: a checkpoint.train section ({recipe: standard, epochs: ...}); "
        f"fix: add checkpoint.train to the grid, or put a checkpoint at {tmp_path / 'tiny.pt'}")
    assert not (tmp_path / "tiny.pt").exists()


def test_recipe_of_overrides_only_what_is_set():
    r = recipe_of(TrainConfig(recipe="seed", epochs=4, lr=0.003))
    assert (r.epochs, r.lr) == (4, 0.003)
    assert (r.optimizer, r.batch_size, r.weight_decay, r.schedule) == ("adam", 512, 1e-5, "seed")
    assert recipe_of(TrainConfig()) == RECIPES["standard"]


def test_the_seed_recipe_normalises_with_mean_and_std_half_as_the_report_did(tmp_path):
    grid = small_grid(tmp_path, train_size=50, epochs=1, batch_size=50, recipe="seed")
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    assert normalisation(recipe_of(grid.checkpoint.train), data) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalisation(RECIPES["standard"], data) == data.stats() != ((0.5,) * 3, (0.5,) * 3)
    started = []

    class Started(NullTrainLog):
        def start(self, config) -> None:
            started.append(config)

    path = train_checkpoint(grid, data, CPU, progress=False, log_to=Started())
    meta = checkpoints.load(path, "resnet18", 0.125, 10).meta
    assert (meta["mean"], meta["std"]) == ([0.5] * 3, [0.5] * 3)  # what the sweep normalises with
    # the training run's W&B config holds what it trained on, class by class (docs/data.md)
    assert started[0]["data_subsets"]["train"] == class_counts(data.train.labels)
    assert started[0]["data_subsets"]["train"]["images"] == 50 and started[0]["train_images"] == 50


@pytest.mark.parametrize("schedule, step, factor", [
    ("onecycle", 0, 0.0),
    ("onecycle", 15, 1.0),  # the end of the 15% warm-up
    ("onecycle", 100, 0.0),
    ("cosine", 0, 1.0),
    ("cosine", 50, 0.5),
    ("cosine", 100, 0.0),
    ("seed", 0, 1.0),
    ("seed", 49, 1.0),  # constant for the first half
    ("seed", 75, 0.5),
    ("seed", 100, 0.0),
])
def test_lr_factor(schedule, step, factor):
    assert lr_factor(schedule, step, 100) == pytest.approx(factor, abs=1e-12)


def test_lr_factor_unknown_schedule():
    with pytest.raises(ValueError, match="^unknown schedule 'step'$"):
        lr_factor("step", 0, 10)


def test_training_continued_from_an_epoch_state_equals_the_uninterrupted_run(tmp_path):
    """What a resumed fine-tuning trial relies on: the state kept after epoch 1 (model, optimizer, the schedule's
    step, the generator of data order and augmentation), saved and read back as the trial does, continues to the
    same weights, losses and learning rates as a run that never stopped."""
    from runner.inputs.train import TrainState, fit_model

    grid = small_grid(tmp_path, train_size=100, epochs=3, batch_size=50, schedule="cosine", optimizer="sgd",
                      lr=0.05)
    data = load_data(grid.data, 10, grid.seed)
    recipe = recipe_of(grid.checkpoint.train)
    mean, std = normalisation(recipe, data)

    class Epochs:
        def __init__(self) -> None:
            self.seen: list[dict] = []

        def start(self, config) -> None: ...

        def epoch(self, values) -> None:
            self.seen.append({k: v for k, v in values.items() if k != "seconds"})

        def trained(self, path, sha256, meta) -> None: ...

    def fresh() -> torch.nn.Module:
        torch.manual_seed(grid.seed)
        return build("resnet18", 0.125, 10)

    states: list[TrainState] = []
    whole = Epochs()
    model, losses = fit_model(fresh(), data.train, recipe, CPU, mean, std, grid.seed, False, whole,
                              keep=lambda s: states.append(TrainState.of(_copied(s.payload(), tmp_path))))
    assert [s.epoch for s in states] == [1, 2, 3] and states[0].step == 2
    after_log = Epochs()
    torch.manual_seed(1234)  # a later process: the global generator elsewhere, restored from the state
    resumed, resumed_losses = fit_model(fresh(), data.train, recipe, CPU, mean, std, grid.seed, False, after_log,
                                        state=states[0])
    assert resumed_losses == losses and after_log.seen == whole.seen[1:]
    sa, sb = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _copied(payload: dict, folder) -> dict:
    """The payload through a file, as the trial writes and reads it (weights only)."""
    path = folder / "state.pt"
    torch.save(payload, path)
    return torch.load(path, weights_only=True)


def test_a_log_file_gets_a_line_at_every_tenth_of_an_epoch(tmp_path, caplog, monkeypatch):
    from runner.inputs.train import _tenths, fit_model

    assert _tenths(20) == {2, 4, 6, 8, 10, 12, 14, 16, 18}
    assert _tenths(3) == {1, 2} and _tenths(1) == set()
    grid = small_grid(tmp_path, train_size=100, epochs=1, batch_size=10, schedule="cosine")
    data = load_data(grid.data, 10, grid.seed)
    recipe = recipe_of(grid.checkpoint.train)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)  # a log file, not a terminal
    with caplog.at_level("INFO", logger="runner.inputs.train"):
        fit_model(build("resnet18", 0.125, 10), data.train, recipe, CPU, *normalisation(recipe, data), grid.seed)
    told = [r.getMessage() for r in caplog.records if "batches" in r.getMessage()]
    assert [t.split(" of ")[0] for t in told] == [f"epoch 1/1: {k}" for k in range(1, 10)]
    assert all("of 10 batches" in t and "s left in the epoch" in t for t in told)
