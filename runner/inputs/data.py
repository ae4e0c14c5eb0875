"""Datasets as uint8 arrays with train / calibration / test splits, and their device-resident tensors.

Four kinds (docs/data.md): `synthetic` (embedded, no download), `cifar10` (torchvision's folder), `npz`
(your arrays) and `imagefolder` (class subfolders of image files, decoded once into an array cache). The
calibration split is held out of train (seeded) and never trained on; the eval and train subsets are the first
images of their split in `data.order` (runner.inputs.order). Everything after loading works on tensors:
normalisation and augmentation run on the device, no per-sample PIL transforms.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from runner.basics import short
from runner.config import DataConfig
from runner.engine.images import Images
from runner.errors import InputError
from runner.inputs import synthetic
from runner.inputs.order import Subset, arranged
from runner.storage import atomic_path

log = logging.getLogger(__name__)

IMAGE_SHAPE = (32, 32, 3)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Holdout:
    """Which training images are held out for calibration (never trained on): the split's seed, how many of how
    many, and the sha256 of the sorted indices into the train split (int64, little-endian). A checkpoint trained
    here records it; a sweep checks its own against it."""

    seed: int
    size: int
    total: int
    sha256: str

    @classmethod
    def of(cls, total: int, size: int, seed: int) -> "Holdout":
        index = holdout_index(total, size, seed)
        return cls(seed, size, total, hashlib.sha256(index.astype("<i8").tobytes()).hexdigest())

    def as_dict(self) -> dict:
        return {"seed": self.seed, "size": self.size, "total": self.total, "sha256": self.sha256}

    def describe(self) -> str:
        return f"seed {self.seed}, {self.size:,} of {self.total:,} train images (indices sha256 {short(self.sha256)})"


def holdout_index(total: int, size: int, seed: int) -> np.ndarray:
    """The held-out train images: `size` of `total`, drawn with `seed`, sorted."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:size])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Images
    calibration: Images
    test: Images
    classes: tuple[str, ...]
    holdout: Holdout | None = None  # the calibration split of the train images
    order: str = "given"  # the order the subsets were taken in (data.order, resolved)
    test_split: int = 0  # how many test images the split holds (`test` is its eval images)

    def eval_words(self) -> str:
        """Which test images the eval images are, and of how many classes, in words."""
        n = len(self.test)
        where = f"all {n:,} test images" if n >= self.test_split else \
            f"the first {n:,} of {self.test_split:,}" + (" in data.order: stratified" if self.order == "stratified"
                                                         else "")
        return f"{where}; {class_words(self.test.labels)}"

    def subsets(self) -> dict[str, dict[str, int]]:
        """Images and classes of each part (the eval images, the calibration hold-out, the train images kept),
        with the fewest and most images of a class: what the W&B runs' config records."""
        parts = {"eval": self.test, "calibration": self.calibration, "train": self.train}
        return {name: class_counts(part.labels) for name, part in parts.items() if len(part)}

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images, in [0, 1] units (the normalisation)."""
        x = self.train.images.reshape(-1, 3).astype(np.float64) / 255
        return tuple(x.mean(0).round(4).tolist()), tuple(x.std(0).round(4).tolist())


def _synthetic(cfg: DataConfig, seed: int) -> tuple[Images, Images, tuple[str, ...]]:
    train = Images(*synthetic.generate(cfg.synthetic_train, seed=1000 + seed))
    test = Images(*synthetic.generate(cfg.synthetic_test, seed=2000 + seed))
    return train, test, synthetic.CLASSES


def _synthetic_holdout(cfg: DataConfig, seed: int) -> tuple[Images, Images, tuple[str, ...]]:
    """The synthetic train split's calibration hold-out alone (the same images as the whole split's rows; the
    others are never drawn), and the test split."""
    held = holdout_index(cfg.synthetic_train, cfg.calibration_size, seed)
    calibration = Images(*synthetic.generate(cfg.synthetic_train, seed=1000 + seed, rows=held))
    return calibration, Images(*synthetic.generate(cfg.synthetic_test, seed=2000 + seed)), synthetic.CLASSES


def _cifar10(cfg: DataConfig, seed: int) -> tuple[Images, Images, tuple[str, ...]]:
    import torchvision  # imported here: only this loader needs it

    try:
        sets = [torchvision.datasets.CIFAR10(cfg.root, train=t, download=cfg.download) for t in (True, False)]
    except (RuntimeError, OSError) as e:
        reason = "not there and download: false" if not cfg.download else f"download failed ({type(e).__name__})"
        raise InputError("data.root", cfg.root, f"no CIFAR-10 copy ({reason})",
                         "a folder holding torchvision's cifar-10-batches-py, or network access with download: true",
                         "download it once on a connected machine, or use dataset: npz with your arrays "
                         "(data.train / data.test), or dataset: synthetic") from None
    train, test = (Images(np.asarray(s.data, np.uint8), np.asarray(s.targets, np.int64)) for s in sets)
    return train, test, CIFAR10_CLASSES


def _npz(cfg: DataConfig, seed: int) -> tuple[Images, Images, tuple[str, ...]]:
    train, classes = read_npz(cfg.train, "data.train")
    test, test_classes = read_npz(cfg.test, "data.test")
    if classes and test_classes and classes != test_classes:
        raise InputError("data.test", cfg.test, "its classes differ from the train file's",
                         "the same class names in the same order", "write both files with one class list")
    return train, test, classes or test_classes


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _imagefolder(cfg: DataConfig, seed: int) -> tuple[Images, Images, tuple[str, ...]]:
    """train/ and test/ (or val/) folders of class subfolders, decoded once into a uint8 array cache."""
    train_dir, test_dir, classes = _folders(cfg)
    size = cfg.image_size or IMAGE_SHAPE[0]
    resize = cfg.resize or round(size * 8 / 7)
    return (_decoded(_files(train_dir, classes), size, resize, cfg.cache, train_dir, "train"),
            _decoded(_files(test_dir, classes), size, resize, cfg.cache, test_dir, "test"), classes)


def folder_labels(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """An image folder's train and test labels, in the order it is read, from its file names alone."""
    train_dir, test_dir, classes = _folders(cfg)
    return tuple(np.array([i for _, i in _files(folder, classes)], np.int64) for folder in (train_dir, test_dir))


