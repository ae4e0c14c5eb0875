"""The order subsets are taken in (`data.order`, docs/data.md): a class-sorted image folder and a class-sorted
array file, every subset checked class by class against its split; the refusal of a subset taken in class order.

Every image is one flat colour that names it (red: its class, green and blue: its number in its split), so that
each subset can be traced back to the split's images by its pixels alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from runner.config import DataConfig, parse_grid
from runner.errors import InputError
from runner.inputs.data import check_order, load_data, unseen
from runner.inputs.order import grouped, stratified, turns
from runner.job.folder import identity, resume_check
from runner.inputs.trials import plan_trials
from e2e_helpers import grid_dict, write_grid

CLASSES = ("ant", "bee", "cat", "dog", "eel")


def colour(label: int, number: int) -> tuple[int, int, int]:
    return 40 * label, number % 256, number // 256


def identify(images: np.ndarray) -> list[tuple[int, int]]:
    """(class, number in its split) of each image, read from its first pixel."""
    return [(int(r) // 40, int(g) + 256 * int(b)) for r, g, b in images[:, 0, 0].tolist()]


def sorted_labels(per_class: dict[int, int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in per_class.items()])


def within_one(labels: np.ndarray, split: np.ndarray) -> None:
    """The subset holds every class of its split in proportion, within one image per class."""
    classes, counts = np.unique(split, return_counts=True)
    held = np.array([np.count_nonzero(labels == c) for c in classes])
    share = len(labels) * counts / len(split)
    assert np.all(np.abs(held - share) < 1), (held.tolist(), share.tolist())


# ---- the order itself ----

@pytest.mark.parametrize("counts", [[4, 4, 4], [1, 9], [7, 3, 5, 1], [50, 2, 2, 2, 30], [13, 8, 21, 5, 3, 1],
                                    [300] + [1, 2, 3, 4] * 5])
def test_every_prefix_of_the_stratified_order_holds_each_class_within_one_image_of_its_share(counts):
    labels = sorted_labels(dict(enumerate(counts)))
    order = stratified(labels, seed=3, split="test")
    assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation
    held = np.cumsum(labels[order][:, None] == np.arange(len(counts)), axis=0)  # prefix m: images of each class
    share = np.arange(1, len(labels) + 1)[:, None] * np.array(counts) / len(labels)
    assert np.abs(held - share).max() <= 1 - 1 / (2 * (len(counts) - 1)) + 1e-12  # Tijdeman's bound
    for m in (1, 7, len(labels) // 2, len(labels) - 1):
        within_one(labels[order[:m]], labels)


def test_the_stratified_order_takes_turns_by_class_and_is_seeded():
    assert turns(np.array([3, 3, 2])).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert turns(np.array([1, 3])).tolist() == [1, 0, 1, 1]  # class 1 is behind its 3/4 share at once
    labels = sorted_labels({0: 5, 1: 5, 2: 5})
    order = stratified(labels, 0, "test")
    assert labels[order].tolist() == [0, 1, 2] * 5
    assert np.array_equal(order, stratified(labels, 0, "test"))  # the same on every call
    assert not np.array_equal(order, stratified(labels, 1, "test"))  # seeded: within a class, a shuffle
    assert not np.array_equal(order, stratified(labels, 0, "train"))  # each split its own draw


def test_labels_grouped_by_class_are_told_from_shuffled_ones():
    assert grouped(sorted_labels({0: 20, 1: 20, 2: 20})[:30], 3)  # 1 change, 3 classes
    assert grouped(np.repeat(np.arange(10), 5)[:40], 10)  # a file blocked by class: 7 changes, 10 classes
    assert not grouped(np.arange(200) % 10, 10)
    shuffled = np.random.default_rng(0).permutation(np.arange(50) % 10)
    assert not grouped(shuffled, 10) and not grouped(shuffled[:20], 10) and not grouped(shuffled[:7], 10)
    assert not grouped(np.zeros(30, np.int64), 1)  # one class: nothing to interleave


# ---- a class-sorted array file ----

def write_sorted_npz(path: Path, per_class: int) -> str:
    labels = sorted_labels({c: per_class for c in range(len(CLASSES))})
    images = np.zeros((len(labels), 32, 32, 3), np.uint8)
    images[:] = np.array([colour(c, i) for i, c in enumerate(labels.tolist())], np.uint8)[:, None, None, :]
    np.savez(path, images=images, labels=labels, classes=np.array(CLASSES))
    return str(path)


@pytest.fixture
def sorted_npz(tmp_path):
    return write_sorted_npz(tmp_path / "train.npz", 20), write_sorted_npz(tmp_path / "test.npz", 12)


def npz_config(files, **kw) -> DataConfig:
    train, test = files
    return DataConfig(**{"dataset": "npz", "train": train, "test": test, "calibration_size": 10, "eval_size": 20,
                         "train_size": 30, **kw})


def test_a_class_sorted_array_file_in_stratified_order_gives_subsets_of_every_class(sorted_npz):
    cfg = npz_config(sorted_npz, order="stratified")
    data = load_data(cfg, 5, 0)
    test_split, train_split = np.load(sorted_npz[1])["labels"], np.load(sorted_npz[0])["labels"]
    assert data.order == "stratified" and data.test_split == 60
    within_one(data.test.labels, test_split)
    assert np.bincount(data.test.labels).tolist() == [4] * 5
    held_out = {n for _, n in identify(data.calibration.images)}
    kept = np.setdiff1d(np.arange(100), sorted(held_out))
    within_one(data.train.labels, train_split[kept])  # the train subset: its share of the images kept
    assert not held_out & {n for _, n in identify(data.train.images)}
    rest, total = unseen(cfg, 0)
    assert total == 60 and len(rest) == 40
    within_one(rest.labels, test_split)
    eval_ids, rest_ids = identify(data.test.images), identify(rest.images)
    assert sorted(eval_ids + rest_ids) == [(c, n) for n, c in enumerate(test_split.tolist())]  # split in two
    assert [c for c, _ in eval_ids] == data.test.labels.tolist()  # labels travel with their images
    again = load_data(cfg, 5, 0)  # every trial, resume and rerun: the same images
    assert np.array_equal(again.test.images, data.test.images)
    assert np.array_equal(again.train.images, data.train.images)
    given = load_data(cfg.model_copy(update={"train_size": None, "eval_size": None, "order": "given"}), 5, 0)
    assert np.array_equal(given.calibration.images, data.calibration.images)  # the hold-out: order-free


def test_a_class_sorted_array_file_in_its_own_order_is_refused_in_one_line(sorted_npz):
    cfg = npz_config(sorted_npz)
    assert cfg.resolved_order == "given"  # an array file's default
    with pytest.raises(InputError) as e:
        load_data(cfg, 5, 0)
    assert str(e.value) == (
        "data.eval_size: with data.order: given, the first 20 test images come in class order and hold 2 of 5 "
        "classes: got 20; allowed: a subset that is not in class order, taken from a shuffled file or in "
        "data.order: stratified; fix: set data.order: stratified, or shuffle data.test's images and labels together")
    with pytest.raises(InputError) as e:
        load_data(npz_config(sorted_npz, eval_size=None), 5, 0)
    assert str(e.value) == (
        "data.train_size: with data.order: given, the first 30 training images (after the calibration hold-out) "
        "come in class order and hold 2 of 5 classes: got 30; allowed: a subset that is not in class order, taken "
        "from a shuffled file or in data.order: stratified; fix: set data.order: stratified, or shuffle "
        "data.train's images and labels together")
    whole = load_data(npz_config(sorted_npz, eval_size=None, train_size=None), 5, 0)  # no subset: nothing refused
    assert len(whole.test) == 60


def test_the_score_images_in_class_order_are_refused_when_they_are_scored():
    test = np.concatenate([np.arange(20) % 5, sorted_labels({c: 8 for c in range(5)})])  # shuffled, then sorted
    cfg = DataConfig(dataset="synthetic", eval_size=20)
    check_order(cfg, test, None, 0)  # the eval images are not in class order
    with pytest.raises(InputError) as e:
        check_order(cfg, test, None, 0, scored=True)
    assert str(e.value).startswith("data.order: with data.order: given, the 40 test images after the first 20 "
                                   "(plan.score_on: test) come in class order and hold 5 of 5 classes: got 'given';")


def test_a_shuffled_file_with_small_subsets_is_not_refused(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 60), ("test", 50)):
        np.savez(tmp_path / f"{part}.npz", images=np.zeros((n, 32, 32, 3), np.uint8),
                 labels=rng.permutation(np.arange(n) % 10))
    files = (str(tmp_path / "train.npz"), str(tmp_path / "test.npz"))
    for eval_size, train_size in ((5, 4), (20, 7), (49, 49)):
        data = load_data(npz_config(files, eval_size=eval_size, train_size=train_size), 10, 0)
        assert (len(data.test), len(data.train)) == (eval_size, train_size)


def test_the_dry_run_refuses_a_class_sorted_file_and_the_order_is_the_sweeps_identity(sorted_npz, tmp_path, cli):
    grid = grid_dict(tmp_path, data={"dataset": "npz", "train": sorted_npz[0], "test": sorted_npz[1],
                                     "calibration_size": 10, "eval_size": 20}, model={"num_classes": 5})
    run = cli(["--grid", str(write_grid(tmp_path / "g.yaml", grid)), "--dry-run"], cwd=tmp_path)
    assert run.returncode == 2 and len(run.err_lines) == 1, run.explain()
    assert run.err_lines[0].startswith("error: data.eval_size: with data.order: given, the first 20 test images "
                                       "come in class order and hold 2 of 5 classes: got 20;"), run.explain()
    grid["data"]["order"] = "stratified"
    run = cli(["--grid", str(write_grid(tmp_path / "g.yaml", grid)), "--dry-run"], cwd=tmp_path)
    assert run.returncode == 0, run.explain()
    assert "npz, 100 train and 60 test images" in run.out_lines[0]
    assert "subsets in data.order stratified" in run.out_lines[0]
    # a resume with another order is refused; a sweep recorded before data.order read its files as given
    stratified_grid = parse_grid(grid, "g")
    given_grid = parse_grid({**grid, "data": {**grid["data"], "order": "given"}}, "g")
    saved = {**given_grid.as_dict(), "identity": identity(given_grid, "ab" * 32)}
    del saved["identity"]["data"]["order"]
    stratified_grid.folder.mkdir(parents=True)
    (stratified_grid.folder / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert resume_check(given_grid, plan_trials(given_grid), "ab" * 32)[1] is False
    with pytest.raises(InputError) as e:
        resume_check(stratified_grid, plan_trials(stratified_grid), "ab" * 32)
    assert "the grid changed since this sweep started (data.order: 'given' then, 'stratified' now)" in str(e.value)


# ---- a class-sorted image folder ----

def write_sorted_folder(root: Path, train: int, test: int) -> Path:
    from PIL import Image

    for part, per_class in (("train", train), ("test", test)):
        number = 0
        for c, name in enumerate(CLASSES[:3]):
            (root / part / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), colour(c, number)).save(root / part / name / f"{i:03d}.png")
                number += 1
    return root


def test_a_class_sorted_image_folder_gives_subsets_of_every_class_by_default(tmp_path):
    root = write_sorted_folder(tmp_path / "images", train=8, test=6)
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=8, calibration_size=3, eval_size=6,
                     train_size=6, cache=str(tmp_path / "cache"))
    assert cfg.resolved_order == "stratified"  # an image folder's default
    data = load_data(cfg, 3, 0)
    test_split, train_split = np.repeat(np.arange(3), 6), np.repeat(np.arange(3), 8)
    assert [c for c, _ in identify(data.test.images)] == data.test.labels.tolist()
    assert np.bincount(data.test.labels).tolist() == [2, 2, 2]
    held_out = {n for _, n in identify(data.calibration.images)}
    within_one(data.train.labels, train_split[np.setdiff1d(np.arange(24), sorted(held_out))])
    rest, total = unseen(cfg, 0)
    assert total == 18 and np.bincount(rest.labels).tolist() == [4, 4, 4]
    assert sorted(identify(data.test.images) + identify(rest.images)) == \
        [(c, n) for n, c in enumerate(test_split.tolist())]
    assert data.eval_words() == "the first 6 of 18 in data.order: stratified; 3 classes, 2 per class"
    assert data.subsets()["eval"] == {"images": 6, "classes": 3, "per_class_min": 2, "per_class_max": 2}
    with pytest.raises(InputError) as e:
        load_data(cfg.model_copy(update={"order": "given"}), 3, 0)
    assert str(e.value) == (
        "data.eval_size: with data.order: given, the first 6 test images come in class order and hold 1 of 3 "
        "classes: got 6; allowed: a subset that is not in class order, taken from a shuffled file or in data.order: "
        "stratified; fix: set data.order: stratified (or null, an image folder's default)")


def test_the_reports_first_paragraph_says_which_images_of_how_many_classes(tmp_path):
    from runner.outputs import report

    meta = report.ReportMeta(
        name="t", eval_images=6, dataset="imagefolder", calibration="3 held-out training images (3 classes, 1 per "
        "class)", arch="resnet18", width=0.125, target="output", checkpoint="m.pt", checkpoint_sha256="0" * 64,
        trained_accuracy="90.00%", versions={}, wandb="off",
        eval_classes="the first 6 of 18 in data.order: stratified; 3 classes, 2 per class")
    row = {"layer": "l", "criterion": "l1_norm", "k": 1, "repeat": 0, "fraction": 0.5, "channels": 2,
           "accuracy": 50.0, "baseline_accuracy": 50.0, "accuracy_drop": 0.0, "drop_low": -1.0, "drop_high": 1.0}
    text = report.write_report([row], meta, [], tmp_path, 1).read_text(encoding="utf-8")
    assert "on 6 imagefolder test images (the first 6 of 18 in data.order: stratified; 3 classes, 2 per class), " \
        "measured by every trial" in text
    assert "Channels ranked on 3 held-out training images (3 classes, 1 per class)." in text
