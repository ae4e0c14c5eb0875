"""A pruned model as files and numbers: pruned.pt rebuilt in a fresh process, tampered files as one line, ONNX
with the normalisation inside (onnxruntime's predictions = torch's), latency; and (slow) the whole path from
measured curves to plans.csv on a trained tiny model."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT
from e2e_helpers import grid_dict
from test_removal import calibrated
from torch import nn

from model.resnet import ResNet18
from runner.config import parse_grid
from runner.engine.images import to_device
from runner.errors import InputError
from runner.inputs.checkpoints import load_for
from runner.inputs.data import load_data
from runner.outputs.plans import plan_folder, read_plan_json, write_plan_json, write_plans_csv
from runner.config import Budget
from runner.planning.correction import Measured, correct
from runner.planning.curves import curve
from runner.planning.export import Normalised, export_onnx, load_pruned, onnx_logits, save_pruned
from runner.planning.latency import latency
from runner.planning.record import plan_record
from runner.planning.removal import counter, counts, masked, pruned_copy, removable_alone, removal_from
from runner.planning.solve import Plan, Planner

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
REMOVAL = {"layer1.0.conv1": [0, 3, 5], "layer3.1.conv1": list(range(0, 32, 3)), "conv1": [2]}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return calibrated(ResNet18(width=0.125))


@pytest.fixture(scope="module")
def pruned(base) -> nn.Module:
    return pruned_copy(base, REMOVAL, 32).eval()


def unit_images(n: int = 64, seed: int = 2) -> torch.Tensor:
    """float32 NCHW images in [0, 1] (what the ONNX file takes), on the 1/255 grid of uint8 images."""
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)).float() / 255


def test_pruned_pt_rebuilds_the_same_network_in_a_fresh_process(tmp_path, pruned) -> None:
    save_pruned(tmp_path / "pruned.pt", pruned, REMOVAL, {"model": {"arch": "resnet18", "width": 0.125,
                                                                    "num_classes": 10}, "mean": list(MEAN)})
    x = unit_images(16)
    with torch.no_grad():
        torch.save({"x": x, "logits": pruned(x)}, tmp_path / "want.pt")
    script = textwrap.dedent("""
        import sys, torch
        from model.resnet import build
        from runner.planning.export import load_pruned
        folder = sys.argv[1]
        loaded = load_pruned(folder + "/pruned.pt", build("resnet18", 0.125, 10), 32)
        want = torch.load(folder + "/want.pt", weights_only=True)
        with torch.no_grad():
            got = loaded.model(want["x"])
        same = torch.equal(got.argmax(1), want["logits"].argmax(1)) and torch.allclose(got, want["logits"], atol=1e-5)
        print(same, loaded.removal["layer1.0.conv1"], loaded.meta["mean"], loaded.model.layer1[0].conv1.out_channels)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"True [0, 3, 5] {list(MEAN)} 5"


def tampered(path: Path, **changes) -> Path:
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return path


def test_a_tampered_plan_is_one_line(tmp_path, pruned) -> None:
    path = tmp_path / "pruned.pt"
    save_pruned(path, pruned, REMOVAL, {})
    tampered(path, removal={**REMOVAL, "layer1.0.conv1": list(range(11))})
    with pytest.raises(InputError) as e:
        load_pruned(path, ResNet18(width=0.125), 32)
    assert str(e.value) == (
        f"{path}: plan['layer1.0.conv1']: K larger than the unit's channels allow: got 11; allowed: K from 0 to 7 "
        "(layer1.0.conv1 has 8 output channels; at least one must stay); fix: rebuild the plan with prune-sweep "
        "prune (do not edit it by hand)")
    tampered(path, removal={**REMOVAL, "layer1.0.conv1": [0, 3]})  # a plan that does not fit the weights
    with pytest.raises(InputError) as e:
        load_pruned(path, ResNet18(width=0.125), 32)
    assert str(e.value).startswith("pruned.pt: its state_dict does not fit the network its plan rebuilds (size "
                                   "mismatch for layer1.0.conv1.weight")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, problem", [
    (b"not a zip", "not a PyTorch file (not a zip archive)"),
    (None, "cannot be read weights-only (UnpicklingError)"),
])
def test_a_file_that_is_not_a_pruned_model_is_one_line(tmp_path, content, problem) -> None:
    path = tmp_path / "pruned.pt"
    if content is None:
        torch.save({"format": "prune-sweep/pruned/1", "removal": {}, "code": nn.ReLU()}, path)  # a pickled module
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_pruned(path, ResNet18(width=0.125), 32)
    assert str(e.value) == (f"pruned.pt: {problem}: got {str(path)!r}; allowed: a prune-sweep/pruned/1 file written "
                            "by prune-sweep prune; fix: write it again with prune-sweep prune")