def _folders(cfg: DataConfig) -> tuple[Path, Path, tuple[str, ...]]:
    """An image folder's train and test folders, checked, and its classes (the train folder's subfolders)."""
    root = Path(cfg.root)
    train_dir = Path(cfg.train) if cfg.train else root / "train"
    test_dir = Path(cfg.test) if cfg.test else next((root / n for n in ("test", "val") if (root / n).is_dir()),
                                                    root / "test")
    for key, folder in (("train", train_dir), ("test", test_dir)):
        if not folder.is_dir():
            raise InputError(f"data.{key}" if getattr(cfg, key) else "data.root", str(folder), "no such folder",
                             "a folder of class subfolders of images (root/train, root/test or root/val)",
                             "fix data.root, or give data.train and data.test")
    classes = tuple(sorted(d.name for d in train_dir.iterdir() if d.is_dir()))
    if not classes:
        raise InputError("data.root", str(train_dir), "no class subfolders", "train/<class>/<image files>",
                         "put each class's images in a subfolder named after it")
    return train_dir, test_dir, classes


def _files(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(image file, class index) class by class, each class's files sorted by name: the folder's given order."""
    return [(f, i) for i, c in enumerate(classes) if (folder / c).is_dir()
            for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]


def _decoded(files: list[tuple[Path, int]], size: int, resize: int, cache: str | None, folder: Path,
             part: str) -> Images:
    key = hashlib.sha256(repr((size, resize, [(str(f), f.stat().st_size, f.stat().st_mtime_ns, i)
                                              for f, i in files])).encode()).hexdigest()[:16]
    path = Path(cache) / f"{part}-{key}.npz" if cache else folder.parent / f".prune-sweep-{part}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            return Images(npz["images"], npz["labels"])
    images = np.empty((len(files), size, size, 3), np.uint8)
    for n, (f, _) in enumerate(tqdm(files, desc=f"decoding {part}", unit="img", disable=not sys.stderr.isatty())):
        images[n] = _decode(f, size, resize)
    labels = np.array([i for _, i in files], np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as out:
            np.savez(out, images=images, labels=labels)
    log.info("decoded %d %s images into %s", len(files), part, path)
    return Images(images, labels)


def _decode(f: Path, size: int, resize: int) -> np.ndarray:
    """Shorter side to `resize` (bilinear, antialiased), then the center `size` x `size` crop, RGB."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resize / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError("data.root", f.name, f"unreadable image {f} ({type(e).__name__})", "image files PIL can "
                         "read", "remove or replace that file") from None


