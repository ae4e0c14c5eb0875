"""Datasets: the npz reader's checks, load_data's splits and checks, the synthetic set, CIFAR-10 arrays."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from runner.config import DataConfig
from runner.engine.images import Images, augment, to_device
from runner.errors import InputError
from runner.inputs import synthetic
from runner.inputs.data import CIFAR10_CLASSES, Dataset, Holdout, holdout_index, load_data, planned_holdout, read_npz

NPZ_FILE = "allowed: a file written by numpy.savez; fix: rewrite it with numpy.savez"


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def savez(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def npz_error(path, field: str = "data.train") -> str:
    with pytest.raises(InputError) as err:
        read_npz(str(path), field)
    assert err.value.field == field
    return str(err.value)


def rows(a: np.ndarray) -> set[bytes]:
    return {hashlib.sha256(x.tobytes()).digest() for x in a}


# --- read_npz --------------------------------------------------------------------------------------------------

def test_read_npz_reads_images_labels_classes(tmp_path):
    imgs, labels = images(5), np.array([4, 0, 3, 1, 2], np.int32)
    got, classes = read_npz(savez(tmp_path / "a.npz", images=imgs, labels=labels,
                                  classes=np.array(["v", "w", "x", "y", "z"])), "data.train")
    assert classes == ("v", "w", "x", "y", "z")
    assert len(got) == 5
    assert np.array_equal(got.images, imgs)
    assert got.labels.dtype == np.int64 and got.labels.tolist() == [4, 0, 3, 1, 2]


def test_read_npz_without_classes(tmp_path):
    got, classes = read_npz(savez(tmp_path / "a.npz", images=images(2), labels=np.array([1, 1], np.uint8)),
                            "data.test")
    assert classes == ()
    assert got.labels.tolist() == [1, 1] and got.labels.dtype == np.int64


def test_read_npz_no_such_file(tmp_path):
    path = tmp_path / "missing.npz"
    assert npz_error(path) == (f"data.train: no such file: got '{path}'; allowed: an existing .npz file; "
                               "fix: check the path")


@pytest.mark.parametrize("arrays", [
    {"images": images(5), "labels": np.array([0, "a", None], dtype=object)},
    {"images": images(5), "labels": np.arange(5), "classes": np.array(["cat", 1], dtype=object)},
    {"images": np.array([object()] * 4, dtype=object), "labels": np.zeros(4)},
], ids=["object labels", "object classes", "object images"])
def test_read_npz_refuses_object_arrays(tmp_path, arrays):
    path = savez(tmp_path / "obj.npz", **arrays)
    assert npz_error(path) == (
        f"data.train: holds object arrays (pickled Python objects), which are never loaded: got '{path}'; "
        "allowed: numeric arrays and a str classes array; fix: save plain arrays with numpy.savez")


@pytest.mark.parametrize("arrays, message", [
    ({"labels": np.arange(5)},
     "no 'images' array: got ['labels']; allowed: arrays named images, labels (and optionally classes); "
     "fix: save them under those names"),
    ({"images": images(5), "targets": np.arange(5)},
     "no 'labels' array: got ['images', 'targets']; allowed: arrays named images, labels (and optionally "
     "classes); fix: save them under those names"),
    ({"images": images(5).astype(np.float32), "labels": np.arange(5)},
     "images has the wrong dtype or shape: got 'float32 [5, 32, 32, 3]'; allowed: uint8 [N, 32, 32, 3] "
     "(HWC, RGB, 0-255); fix: convert with images.astype(np.uint8) in HWC order"),
    ({"images": images(5).transpose(0, 3, 1, 2), "labels": np.arange(5)},
     "images has the wrong dtype or shape: got 'uint8 [5, 3, 32, 32]'; allowed: uint8 [N, 32, 32, 3] "
     "(HWC, RGB, 0-255); fix: convert with images.astype(np.uint8) in HWC order"),
    ({"images": images(5)[:, :, :, 0], "labels": np.arange(5)},
     "images has the wrong dtype or shape: got 'uint8 [5, 32, 32]'; allowed: uint8 [N, 32, 32, 3] "
     "(HWC, RGB, 0-255); fix: convert with images.astype(np.uint8) in HWC order"),
    ({"images": images(5), "labels": np.arange(5.0)},
     "labels has the wrong dtype or shape: got 'float64 [5]'; allowed: integers [N]; "
     "fix: save labels as an int64 vector"),
    ({"images": images(5), "labels": np.arange(5)[:, None]},
     "labels has the wrong dtype or shape: got 'int64 [5, 1]'; allowed: integers [N]; "
     "fix: save labels as an int64 vector"),
    ({"images": images(2), "labels": np.array([True, False])},
     "labels has the wrong dtype or shape: got 'bool [2]'; allowed: integers [N]; "
     "fix: save labels as an int64 vector"),
    ({"images": images(5), "labels": np.arange(4)},
     "images and labels differ in length: got '5 images, 4 labels'; allowed: one label per image; "
     "fix: save matching arrays"),
    ({"images": images(5), "labels": np.array([0, 1, -3, 2, -1])},
     "negative label: got -3; allowed: labels 0 .. num_classes - 1; fix: fix the labels"),
], ids=["no images", "no labels", "float images", "CHW images", "grey images", "float labels", "2-D labels",
        "bool labels", "length mismatch", "negative label"])
def test_read_npz_rejects(tmp_path, arrays, message):
    path = savez(tmp_path / "bad.npz", **arrays)
    assert npz_error(path, "data.test") == f"data.test: {message}"


def test_read_npz_truncated_file(tmp_path):
    good = (tmp_path / "good.npz")
    savez(good, images=images(20), labels=np.arange(20))
    path = tmp_path / "cut.npz"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert npz_error(path) == (f"data.train: not a readable .npz file (not a whole zip archive): got '{path}'; "
                               "allowed: a file written by numpy.savez; fix: save the arrays with "
                               "numpy.savez(path, images=..., labels=...)")


def test_read_npz_text_file_is_not_an_npz(tmp_path):
    path = tmp_path / "labels.npz"
    path.write_text("0,1,2\n")
    assert "not a readable .npz file" in npz_error(path)


def test_read_npz_npy_file_is_not_an_npz(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, images(3))
    assert "not a readable .npz file" in npz_error(path)


# --- load_data -------------------------------------------------------------------------------------------------

@pytest.fixture
def npz_pair(tmp_path):
    train = savez(tmp_path / "train.npz", images=images(50, 1), labels=np.arange(50) % 10)
    test = savez(tmp_path / "test.npz", images=images(20, 2), labels=np.arange(20) % 10)
    return train, test


def npz_config(train: str, test: str, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "npz", "train": train, "test": test, "calibration_size": 10, **kw})


def load_error(cfg: DataConfig, num_classes: int = 10) -> InputError:
    with pytest.raises(InputError) as err:
        load_data(cfg, num_classes, 0)
    return err.value


def test_load_data_splits_npz(npz_pair):
    train, test = npz_pair
    data = load_data(npz_config(train, test, eval_size=15), 10, 0)
    assert (len(data.train), len(data.calibration), len(data.test)) == (40, 10, 15)
    assert data.name == "npz"
    assert data.classes == tuple(f"class{i}" for i in range(10))
    source = np.load(train)["images"]
    held, kept = rows(data.calibration.images), rows(data.train.images)
    assert not held & kept  # the calibration images are never trained on
    assert held | kept == rows(source)
    assert np.array_equal(data.test.images, np.load(test)["images"][:15])  # the first eval_size test images


def test_load_data_hold_out_depends_on_seed(npz_pair):
    cfg = npz_config(*npz_pair)
    a, b, c = load_data(cfg, 10, 0), load_data(cfg, 10, 0), load_data(cfg, 10, 1)
    assert np.array_equal(a.calibration.images, b.calibration.images)
    assert rows(a.calibration.images) != rows(c.calibration.images)


def test_load_data_train_size(npz_pair):
    data = load_data(npz_config(*npz_pair, train_size=7), 10, 0)
    assert (len(data.train), len(data.calibration)) == (7, 10)


def test_load_data_label_out_of_range(tmp_path, npz_pair):
    train, _ = npz_pair
    test = savez(tmp_path / "t12.npz", images=images(20), labels=np.arange(20) % 12)
    err = load_error(npz_config(train, test))
    assert str(err) == ("data.test: label out of range: got 11; allowed: labels 0 .. 9 (model.num_classes = 10); "
                        "fix: fix the labels or model.num_classes")


def test_load_data_train_label_out_of_range(npz_pair):
    train, test = npz_pair
    assert str(load_error(npz_config(train, test), num_classes=5)) == (
        "data.train: label out of range: got 9; allowed: labels 0 .. 4 (model.num_classes = 5); "
        "fix: fix the labels or model.num_classes")


@pytest.mark.parametrize("size", [50, 51])
def test_load_data_calibration_size_too_large(npz_pair, size):
    assert str(load_error(npz_config(*npz_pair, calibration_size=size))) == (
        f"data.calibration_size: not smaller than the train split: got {size}; allowed: 1 .. 49; "
        "fix: hold out fewer images")


def test_load_data_eval_size_too_large(npz_pair):
    assert str(load_error(npz_config(*npz_pair, eval_size=21))) == (
        "data.eval_size: larger than the test split: got 21; allowed: 1 .. 20, or null for all; "
        "fix: set data.eval_size: 20 or null")


def test_load_data_class_count_mismatch(tmp_path, npz_pair):
    _, test = npz_pair
    train = savez(tmp_path / "named.npz", images=images(50), labels=np.arange(50) % 10,
                  classes=np.array(list("abcdefghij")))
    assert str(load_error(npz_config(train, test), num_classes=12)) == (
        "model.num_classes: the data has 10 classes: got 12; allowed: 10; fix: set model.num_classes: 10")
    assert load_data(npz_config(train, test), 10, 0).classes == tuple("abcdefghij")


def test_load_data_train_and_test_classes_differ(tmp_path):
    names = list("abcdefghij")
    train = savez(tmp_path / "tr.npz", images=images(50), labels=np.arange(50) % 10, classes=np.array(names))
    test = savez(tmp_path / "te.npz", images=images(20), labels=np.arange(20) % 10,
                 classes=np.array(names[::-1]))
    err = load_error(npz_config(train, test))
    assert err.field == "data.test"
    assert "its classes differ from the train file's" in str(err)


# --- synthetic -------------------------------------------------------------------------------------------------

def test_synthetic_is_a_pure_function_of_seed():
    a_images, a_labels = synthetic.generate(300, seed=7)
    b_images, b_labels = synthetic.generate(300, seed=7)
    assert a_images.tobytes() == b_images.tobytes()
    assert a_labels.tobytes() == b_labels.tobytes()
    c_images, c_labels = synthetic.generate(300, seed=8)
    assert (c_images != a_images).mean() > 0.9
    assert not np.array_equal(c_labels, a_labels)


def test_synthetic_shapes_dtypes_and_classes():
    imgs, labels = synthetic.generate(2000, seed=0)
    assert imgs.shape == (2000, 32, 32, 3) and imgs.dtype == np.uint8
    assert labels.shape == (2000,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 150 and counts.max() <= 250  # every class, roughly balanced
    assert len(synthetic.CLASSES) == len(set(synthetic.CLASSES)) == 10
    assert 20 < imgs.mean() < 235 and imgs.std() > 20  # images, not blank frames


def test_synthetic_dataset_splits_are_disjoint(tiny_grid):
    data = load_data(tiny_grid.data, 10, tiny_grid.seed)
    assert (len(data.train), len(data.calibration), len(data.test)) == (500, 100, 200)
    assert data.classes == synthetic.CLASSES
    train, held, test = rows(data.train.images), rows(data.calibration.images), rows(data.test.images)
    assert len(train) == 500 and len(held) == 100 and len(test) == 200
    assert not train & held and not train & test and not held & test


def test_the_holdout_record_names_the_calibration_split(tiny_grid):
    data = load_data(tiny_grid.data, 10, tiny_grid.seed)
    held = holdout_index(600, 100, 0)
    assert (data.holdout.seed, data.holdout.size, data.holdout.total) == (0, 100, 600)
    assert data.holdout.sha256 == hashlib.sha256(held.astype("<i8").tobytes()).hexdigest()
    train_images, _ = synthetic.generate(600, seed=1000)  # the synthetic train split of grid seed 0
    assert np.array_equal(data.calibration.images, train_images[held])  # the record is of these images
    assert planned_holdout(tiny_grid.data, tiny_grid.seed) == data.holdout  # known before the data is made
    assert planned_holdout(DataConfig(dataset="cifar10"), 0) is None  # its size is known only once loaded
    # another seed or size is another hold-out; the same ones are the same
    assert len({Holdout.of(600, 100, 0).sha256, Holdout.of(600, 100, 1).sha256, Holdout.of(600, 101, 0).sha256,
                Holdout.of(700, 100, 0).sha256}) == 4
    assert Holdout.of(600, 100, 0) == data.holdout
    assert data.holdout.describe() == f"seed 0, 100 of 600 train images (indices sha256 {data.holdout.sha256[:12]})"


# --- tensors ---------------------------------------------------------------------------------------------------

def test_to_device_normalises_to_nchw():
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    imgs[1, 5, 7] = (255, 51, 0)
    x = to_device(imgs, (0.5, 0.2, 0.0), (0.5, 0.1, 1.0), torch.device("cpu"))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[1, :, 5, 7].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, -2.0, 0.0], abs=1e-6)
    cl = to_device(imgs, (0.5, 0.2, 0.0), (0.5, 0.1, 1.0), torch.device("cpu"), channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)


def test_augment_crops_and_flips_deterministically():
    x = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).view(4, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    same = augment(x, torch.Generator().manual_seed(0), pad=0)  # no room to crop: identity or a mirror image
    for i in range(4):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(2))


# --- real CIFAR-10 arrays --------------------------------------------------------------------------------------

def test_cifar10_test_npz(cifar_dir):
    data, classes = read_npz(str(cifar_dir / "cifar10-test.npz"), "data.test")
    assert len(data) == 10_000
    assert classes == CIFAR10_CLASSES
    assert data.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # cat, ship, ship, airplane, frog, ...
    assert classes[data.labels[0]] == "cat"
    assert np.bincount(data.labels).tolist() == [1000] * 10
    assert data.images[0, 0, 0].tolist() == [158, 112, 49]
    stats = Dataset("npz", data, data.take(slice(1)), data.take(slice(1)), classes).stats()
    assert stats == ((0.4942, 0.4851, 0.4504), (0.2467, 0.2429, 0.2616))  # the test images' mean and std


def test_cifar10_npz_load_data(cifar_dir):
    cfg = DataConfig(dataset="npz", train=str(cifar_dir / "cifar10-train.npz"),
                     test=str(cifar_dir / "cifar10-test.npz"), calibration_size=1000, eval_size=500)
    data = load_data(cfg, 10, 0)
    assert (len(data.train), len(data.calibration), len(data.test)) == (49_000, 1000, 500)
    assert data.classes == CIFAR10_CLASSES
    assert isinstance(data.test, Images) and data.test.labels[0] == 3


def _folder(root, sizes):
    from PIL import Image

    for part in ("train", "val"):
        for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            (root / part / c).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.new("RGB", (w, h), colour).save(root / part / c / f"{i}.png")


def test_imagefolder_decoded_once_resized_and_cropped(tmp_path):
    from runner.config import DataConfig
    from runner.inputs.data import load_data

    _folder(tmp_path / "d", [(40, 30), (30, 60), (16, 16)])
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "d"), image_size=16, calibration_size=1,
                     cache=str(tmp_path / "cache"))
    data = load_data(cfg, 2, 0)
    assert data.classes == ("cat", "dog") and len(data.test) == 6
    assert data.test.images.shape == (6, 16, 16, 3) and data.test.images.dtype == np.uint8
    assert data.test.images[0, 8, 8].tolist() == [200, 10, 10] and data.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2
    again = load_data(cfg, 2, 0)  # from the cache
    assert np.array_equal(again.test.images, data.test.images)


def test_imagefolder_unreadable_image_names_the_file(tmp_path):
    from runner.config import DataConfig
    from runner.inputs.data import load_data

    _folder(tmp_path / "d", [(20, 20)])
    bad = tmp_path / "d" / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"not an image")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "d"), image_size=16, calibration_size=1)
    with pytest.raises(InputError) as e:
        load_data(cfg, 2, 0)
    assert str(e.value) == (f"data.root: unreadable image {bad} (UnidentifiedImageError): got 'broken.jpg'; allowed: image "
                            "files PIL can read; fix: remove or replace that file")


def test_a_sweep_without_training_draws_only_the_hold_out_and_gets_the_same_images(tiny_grid):
    """training=False (a sweep whose checkpoint exists): no training images kept, synthetic data draws only the
    calibration hold-out; hold-out, test images, classes and the hold-out's record equal the full load's."""
    full = load_data(tiny_grid.data, 10, tiny_grid.seed)
    lean = load_data(tiny_grid.data, 10, tiny_grid.seed, training=False)
    assert len(full.train) > 0 and len(lean.train) == 0
    for part in ("calibration", "test"):
        a, b = getattr(full, part), getattr(lean, part)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels), part
    assert (lean.holdout, lean.classes, lean.name) == (full.holdout, full.classes, full.name)
    rows = np.array([5, 0, 599, 17])  # any rows, in any order: the full set's bytes
    images, labels = synthetic.generate(600, seed=1000, rows=rows)
    every = synthetic.generate(600, seed=1000)
    assert np.array_equal(images, every[0][rows]) and np.array_equal(labels, every[1][rows])
