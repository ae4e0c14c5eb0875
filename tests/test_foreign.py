"""The user's own model and data through the command (issue 11): a foreign plain state_dict of a torchvision
model trained on the real CIFAR-10 arrays, swept end to end with the grid's normalisation; and each bad variant
(missing key, wrong shape, missing mean/std, an untraceable factory, an image folder with a broken image) as one
line and exit 2 from `prune-sweep sweep`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from e2e_helpers import grid_dict, write_grid

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]


def foreign_grid(tmp: Path, checkpoint: Path, **data) -> dict:
    """A torchvision resnet18 grid whose checkpoint is a plain state_dict: the normalisation and image size come
    from the grid."""
    grid = grid_dict(tmp, name="foreign", data={"mean": MEAN, "std": STD, "image_size": 32, **data},
                     checkpoint={"path": str(checkpoint), "train": None},
                     sweep={"layers": ["layer1.0.conv1", "layer3.0.conv2"], "k": [2, 8], "criteria": ["l1_norm"],
                            "batch_size": 100}, wandb={"mode": "disabled"})
    grid["model"] = {"arch": "torchvision:resnet18", "num_classes": 10}
    return grid


def state(**changes) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    for key, value in changes.items():
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


def refused_line(cli, tmp_path: Path, grid: dict, *flags: str) -> str:
    path = write_grid(tmp_path / "g.yaml", grid)
    run = cli(["--grid", str(path), *flags], cwd=tmp_path)
    assert run.returncode == 2 and len(run.err_lines) == 1, run.explain()
    return run.err_lines[0]


def test_missing_key_is_one_line_and_exit_2(tmp_path, cli) -> None:
    torch.save(state(**{"fc.weight": None}), tmp_path / "m.pt")
    line = refused_line(cli, tmp_path, foreign_grid(tmp_path, tmp_path / "m.pt"), "--dry-run")
    assert "checkpoint.path: does not fit the grid's model: 1 missing key (first: fc.weight)" in line


def test_wrong_shape_is_one_line_and_exit_2(tmp_path, cli) -> None:
    torch.save(state(**{"fc.weight": torch.zeros(7, 512)}), tmp_path / "m.pt")
    line = refused_line(cli, tmp_path, foreign_grid(tmp_path, tmp_path / "m.pt"), "--dry-run")
    assert "checkpoint.path: 1 tensor differs in shape from the grid's model (first: fc.weight is [7, 512] in the " \
        "file, [10, 512] in the model)" in line


def test_missing_normalisation_is_one_line_and_exit_2(tmp_path, cli) -> None:
    torch.save(state(), tmp_path / "m.pt")
    grid = foreign_grid(tmp_path, tmp_path / "m.pt")
    del grid["data"]["mean"], grid["data"]["std"]
    line = refused_line(cli, tmp_path, grid, "--dry-run")
    assert line.startswith("error: data.mean: a plain state_dict carries no normalisation or image size")


def test_untraceable_factory_is_one_line_and_exit_2(tmp_path, cli) -> None:
    (tmp_path / "gated.py").write_text(textwrap.dedent("""
        from torch import nn
        class Gate(nn.Module):
            def forward(self, x):
                return x if x.sum() > 0 else -x
        def net(num_classes=10):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Gate(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, num_classes))
    """))
    grid = grid_dict(tmp_path)
    grid["model"] = {"arch": "python:gated:net"}
    line = refused_line(cli, tmp_path, grid, "--dry-run")
    assert line.startswith(f"error: {tmp_path / 'g.yaml'}: model.arch: cannot trace") and "(Gate)" in line


def test_an_image_folder_with_a_broken_image_is_one_line_and_exit_2(tmp_path, cli) -> None:
    from PIL import Image

    root = tmp_path / "images"
    for part in ("train", "val"):
        for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            (root / part / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), colour).save(root / part / c / f"{i}.png")
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"not an image")
    grid = grid_dict(tmp_path, data={"dataset": "imagefolder", "root": str(root), "image_size": 16,
                                     "calibration_size": 1}, model={"num_classes": 2})
    line = refused_line(cli, tmp_path, grid)  # a real run: the folder is decoded before Ray starts
    assert line == (f"error: data.root: unreadable image {bad} (UnidentifiedImageError): got 'broken.jpg'; "
                    "allowed: image files PIL can read; fix: remove or replace that file")
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.slow
def test_a_foreign_torchvision_state_dict_trained_on_cifar10_sweeps_end_to_end(cifar_dir, ray_session, tmp_path,
                                                                              cli) -> None:
    """Trained here by a plain loop that is not ours (SGD, 1 epoch on 5,000 CIFAR-10 training images), saved as a
    bare state_dict, swept by the command with data.mean/std/image_size from the grid."""
    train = np.load(cifar_dir / "cifar10-train.npz", allow_pickle=False)
    x = torch.from_numpy(train["images"][:5000]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(train["labels"][:5000])
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for i in range(0, 5000, 100):
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 100]), y[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "foreign.pt")
    grid = foreign_grid(tmp_path, tmp_path / "foreign.pt", dataset="npz", train=str(cifar_dir / "cifar10-train.npz"),
                        test=str(cifar_dir / "cifar10-test.npz"), calibration_size=500, eval_size=500)
    path = write_grid(tmp_path / "g.yaml", grid)
    run = cli(["--grid", str(path)], cwd=tmp_path)
    assert run.returncode == 0, run.explain()
    import pandas as pd

    rows = pd.read_csv(tmp_path / "runs" / "foreign" / "results.csv")
    assert len(rows) == 4 and set(rows["layer"]) == {"layer1.0.conv1", "layer3.0.conv2"}
    assert (rows["eval_images"] == 500).all() and rows["baseline_accuracy"].iloc[0] > 20  # it learned something