LOADERS: dict[str, Callable[[DataConfig, int], tuple[Images, Images, tuple[str, ...]]]] = {
    "synthetic": _synthetic,
    "cifar10": _cifar10,
    "npz": _npz,
    "imagefolder": _imagefolder,
}


def read_npz(path: str, field: str) -> tuple[Images, tuple[str, ...]]:
    """Arrays `images` uint8 [N,32,32,3], `labels` int [N] and optional `classes` str, checked, no pickle."""
    def bad(problem: str, value: object, allowed: str, fix: str) -> InputError:
        return InputError(field, value, problem, allowed, fix)

    if not Path(path).is_file():
        raise bad("no such file", path, "an existing .npz file", "check the path")
    if not zipfile.is_zipfile(path):  # np.load would also take .npy files and (refused) raw pickles
        raise bad("not a readable .npz file (not a whole zip archive)", path, "a file written by numpy.savez",
                  "save the arrays with numpy.savez(path, images=..., labels=...)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise bad("holds object arrays (pickled Python objects), which are never loaded", path,
                      "numeric arrays and a str classes array", "save plain arrays with numpy.savez") from None
        raise bad(f"not a readable .npz file ({e})", path, "a file written by numpy.savez", "rewrite it") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise bad(f"not a readable .npz file ({type(e).__name__})", path, "a file written by numpy.savez",
                  "rewrite it with numpy.savez") from None
    for key in ("images", "labels"):
        if key not in arrays:
            raise bad(f"no '{key}' array", sorted(arrays), "arrays named images, labels (and optionally classes)",
                      "save them under those names")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise bad("images has the wrong dtype or shape", f"{images.dtype} {list(images.shape)}",
                  "uint8 [N, 32, 32, 3] (HWC, RGB, 0-255)", "convert with images.astype(np.uint8) in HWC order")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise bad("labels has the wrong dtype or shape", f"{labels.dtype} {list(labels.shape)}",
                  "integers [N]", "save labels as an int64 vector")
    if len(labels) != len(images):
        raise bad("images and labels differ in length", f"{len(images)} images, {len(labels)} labels",
                  "one label per image", "save matching arrays")
    if len(labels) and labels.min() < 0:
        raise bad("negative label", int(labels.min()), "labels 0 .. num_classes - 1", "fix the labels")
    classes = tuple(str(c) for c in arrays["classes"].tolist()) if "classes" in arrays else ()
    return Images(images, labels.astype(np.int64)), classes


def check_labels(part: Images, num_classes: int, field: str) -> None:
    if len(part) and part.labels.max() >= num_classes:
        raise InputError(field, int(part.labels.max()), "label out of range",
                         f"labels 0 .. {num_classes - 1} (model.num_classes = {num_classes})",
                         "fix the labels or model.num_classes")