def test_onnx_takes_unit_images_and_predicts_what_torch_does(tmp_path, pruned) -> None:
    path = tmp_path / "pruned.onnx"
    export_onnx(path, pruned, MEAN, STD, image_size=32)
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (images,) = graph.graph.input
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["batch", 3, 32, 32]
    x = unit_images(64)
    got = onnx_logits(path, x.numpy())
    # torch as the sweep evaluates: normalised outside the network (runner.engine.images.to_device's formula)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = pruned((x - m) / s).numpy()
        wrapped = Normalised(pruned, MEAN, STD)(x).numpy()
    assert np.array_equal(got.argmax(1), want.argmax(1)) and len(set(want.argmax(1).tolist())) > 1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(wrapped, want)


def test_onnx_predictions_score_uint8_images_in_batches(tmp_path, pruned, monkeypatch) -> None:
    """onnx_predictions takes the datasets' uint8 NHWC images and scores them ONNX_BATCH at a time: the same
    classes as the logits of the whole set converted by hand."""
    from runner.planning import export

    path = tmp_path / "pruned.onnx"
    export_onnx(path, pruned, MEAN, STD, image_size=32)
    images = np.random.default_rng(0).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    want = onnx_logits(path, images.astype(np.float32).transpose(0, 3, 1, 2) / 255).argmax(1)
    monkeypatch.setattr(export, "ONNX_BATCH", 32)  # 32 + 32 + 6
    assert np.array_equal(export.onnx_predictions(path, images), want) and len(set(want.tolist())) > 1


def test_latency_returns_medians_for_both_models_at_each_batch(base, pruned) -> None:
    got = latency(base, pruned, (3, 32, 32), batches=(1, 4), warmup=1, min_runs=3, min_seconds=0.0)
    assert [g.batch for g in got] == [1, 4] and all(g.runs == 3 for g in got)
    assert all(g.base_ms > 0 and g.pruned_ms > 0 and math.isfinite(g.speedup) for g in got)


# --- the whole path on a trained tiny model (slow: 20 s to train the shared checkpoint, 40 to 100 s here) ---

def paired(base_right: torch.Tensor, right: torch.Tensor) -> Measured:
    """Drop in points with a normal-approximation paired 95% interval (the job will use issue 10's interval)."""
    n = len(right)
    lost, gained = int((base_right & ~right).sum()), int((~base_right & right).sum())
    drop = 100 * (lost - gained) / n
    half = 100 * 1.96 * math.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
    return Measured(drop, drop - half, drop + half)


