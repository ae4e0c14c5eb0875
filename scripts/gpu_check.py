"""The steps of scripts/gpu_check.sh (GPU readiness in one call), each a subcommand that writes a JSON of its
figures to the check's folder:

    prepare  the grid (real CIFAR-10 arrays, width 1.0) and its checkpoint (trained briefly: bf16 vs fp32 needs
             real decision margins; the bench alone would be fine with untrained weights)
    agree    bf16 (the engine's GPU path: autocast, bf16 inputs, channels_last, cached prefix) against an fp32
             reference (full network, weights zeroed, TF32 off) at a few points
    share    after the sweep: how many trials held the GPU at once (nvidia-smi samples, and Tune's own trial
             times), and on which device every point was measured
    report   every step's figures, and the verdict

With --dry every step runs on the CPU, tiny (width 0.125, a few hundred images): the same code paths, checked
here where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a bare copy of the checkout, as the device machine has it

from runner.cli import Parser, run_main  # noqa: E402  after the sys.path line above
from runner.errors import EXIT_FAILED  # noqa: E402  likewise

log = logging.getLogger("gpu_check")

CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
# bf16 keeps 8 significant bits (relative rounding 2^-9, about 0.2%) and autocast accumulates in fp32, so the
# logits of the two precisions differ by well under 1%: only images whose two best classes are that close
# change their prediction. On 10,000 images of a trained network that is a few tenths of a percent, so half a
# point (50 images) is generous for an agreement and tight enough to catch a wrong cast, layout or cache.
BF16_TOLERANCE = 0.5  # accuracy points
AGREE_LAYERS = ("layer1.0.conv1", "layer2.1.conv2", "layer4.0.conv1")
AGREE_FRACTIONS = (0.125, 0.25)
SHARE_TRIALS = 4  # gpus_per_trial: auto gives each trial a quarter GPU


def grid_for(out: Path, data: Path, dry: bool) -> dict[str, Any]:
    """The check's grid: CIFAR-10 arrays when there are any (synthetic images otherwise, said in the report)."""
    real = (data / "cifar10-train.npz").is_file() and (data / "cifar10-test.npz").is_file()
    source = {"dataset": "npz", "train": str(data / "cifar10-train.npz"), "test": str(data / "cifar10-test.npz")} \
        if real else {"dataset": "synthetic"}
    grid = {
        "name": "gpu-check", "seed": 0, "model": {"arch": "resnet18", "width": 1.0, "num_classes": 10},
        "data": {**source, "calibration_size": 1000, "eval_size": None},
        "checkpoint": {"path": str(out / "checkpoint.pt"), "train": {"recipe": "standard", "epochs": 2,
                                                                      "batch_size": 512}},
        # 8 trials of 16 K on 10,000 images: long enough that four of them overlap on the GPU
        "sweep": {"layers": ["layer3.*", "layer4.*"], "k": {"fractions": [i / 16 for i in range(1, 17)]},
                  "criteria": ["l1_norm"], "batch_size": 1000},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": "auto"},
        "wandb": {"mode": "disabled"}, "output": str(out / "runs"),
    }
    if dry:
        grid["model"]["width"] = 0.125
        grid["data"].update(calibration_size=100, eval_size=300, train_size=1000)
        if not real:
            grid["data"].update(synthetic_train=1200, synthetic_test=300)
        grid["checkpoint"]["train"].update(epochs=1, batch_size=100)
        grid["sweep"].update(layers=["layer3.*"], k={"fractions": [0.25, 0.5, 0.75, 1.0]}, batch_size=100)
    return grid