def load_data(cfg: DataConfig, num_classes: int, seed: int, training: bool = True, scored: bool = False) -> Dataset:
    """Load a dataset, check it against the model's class count, hold out the calibration split, take the eval and
    train subsets in `data.order` (refused in a file's order that is by class: `check_order`; `scored`: the test
    images after the eval ones are scored too, plan.score_on: test).

    `training=False` (a sweep whose checkpoint exists: it ranks and evaluates, it does not train): the training
    images other than the hold-out are not kept (`Dataset.train` is empty), and synthetic data does not even
    draw them; the hold-out and the test images are the same."""
    held_only = cfg.dataset == "synthetic" and not training
    train, test, classes = (_synthetic_holdout if held_only else LOADERS[cfg.dataset])(cfg, seed)
    total = cfg.synthetic_train if held_only else len(train)
    check_shape(cfg, num_classes, Shape(total, len(test), classes))
    for name, part in (("train", train), ("test", test)):
        check_labels(part, num_classes, f"data.{name}")
    check_order(cfg, test.labels, None if held_only else train.labels, seed, scored)
    if held_only:
        calibration, train = train, train.take(slice(0))
    else:
        held = holdout_index(total, cfg.calibration_size, seed)
        kept = _kept(cfg, train.labels, held, seed) if training else slice(0)
        train, calibration = train.take(kept), train.take(held)
    order = _test_order(cfg, test.labels, seed)
    names = classes or tuple(f"class{i}" for i in range(num_classes))
    return Dataset(cfg.dataset, train, calibration, test if order is None else test.take(order[: cfg.eval_size]),
                   names, Holdout.of(total, cfg.calibration_size, seed), cfg.resolved_order, len(test))


def _test_order(cfg: DataConfig, labels: np.ndarray, seed: int) -> np.ndarray | None:
    """The test split in `data.order` when the eval images are part of it; None when they are all of it."""
    if cfg.eval_size is None or cfg.eval_size >= len(labels):
        return None
    return arranged(labels, cfg.resolved_order, seed, "test")


def _kept(cfg: DataConfig, labels: np.ndarray, held: np.ndarray, seed: int) -> np.ndarray:
    """The train images kept for training: those not held out, their first `train_size` in `data.order`."""
    kept = np.setdiff1d(np.arange(len(labels)), held)
    if cfg.train_size is None or cfg.train_size >= len(kept):
        return kept
    return kept[arranged(labels[kept], cfg.resolved_order, seed, "train")][: cfg.train_size]


def unseen(cfg: DataConfig, seed: int) -> tuple[Images, int]:
    """The test images the eval images leave out (plan.score_on: test), in `data.order`, and how many test images
    there are in all; loaded again, as the sweep keeps only its eval images."""
    _, test, _ = (_synthetic_holdout if cfg.dataset == "synthetic" else LOADERS[cfg.dataset])(cfg, seed)
    order = _test_order(cfg, test.labels, seed)
    return (test.take(slice(0)) if order is None else test.take(order[cfg.eval_size:])), len(test)


def check_order(cfg: DataConfig, test_labels: np.ndarray, train_labels: np.ndarray | None, seed: int,
                scored: bool = False) -> None:
    """In `data.order: given`, refuse an eval, score or train subset whose labels come grouped by class
    (runner.inputs.order.grouped): one line naming the key, what was seen and the fix. `train_labels`: the whole
    train split's (None: not at hand, as synthetic data without its training images)."""
    if cfg.resolved_order != "given":
        return
    subsets, n = [], cfg.eval_size
    if n is not None and n < len(test_labels):
        subsets.append(Subset("data.eval_size", n, f"the first {n:,} test images", test_labels[:n], test_labels))
        if scored:
            subsets.append(Subset("data.order", "given", f"the {len(test_labels) - n:,} test images after the "
                                  f"first {n:,} (plan.score_on: test)", test_labels[n:], test_labels))
    if train_labels is not None and cfg.train_size is not None:
        kept = np.setdiff1d(np.arange(len(train_labels)),
                            holdout_index(len(train_labels), cfg.calibration_size, seed))
        if cfg.train_size < len(kept):
            subsets.append(Subset("data.train_size", cfg.train_size, f"the first {cfg.train_size:,} training "
                                  "images (after the calibration hold-out)", train_labels[kept[: cfg.train_size]],
                                  train_labels[kept]))
    for subset in subsets:
        subset.check(_order_fix(cfg, "train" if subset.field == "data.train_size" else "test"))