@pytest.mark.slow
def test_measured_curves_become_plans_csv(sweep_checkpoint, tmp_path) -> None:
    grid = parse_grid(grid_dict(sweep_checkpoint.parent), "tiny")
    ckpt = load_for(grid)
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    mean, std = ckpt.normalisation
    x, y = to_device(data.test.images, mean, std, torch.device("cpu")), torch.from_numpy(data.test.labels)
    model = ckpt.model.eval()

    def right(net: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return net(x).argmax(1) == y

    base_right, base_counts = right(model), counts(model, 32)
    units = [n for n, m in model.named_modules() if n.startswith("layer") and n.endswith(".conv1")]
    assert set(removable_alone(model, units, 32).values()) == {None}
    orders = {u: torch.argsort(model.get_submodule(u).weight.abs().sum((1, 2, 3)), stable=True).tolist()
              for u in units}
    curves = []
    for u in units:  # what the sweep measures: each unit alone, K at three fractions
        c = model.get_submodule(u).out_channels
        ks = [c // 4, c // 2, 3 * c // 4]
        drops, macs, params = [], [], []
        for k in ks:
            removal = removal_from({u: k}, orders)
            with masked(model, removal, 32):
                drops.append(paired(base_right, right(model)).drop)
            saved = counts(pruned_copy(model, removal, 32), 32)
            macs.append(base_counts.macs - saved.macs)
            params.append(base_counts.params - saved.params)
        curves.append(curve(u, c, ks, drops, macs, params))

    def measure(plan: Plan) -> Measured:
        with masked(model, removal_from(plan.ks, orders), 32):
            return paired(base_right, right(model))

    budget = Budget(macs=0.75)
    kept = counter(model, orders, budget.kind, 32)
    rows = []
    for method in ("knapsack", "threshold", "uniform"):
        planner = Planner(curves, budget.kind, budget.keep, base_counts.macs, method, round_to=2, min_keep=0.1)
        plan = planner.fit(kept)
        assert plan.counted_kept <= 0.75 * base_counts.macs
        fixed = None if method == "uniform" else correct(plan, lambda caps, p=planner: p.fit(kept, caps), measure)
        plan = fixed.plan if fixed else plan
        removal = removal_from(plan.ks, orders)
        with masked(model, removal, 32):
            masked_right = right(model)
        pruned = pruned_copy(model, removal, 32).eval()
        assert torch.equal(right(pruned), masked_right)  # to the image
        counted = counts(pruned, 32)
        assert counted.macs == plan.counted_kept and counted.macs <= 0.75 * base_counts.macs
        assert all((c.channels - plan.ks[c.unit]) % 2 == 0 or plan.ks[c.unit] == 0 for c in curves)
        folder = plan_folder(tmp_path, budget.label, method)
        save_pruned(folder / "pruned.pt", pruned, removal, {"model": grid.model.model_dump()})
        loaded = load_pruned(folder / "pruned.pt", ResNet18(width=0.125), 32)
        assert torch.equal(right(loaded.model), masked_right)
        export_onnx(folder / "pruned.onnx", pruned, mean, std, 32)
        onnx_x = torch.from_numpy(data.test.images).permute(0, 3, 1, 2).float().div(255).numpy()
        onnx_right = torch.from_numpy(onnx_logits(folder / "pruned.onnx", onnx_x).argmax(1)) == y
        assert torch.equal(onnx_right, masked_right)
        times = {t.batch: t for t in latency(model, pruned, (3, 32, 32), warmup=0, min_runs=1, min_seconds=0.0)}
        channels = {c.unit: c.channels for c in curves}
        write_plan_json(folder, plan_record(plan, budget.label, budget.keep, channels, removal, counted, base_counts,
                                            fixed))
        accuracy = 100 * float(masked_right.float().mean())
        rows.append({"budget": budget.label, "method": method, "macs_kept": counted.kept(base_counts, "macs"),
                     "params_kept": counted.kept(base_counts, "params"), "latency_ms_b1": times[1].pruned_ms,
                     "latency_ms_b64": times[64].pruned_ms, "predicted_drop": plan.predicted_drop,
                     "accuracy_masked": accuracy, "accuracy_removed": 100 * float(right(pruned).float().mean()),
                     "accuracy_finetuned": math.nan, "finetuned_low": math.nan, "finetuned_high": math.nan,
                     "baseline_accuracy": 100 * float(base_right.float().mean())})
    table = write_plans_csv(tmp_path, rows)
    assert table["method"].tolist() == ["knapsack", "threshold", "uniform"]
    assert (table["macs_kept"] <= 0.75).all() and (table["accuracy_masked"] == table["accuracy_removed"]).all()
    doc = read_plan_json(plan_folder(tmp_path, "macs0.75", "knapsack"))
    assert doc["macs"] == int(round(table["macs_kept"][0] * base_counts.macs)) and len(doc["units"]) == 8
    assert sorted(p.name for p in plan_folder(tmp_path, "macs0.75", "knapsack").iterdir()) == [
        "plan.json", "pruned.onnx", "pruned.pt"]


def test_every_file_of_a_plan_folder_is_whole_or_absent_when_a_write_fails(tmp_path, monkeypatch) -> None:
    """The prune job's writers (plan.json, the .npy verdicts, job.json, plans.csv, pruned.pt, pruned.onnx) all
    go through runner/storage.py: when the final rename fails (a full disk, a kill), the file there before is
    left as it was, a new one never appears, and no temporary file is left behind."""
    import runner.storage as storage
    from runner.outputs.plans import COLUMNS, save_array, write_job
    from runner.planning.export import export_onnx, save_pruned

    model = ResNet18(width=0.125, num_classes=10).eval()
    writers = {
        "plan.json": lambda: write_plan_json(tmp_path, {"budget": "macs0.5"}),
        "correct_removed.npy": lambda: save_array(tmp_path / "correct_removed.npy", np.ones(3, bool)),
        "plans/job.json": lambda: write_job(tmp_path, {"job_id": "1"}),
        "plans.csv": lambda: write_plans_csv(tmp_path, [{c: 1 for c in COLUMNS}]),
        "pruned.pt": lambda: save_pruned(tmp_path / "pruned.pt", model, {}, {}),
        "pruned.onnx": lambda: export_onnx(tmp_path / "pruned.onnx", model, (0.5,) * 3, (0.25,) * 3, 32),
    }
    (tmp_path / "plan.json").write_text("before")  # one file already there, one not

    def full(src, dst) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", full)
    for write in writers.values():
        with pytest.raises(OSError, match="No space left on device"):
            write()
    monkeypatch.undo()
    assert (tmp_path / "plan.json").read_text() == "before"
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["plan.json"], left  # nothing half-written, no temporary file
    for write in writers.values():  # the same writers, with a working rename, write every file
        write()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(writers)
