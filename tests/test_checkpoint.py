"""Checkpoint files: round trip, atomic writes, and one clear InputError for every kind of bad file."""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import scramble_bn

from model import checkpoint
from model.resnet import ResNet18, build
from runner.config import parse_grid
from runner.errors import InputError
from runner.inputs import checkpoints

ARCH = {"arch": "resnet18", "width": 0.125, "num_classes": 10}
RETRAIN = ("allowed: a checkpoint written by scripts/train.py; fix: delete it and run scripts/train.py --grid FILE "
           "(or the sweep, with a checkpoint.train section)")


class FileCreator:
    """A pickle payload that, if unpickled by a full (unsafe) load, creates the file at `target`."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return builtins.open, (self.target, "w")


def model(seed: int = 0, width: float = 0.125) -> ResNet18:
    torch.manual_seed(seed)
    return scramble_bn(build("resnet18", width, 10), seed)


def write(path: Path, m: ResNet18 | None = None, **meta) -> Path:
    checkpoints.save(path, m if m is not None else model(), {**ARCH, **meta})
    return path


def load_error(path: Path, **arch) -> str:
    with pytest.raises(InputError) as err:
        checkpoints.load(path, **{**ARCH, **arch})
    assert err.value.field == "checkpoint.path"
    assert "\n" not in str(err.value)
    return str(err.value)


# --- round trip ----------------------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    net = model(3)
    meta = {**ARCH, "test_accuracy": 87.25, "classes": ["a", "b"], "recipe": {"lr": 0.2, "epochs": 3}}
    path = tmp_path / "nested" / "dir" / "m.pt"  # folders are created
    digest = checkpoints.save(path, net, meta)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.listdir(path.parent) == ["m.pt"]  # the temp file was renamed, nothing left behind
    ck = checkpoints.load(path, "resnet18", 0.125, 10)
    assert ck.meta == meta
    assert ck.sha256 == digest
    assert ck.path == str(path)
    assert ck.model.training is False
    want, got = net.state_dict(), ck.model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ck.model(x), net(x))


def test_plain_weights_only_torch_load_opens_it(tmp_path):
    path = write(tmp_path / "m.pt", test_accuracy=50.0)
    blob = torch.load(path, weights_only=True)
    assert sorted(blob) == ["format", "meta", "state_dict"]
    assert blob["format"] == "prune-sweep/checkpoint/1"
    assert blob["meta"]["test_accuracy"] == 50.0
    assert blob["state_dict"]["conv1.weight"].shape == (8, 3, 3, 3)


def test_sha256_helper_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 << 20))  # larger than the 1 MiB read chunk
    assert checkpoint.sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_different_weights_give_a_different_sha256(tmp_path):
    a = checkpoints.save(tmp_path / "a.pt", model(0), ARCH)
    b = checkpoints.save(tmp_path / "b.pt", model(1), ARCH)
    assert a != b


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = write(tmp_path / "m.pt")
    old = path.read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError)):
        checkpoints.save(path, model(1), {**ARCH, "bad": lambda: None})  # not picklable
    assert os.listdir(tmp_path) == ["m.pt"]
    assert path.read_bytes() == old


# --- errors --------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "none.pt"
    assert load_error(path) == (
        f"checkpoint.path: no such file: got '{path}'; allowed: an existing checkpoint file; "
        "fix: run scripts/train.py --grid FILE, or add a checkpoint.train section to train it")


def test_a_folder_is_not_a_file(tmp_path):
    assert f"checkpoint.path: no such file: got '{tmp_path}'" in load_error(tmp_path)


@pytest.mark.parametrize("arch, diff", [
    ({"width": 0.25}, "width 0.125 (grid: 0.25)"),
    ({"width": 1}, "width 0.125 (grid: 1.0)"),
    ({"num_classes": 100}, "num_classes 10 (grid: 100)"),
    ({"width": 0.25, "num_classes": 100}, "width 0.125 (grid: 0.25), num_classes 10 (grid: 100)"),
])
def test_architecture_mismatch(tmp_path, arch, diff):
    path = write(tmp_path / "m.pt")
    assert load_error(path, **arch) == (
        f"checkpoint.path: architecture mismatch: checkpoint has {diff}: got '{path}'; "
        "allowed: a checkpoint trained with the grid's model section; "
        "fix: point checkpoint.path at a matching file, or change model: to match it")


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    path.write_text("model weights go here\n")
    assert load_error(path) == (
        f"checkpoint.path: not a PyTorch checkpoint (not a zip archive): got '{path}'; {RETRAIN}")


def test_empty_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"")
    assert "not a PyTorch checkpoint (not a zip archive)" in load_error(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file(tmp_path, keep):
    good = write(tmp_path / "good.pt").read_bytes()
    path = tmp_path / "m.pt"
    path.write_bytes(good[: int(len(good) * keep)])
    assert load_error(path) == (
        f"checkpoint.path: truncated or corrupt (an incomplete zip archive): got '{path}'; {RETRAIN}")


def test_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "m.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    assert "truncated or corrupt (RuntimeError)" in load_error(path)


# --- foreign checkpoints: a plain state_dict, from other code --------------------------------------------------

def foreign_grid(tmp_path, path, **data):
    raw = {"model": {"width": 0.125}, "checkpoint": {"path": str(path)},
           "data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32, **data}}
    raw["data"] = {k: v for k, v in raw["data"].items() if v is not None}
    return parse_grid(raw, "g.yaml")


def foreign_error(tmp_path, path, **data) -> str:
    with pytest.raises(InputError) as err:
        checkpoints.load_for(foreign_grid(tmp_path, path, **data))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_plain_state_dict_loads_with_the_grids_normalisation(tmp_path, wrap, prefix):
    net = model(3)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    path = tmp_path / "m.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    ck = checkpoints.load_for(foreign_grid(tmp_path, path))
    assert ck.meta["foreign"] and ck.normalisation == ((0.5,) * 3, (0.25,) * 3)
    assert all(torch.equal(a, b) for a, b in zip(ck.model.state_dict().values(), net.state_dict().values()))


def test_cifar_resnet18_code_checkpoint_loads(tmp_path):
    """The widely used CIFAR ResNet-18 code: shortcut as shortcut.0 / shortcut.1, head `linear`."""
    net = model(3)
    state = {k.replace(".shortcut.conv.", ".shortcut.0.").replace(".shortcut.bn.", ".shortcut.1."): v
             for k, v in net.state_dict().items()}
    assert any(".shortcut.0." in k for k in state) and "linear.weight" in state
    path = tmp_path / "m.pt"
    torch.save({"net": 0, "model": state}, path)
    ck = checkpoints.load_for(foreign_grid(tmp_path, path))
    assert torch.equal(ck.model.layer2[0].shortcut.conv.weight, net.layer2[0].shortcut.conv.weight)


def test_foreign_missing_key_wrong_shape_and_normalisation_are_one_line(tmp_path):
    state = model().state_dict()
    path = tmp_path / "m.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("linear.")}, path)
    assert foreign_error(tmp_path, path).startswith(
        f"checkpoint.path: does not fit the grid's model: 2 missing keys (first: linear.weight, linear.bias): "
        f"got '{path}'")
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    assert "1 unexpected key (first: extra.weight)" in foreign_error(tmp_path, path)
    torch.save({**state, "linear.weight": torch.zeros(3, 64)}, path)
    assert foreign_error(tmp_path, path).startswith(
        "checkpoint.path: 1 tensor differs in shape from the grid's model (first: linear.weight is [3, 64] in the "
        "file, [10, 64] in the model)")
    torch.save(state, path)
    assert foreign_error(tmp_path, path, mean=None, std=None) == (
        "data.mean: a plain state_dict carries no normalisation or image size: got None; allowed: per-channel "
        "mean and std in [0, 1] units, and the image side in pixels; fix: add data.mean, data.std to the grid "
        "(e.g. mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], image_size: 224)")
    torch.save({"epoch": 3, "optimizer": {}}, path)
    assert "holds no state_dict" in foreign_error(tmp_path, path)


def test_shape_mismatch(tmp_path):
    path = write(tmp_path / "m.pt", model(width=0.25))  # meta says 0.125, tensors are 0.25's
    message = load_error(path)
    assert message.startswith("checkpoint.path: 101 tensors differ in shape from the grid's model (first: "
                              "conv1.weight is [16, 3, 3, 3] in the file, [8, 3, 3, 3] in the model)")
    assert message.endswith("allowed: tensors of the network the model section builds; fix: make model.arch and "
                            "model.kwargs build the network the checkpoint was trained as (check model.kwargs for a "
                            "misspelt argument: some builders ignore unknown ones), or point checkpoint.path at a "
                            "checkpoint of this model")


def test_missing_tensor(tmp_path):
    state = {k: v for k, v in model().state_dict().items() if k != "linear.bias"}
    path = tmp_path / "m.pt"
    torch.save({"format": checkpoint.FORMAT, "meta": ARCH, "state_dict": state}, path)
    assert "does not fit the grid's model: 1 missing key (first: linear.bias)" in load_error(path)


@pytest.mark.parametrize("tensor, value", [
    ("layer2.1.conv2.weight", float("nan")),
    ("bn1.running_var", float("inf")),
])
def test_non_finite_weights(tmp_path, tensor, value):
    net = model()
    with torch.no_grad():
        net.state_dict()[tensor].view(-1)[0] = value
    path = write(tmp_path / "m.pt", net)
    assert load_error(path) == (
        f"checkpoint.path: non-finite weights (NaN or Inf) in 1 tensors, first {tensor}: got '{path}'; "
        "allowed: finite weights; fix: retrain: the training run diverged or the file was damaged")


@pytest.mark.parametrize("where", ["meta", "top"])
def test_malicious_pickle_never_runs(tmp_path, where):
    # control: an unsafe load of the same kind of payload really does create its file
    control = tmp_path / "control-created"
    torch.save({"x": FileCreator(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    target = tmp_path / "pwned"
    payload = FileCreator(target)
    blob = payload if where == "top" else {"format": checkpoint.FORMAT, "meta": payload,
                                           "state_dict": model().state_dict()}
    path = tmp_path / "evil.pt"
    torch.save(blob, path)
    message = load_error(path)
    assert not target.exists()
    assert message == (f"checkpoint.path: not a prune-sweep checkpoint (holds Python objects that a weights-only "
                       f"load refuses): got '{path}'; {RETRAIN}")


def test_tagged_file_without_meta_mapping(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"format": checkpoint.FORMAT, "meta": None, "state_dict": model().state_dict()}, path)
    assert "not a prune-sweep checkpoint" in load_error(path)


# --- the calibration hold-out a checkpoint was trained without -------------------------------------------------

def holdout_grid(tmp_path, **sections):
    from e2e_helpers import grid_dict

    from runner.config import parse_grid

    return parse_grid(grid_dict(tmp_path, **sections), "tiny")


def test_check_holdout(tmp_path):
    from runner.inputs.data import Holdout

    grid = holdout_grid(tmp_path)
    ours = Holdout.of(600, 100, 0)  # what grid_dict holds out: seed 0, 100 of 600 synthetic train images
    trained = checkpoint.Checkpoint(model(), {**ARCH, "calibration_holdout": ours.as_dict()}, "0" * 64, "m.pt")
    assert checkpoints.check_holdout(grid, trained, ours) == "checked"
    other = Holdout.of(600, 100, 7)
    with pytest.raises(InputError) as err:
        checkpoints.check_holdout(grid, trained, other)
    assert str(err.value) == (
        f"checkpoint.path: trained without the calibration hold-out seed 0, 100 of 600 train images (indices sha256 "
        f"{ours.sha256[:12]}), but this sweep holds out seed 7, 100 of 600 train images (indices sha256 "
        f"{other.sha256[:12]}), so its calibration images may have been trained on: got '{tmp_path / 'tiny.pt'}'; "
        "allowed: a checkpoint trained with the sweep's hold-out (same seed, data.calibration_size and train "
        "images); fix: set seed: 0 and data.calibration_size: 100 as when it was trained, or retrain it, or set "
        "checkpoint.foreign: true (or sweep.calibration: test) to rank on these images anyway")
    # not checked: a foreign checkpoint, ranking on the test images, a checkpoint trained before the record
    assert checkpoints.check_holdout(holdout_grid(tmp_path, checkpoint={"foreign": True}), trained, other) == "foreign"
    assert checkpoints.check_holdout(holdout_grid(tmp_path, sweep={"calibration": "test"}), trained, other) == "test"
    old = checkpoint.Checkpoint(model(), dict(ARCH), "0" * 64, "m.pt")
    assert checkpoints.check_holdout(grid, old, other) == "unknown"


def test_a_misspelt_kwarg_is_named_by_the_checkpoints_own_record(tmp_path):
    """torchvision's mobilenet_v3_small drops an unknown keyword argument silently: a checkpoint trained here
    records its kwargs, so the typo is named; an older file without that record gets the first tensor whose shape
    differs, both shapes, and model.kwargs in the fix."""
    from model.zoo import Spec, build as build_spec

    arch = "torchvision:mobilenet_v3_small"
    net = build_spec(Spec(arch, num_classes=10, kwargs={"width_mult": 0.5}))
    typo = Spec(arch, num_classes=10, kwargs={"widht_mult": 0.5})
    checkpoints.save(tmp_path / "m.pt", net, {"arch": arch, "width": 1.0, "num_classes": 10,
                                              "kwargs": {"width_mult": 0.5}})
    with pytest.raises(InputError) as err:
        checkpoints.load_spec(tmp_path / "m.pt", typo)
    assert str(err.value).startswith("checkpoint.path: architecture mismatch: checkpoint has kwargs {'width_mult': "
                                     "0.5} (grid: {'widht_mult': 0.5})")
    checkpoints.save(tmp_path / "old.pt", net, {"arch": arch, "width": 1.0, "num_classes": 10})
    with pytest.raises(InputError) as err:
        checkpoints.load_spec(tmp_path / "old.pt", typo)
    ours, theirs = net.state_dict(), build_spec(typo).state_dict()
    differ = sum(ours[k].shape != theirs[k].shape for k in ours)  # counted here, from the two state_dicts
    assert str(err.value).startswith(f"checkpoint.path: {differ} tensors differ in shape from the grid's model "
                                     "(first: features.0.0.weight is [8, 3, 3, 3] in the file, [16, 3, 3, 3] in the "
                                     "model)")
    assert "check model.kwargs for a misspelt argument" in str(err.value)