def _order_fix(cfg: DataConfig, split: str) -> str:
    if cfg.dataset == "npz":
        return f"set data.order: stratified, or shuffle data.{split}'s images and labels together"
    if cfg.dataset == "imagefolder":
        return "set data.order: stratified (or null, an image folder's default)"
    return "set data.order: stratified"


def class_counts(labels: np.ndarray) -> dict[str, int]:
    """How many images, of how many classes, and the fewest and most images of a class among them."""
    counts = np.unique(labels, return_counts=True)[1]
    return {"images": len(labels), "classes": len(counts), "per_class_min": int(counts.min()) if len(counts) else 0,
            "per_class_max": int(counts.max(initial=0))}


def class_words(labels: np.ndarray) -> str:
    """Of how many classes the images are, in words: "10 classes, 20 per class" (or "18-22 per class")."""
    c = class_counts(labels)
    low, high = c["per_class_min"], c["per_class_max"]
    return f"{c['classes']} classes, {low:,}{'' if low == high else f'-{high:,}'} per class"


def test_span(cfg: DataConfig, start: int, stop: int) -> str:
    """Which test images the positions start+1 .. stop of the split's order are, in words."""
    span = f"{cfg.dataset} test images {start + 1:,}-{stop:,}"
    return span + " in data.order: stratified" if cfg.resolved_order == "stratified" else span


@dataclass(frozen=True)
class Shape:
    """What the checks need of a dataset, known without decoding it: the split sizes and the class names."""

    train: int
    test: int
    classes: tuple[str, ...]

    def names(self, num_classes: int) -> tuple[str, ...]:
        """The class names a loaded Dataset gets (class0, class1, ... when the data names none)."""
        return self.classes or tuple(f"class{i}" for i in range(num_classes))


CIFAR10_SIZES = (50_000, 10_000)


def data_shape(cfg: DataConfig, num_classes: int) -> Shape:
    """The dataset's sizes and classes, read without decoding or downloading (npz files are read and their
    labels checked), for the dry run and the checks made before Ray starts."""
    if cfg.dataset == "synthetic":
        return Shape(cfg.synthetic_train, cfg.synthetic_test, synthetic.CLASSES)
    if cfg.dataset == "cifar10":
        return Shape(*CIFAR10_SIZES, CIFAR10_CLASSES)
    if cfg.dataset == "npz":
        train, test, classes = _npz(cfg, 0)
        for name, part in (("train", train), ("test", test)):
            check_labels(part, num_classes, f"data.{name}")
        return Shape(len(train), len(test), classes)
    train_dir, test_dir, classes = _folders(cfg)
    return Shape(len(_files(train_dir, classes)), len(_files(test_dir, classes)), classes)


def check_shape(cfg: DataConfig, num_classes: int, shape: Shape) -> None:
    """The data against the grid: its class count, the calibration hold-out and the eval images it asks for."""
    if shape.classes and len(shape.classes) != num_classes:
        raise InputError("model.num_classes", num_classes, f"the data has {len(shape.classes)} classes",
                         f"{len(shape.classes)}", f"set model.num_classes: {len(shape.classes)}")
    if cfg.calibration_size >= shape.train:
        raise InputError("data.calibration_size", cfg.calibration_size, "not smaller than the train split",
                         f"1 .. {shape.train - 1}", "hold out fewer images")
    if cfg.eval_size is not None and cfg.eval_size > shape.test:
        raise InputError("data.eval_size", cfg.eval_size, "larger than the test split",
                         f"1 .. {shape.test}, or null for all", f"set data.eval_size: {shape.test} or null")


def checked_shape(cfg: DataConfig, num_classes: int) -> Shape:
    """`data_shape`, checked by `check_shape`: every check `load_data` makes, without loading."""
    shape = data_shape(cfg, num_classes)
    check_shape(cfg, num_classes, shape)
    return shape


def planned_holdout(cfg: DataConfig, seed: int) -> Holdout | None:
    """The hold-out a grid will draw, known before loading when the train split's size is (synthetic data)."""
    return Holdout.of(cfg.synthetic_train, cfg.calibration_size, seed) if cfg.dataset == "synthetic" else None