def prepare(out: Path, data: Path, dry: bool) -> dict[str, Any]:
    from runner.config import load_grid
    from runner.inputs.train import train_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    grid = grid_for(out, data, dry)
    (out / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    loaded = load_grid(out / "grid.yaml")
    started = time.time()
    if not Path(loaded.checkpoint.path).is_file():
        train_checkpoint(loaded, progress=False)
    return {"grid": str(out / "grid.yaml"), "dataset": grid["data"]["dataset"], "width": grid["model"]["width"],
            "train_seconds": round(time.time() - started, 1)}


def agree(out: Path, dry: bool) -> dict[str, Any]:
    """Accuracy at a few points by the engine (on a GPU: bf16 autocast, bf16 inputs, channels_last) and by an
    independent fp32 reference on the same device (the full network with the channels' weights zeroed)."""
    import copy

    import torch

    from runner.config import load_grid
    from runner.engine.criteria import rank_all
    from runner.engine.device import pick_device, place
    from runner.engine.evaluate import evaluate
    from runner.engine.images import to_device
    from runner.engine.measure import EvalSet, sweep_layer
    from runner.engine.prune import zero_weights
    from runner.inputs import checkpoints
    from runner.inputs.data import load_data
    from runner.inputs.trials import ks_for, plan_trials, select_layers

    grid = load_grid(out / "grid.yaml")
    data = load_data(grid.data, grid.model.num_classes, grid.seed)
    loaded = checkpoints.load_for(grid)
    device = pick_device("cpu" if dry else "cuda")
    convs = plan_trials(grid).table
    layers = select_layers(list(convs.values()), list(AGREE_LAYERS), include_shortcuts=False)
    mean, std = loaded.normalisation
    bs, classes = grid.sweep.batch_size, len(data.classes)
    model = place(copy.deepcopy(loaded.model), device)
    cal = EvalSet.build(data.calibration, mean, std, classes, device, bs)
    # l1_norm: from the weights alone, so both precisions prune exactly the same channels
    rankings = rank_all(model, layers, ["l1_norm"], "output", torch.cat(cal.inputs), torch.cat(cal.labels), bs,
                        grid.seed)
    fast = EvalSet.build(data.test, mean, std, classes, device, bs)
    x32 = to_device(data.test.images, mean, std, device, torch.float32, channels_last=True).split(bs)
    y32 = torch.from_numpy(data.test.labels).to(device).split(bs)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    points = []
    for conv in layers:
        ranking = rankings[(conv.name, "l1_norm")]
        ks = ks_for(grid.sweep.k.model_copy(update={"fractions": list(AGREE_FRACTIONS)}), conv.out_channels)
        engine = {p.k: p.accuracy for p in sweep_layer(model, conv, "output", ranking, ks, fast, convs,
                                                       feature_maps=False)}
        for k in ks:
            reference = place(copy.deepcopy(loaded.model), device).float()
            zero_weights(reference, conv, "output", ranking.order[:k])
            fp32 = evaluate(reference, x32, y32, classes).result().accuracy
            points.append({"layer": conv.name, "k": k, "engine": engine[k], "fp32": fp32,
                           "difference": round(engine[k] - fp32, 4)})
    worst = max(abs(p["difference"]) for p in points)
    return {"device": str(device), "engine_precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "eval_images": len(data.test), "points": points, "max_abs_difference": worst,
            "tolerance": BF16_TOLERANCE, "ok": worst <= BF16_TOLERANCE}


def gpu_samples(text: str) -> list[set[int]]:
    """"sample <time> driver <pid>" lines, each followed by nvidia-smi's compute-app PIDs -> the trial processes
    on the GPU at each sample (the sweep's driver, which calibrates on the GPU, left out)."""
    samples: list[set[int]] = []
    driver = None
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["sample"]:
            samples.append(set())
            driver = int(words[3]) if len(words) > 3 and words[3].isdigit() else None
        elif words and words[0].rstrip(",").isdigit() and samples and int(words[0].rstrip(",")) != driver:
            samples[-1].add(int(words[0].rstrip(",")))
    return samples


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def share(out: Path, dry: bool) -> dict[str, Any]:
    from runner.api import load_results

    folder = out / "runs" / "gpu-check"
    rows = load_results(folder)
    trials = load_results(folder, tune=True)
    samples_file = out / "gpu_apps.txt"
    samples = gpu_samples(samples_file.read_text(encoding="utf-8")) if samples_file.is_file() else []
    seen = max((len(s) for s in samples), default=0)
    # Tune's own record: each trial ran from (its last result's time - its total time) to that time
    finished = trials.dropna(subset=["seconds"]) if len(trials) else trials
    spans = [(t.ended.timestamp() - t.seconds, t.ended.timestamp()) for t in finished.itertuples()] \
        if "ended" in finished else []
    overlap = max_overlap(spans) if spans else 0
    devices = sorted(set(rows["device"])) if len(rows) else []
    result = {"points": len(rows), "trials": len(trials), "devices": devices, "gpu_samples": len(samples),
              "most_trials_on_the_gpu_at_once": seen, "most_trials_running_at_once": overlap}
    if dry:
        result["ok"] = len(rows) > 0 and devices == ["cpu"]
        result["note"] = "no GPU: sharing not checked (gpus_per_trial: auto gave each trial no GPU)"
    else:  # nvidia-smi names the processes unless a container hides them; Tune's times (whole seconds) otherwise
        result["ok"] = devices == ["cuda"] and (seen == SHARE_TRIALS if seen else overlap >= SHARE_TRIALS)
    return result


def report(out: Path) -> tuple[list[str], bool]:
    lines, ok = [], True
    for step in ("prepare", "bench", "agree", "sweep", "share"):
        path = out / f"{step}.json"
        if not path.is_file():
            lines.append(f"{step}: FAILED (no result; see {out}/{step}.log)")
            ok = False
            continue
        r = json.loads(path.read_text(encoding="utf-8"))
        good = r.get("ok", r.get("identical_accuracies", True))
        ok &= bool(good)
        lines.append(f"{step}: {'ok' if good else 'FAILED'}  {_figures(step, r)}")
    return lines, ok


def _figures(step: str, r: dict[str, Any]) -> str:
    if step == "prepare":
        return f"data {r['dataset']}, width {r['width']:g}, checkpoint trained in {r['train_seconds']} s"
    if step == "bench":
        t = r["timings"]
        per = ", ".join(f"{name.split(':')[0]} {v['seconds']:.2f} s ({v['seconds_per_point'] * 1000:.1f} ms/point, "
                        f"peak {v['peak_bytes'] / 2**20:.0f} MiB)" for name, v in t.items())
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
        return f"{r['points']} points on {r['eval_images']} images, {r['device']}: {per}; {ratios}; " \
               f"accuracies {'identical' if r['identical_accuracies'] else 'DIFFER'}"
    if step == "agree":
        pts = "; ".join(f"{p['layer']} K={p['k']}: {p['engine']:.2f} vs {p['fp32']:.2f}" for p in r["points"])
        return f"{r['engine_precision']} vs fp32 on {r['eval_images']} images, max |diff| " \
               f"{r['max_abs_difference']:.2f} pts (tolerance {r['tolerance']}): {pts}"
    if step == "sweep":
        return f"exit {r['exit']}, {r['seconds']:.0f} s"
    return f"{r['points']} points in {r['trials']} trials on {', '.join(r['devices']) or 'nothing'}; trials on the " \
           f"GPU at once: {r['most_trials_on_the_gpu_at_once']} (nvidia-smi, {r['gpu_samples']} samples), running " \
           f"at once: {r['most_trials_running_at_once']} (Tune)" + (f"; {r['note']}" if "note" in r else "")


def main() -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["prepare", "agree", "share", "report"])
    p.add_argument("--out", required=True, help="the check's folder")
    p.add_argument("--data", default=str(CIFAR), help="folder with cifar10-train.npz and cifar10-test.npz")
    p.add_argument("--dry", action="store_true", help="CPU, tiny: the same code paths without a GPU")
    args = p.parse_args()
    out = Path(args.out).resolve()
    if args.step == "report":
        lines, ok = report(out)
        print("\n".join(lines))
        print(f"gpu_check: {'PASSED' if ok else 'FAILED'}{' (dry run, CPU)' if args.dry else ''}")
        return 0 if ok else EXIT_FAILED
    result = {"prepare": lambda: prepare(out, Path(args.data), args.dry), "agree": lambda: agree(out, args.dry),
              "share": lambda: share(out, args.dry)}[args.step]()
    (out / f"{args.step}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if result.get("ok", True) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(run_main(main))
