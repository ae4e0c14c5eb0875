"""Timing on the plan's target (docs/latency.md): where the pruned model will run, and how a forward is timed.

A target (`plan.target`) is a runtime, a device, a batch size and a thread count. `forward_of` turns a network
(or an exported ONNX file) into a zero-argument callable that runs one forward of a fixed random batch there:
`torch` runs it eager, in eval and inference mode (channels_last and bf16 on CUDA, as the sweep); `onnxruntime`
runs the exported graph with the provider the target names. `alternate` times callables in rounds, one
forward of each per round, so that a slow spell of a shared machine hits all alike; its clock is an argument,
so the bookkeeping is tested with a fake clock and no timing. Each figure is a `Spread`: the median forward
time and the 25th / 75th percentiles of the timed runs, and its time relative to the first callable's in the
same rounds (the median of the per-round ratios) with that ratio's standard error. With `Rounds.precision`,
the rounds go on until every ratio's standard error is at most that (or `max_seconds` have passed): on a
shared machine a single round's ratio can be 10% off, and twenty rounds leave a one-unit saving, or a plan's
kept fraction, a few percent off.

`check_target` refuses, before anything runs, a target this machine cannot time (CUDA without a GPU, an
onnxruntime provider that is not installed); `target_key` is what a latency table is cached under.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from runner.config import TargetConfig
from runner.errors import InputError

Clock = Callable[[], float]  # seconds, monotonic
Forward = Callable[[], None]

WARMUP = 5  # forwards of each callable before timing (allocator, kernel choice, onnxruntime's first runs)
MIN_RUNS = 20  # timed forwards of each, at least
MIN_SECONDS = 1.0  # and at least this long in all
MAX_RUNS = 1000
MAX_SECONDS = 60.0  # a precision not reached by then is given up (the entry records the error it has)
BLOCKS = 5  # stretches of consecutive rounds whose means estimate a drifting error (`ratio_stats`)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "openvino": "OpenVINOExecutionProvider", "dnnl": "DnnlExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "rocm": "ROCMExecutionProvider"}


@dataclass(frozen=True)
class Spread:
    """Forward times (ms) of one callable: the median and the 25th / 75th percentiles of the timed runs."""

    median: float
    low: float
    high: float
    runs: int
    ratio: float | None = None  # median over the rounds of this time over the first callable's in the same round
    ratio_se: float | None = None  # the standard error of `ratio`

    @staticmethod
    def of(times: Sequence[float], first: Sequence[float] | None = None) -> "Spread":
        a = np.asarray(times, dtype=float)
        ratio, se = (None, None) if first is None else ratio_stats(a, np.asarray(first, dtype=float))
        return Spread(float(statistics.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75)), len(a),
                      ratio, se)


def ratio_stats(times: np.ndarray, first: np.ndarray) -> tuple[float, float]:
    """The median of the per-round ratios `times / first`, and its standard error: the larger of two estimates.
    Rounds taken as independent: sqrt(pi / 2) sigma / sqrt(n), sigma read robustly from the interquartile range
    (a round hit by a slow spell is an outlier, not noise to average). And batch means: the spread of the mean
    ratio of BLOCKS consecutive stretches of rounds over sqrt(BLOCKS), which sees a drift lasting many rounds
    (a shared machine's neighbours come and go) that the first, reading rounds as independent, would miss."""
    r = times / first
    q1, q3 = np.percentile(r, [25, 75])
    se = 1.2533 * (q3 - q1) / 1.349 / np.sqrt(len(r))
    if len(r) >= 2 * BLOCKS:
        means = [b.mean() for b in np.array_split(r, BLOCKS)]
        se = max(se, float(np.std(means, ddof=1)) / np.sqrt(BLOCKS))
    return float(np.median(r)), float(se)


@dataclass(frozen=True)
class Rounds:
    """How long `alternate` times: warm-up forwards, then rounds until min_runs and min_seconds (max_runs)."""

    warmup: int = WARMUP
    min_runs: int = MIN_RUNS
    min_seconds: float = MIN_SECONDS
    max_runs: int = MAX_RUNS
    precision: float | None = None  # go on until every ratio's standard error is at most this
    max_seconds: float = MAX_SECONDS  # ... or this long has passed

    def more(self, times: Sequence[Sequence[float]], elapsed: float) -> bool:
        """Whether to time another round, after `times` (per callable) and `elapsed` seconds."""
        n = len(times[0])
        if n >= self.max_runs:
            return False
        if n < self.min_runs or elapsed < self.min_seconds:
            return True
        if self.precision is None or elapsed >= self.max_seconds or len(times) < 2:
            return False
        first = np.asarray(times[0], dtype=float)
        return any(ratio_stats(np.asarray(t, dtype=float), first)[1] > self.precision for t in times[1:])


def alternate(forwards: Sequence[Forward], rounds: Rounds = Rounds(), clock: Clock = time.perf_counter
              ) -> list[Spread]:
    """Each callable warmed up, then timed in rounds, one forward of each per round (module docstring)."""
    for f in forwards:
        for _ in range(rounds.warmup):
            f()
    times: list[list[float]] = [[] for _ in forwards]
    start = clock()
    while rounds.more(times, clock() - start):
        for t, f in zip(times, forwards):
            t0 = clock()
            f()
            t.append(1000 * (clock() - t0))
    return [Spread.of(times[0])] + [Spread.of(t, times[0]) for t in times[1:]]


def provider_of(target: TargetConfig) -> str:
    """The onnxruntime execution provider a target asks for."""
    name = target.provider or target.device
    return PROVIDERS.get(name.lower(), name)


def check_target(target: TargetConfig | None) -> None:
    """A one-line InputError (plan.target...) when this machine cannot time the target."""
    if target is None:
        return
    if target.device == "cuda" and not torch.cuda.is_available():
        raise InputError("plan.target.device", "cuda", "no CUDA GPU on this machine", "cpu here, or cuda on a "
                         "machine with a GPU", "set plan.target.device: cpu, or run where the model will ship")
    if target.runtime == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            raise InputError("plan.target.runtime", "onnxruntime", "onnxruntime is not installed", "torch, or "
                             "onnxruntime once installed", "pip install onnxruntime") from None
        have = onnxruntime.get_available_providers()
        want = provider_of(target)
        if want not in have:
            raise InputError("plan.target.provider", target.provider or target.device, f"onnxruntime provider "
                             f"{want} is not installed", ", ".join(have), "install the onnxruntime build with it, "
                             "or name an installed provider")


def _machine(target: TargetConfig) -> str:
    """The CPU or GPU model the target runs on."""
    if target.device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_version(target: TargetConfig) -> str:
    if target.runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    return torch.__version__


def target_key(target: TargetConfig, base_sha256: str, image_size: int) -> dict[str, Any]:
    """What a latency table measured on: runtime and its version, device, machine, batch, threads, the base."""
    return {"runtime": target.runtime, "version": runtime_version(target), "device": target.device,
            "provider": provider_of(target) if target.runtime == "onnxruntime" else None,
            "machine": _machine(target), "batch": target.batch, "threads": target.threads, "clock": target.clock,
            "image_size": image_size, "base_sha256": base_sha256}


def clock_of(target: TargetConfig) -> Clock:
    """wall: elapsed time; cpu: the process's CPU time (runner.config.TargetConfig.clock)."""
    return time.process_time if target.clock == "cpu" else time.perf_counter


def key_file(key: dict[str, Any]) -> str:
    """The table's file name: readable parts and a hash of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{key['runtime']}-{key['device']}-b{key['batch']}-{digest}.json"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads pinned to `threads` for the block (None: left as they are)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def example_batch(target: TargetConfig, image_size: int) -> np.ndarray:
    """The images every forward runs on: float32 [batch, 3, H, W] in [0, 1], the same for every model."""
    return np.random.default_rng(0).random((target.batch, 3, image_size, image_size), dtype=np.float32)


def onnx_forward(path: Path, target: TargetConfig, images: np.ndarray) -> Forward:
    """One forward of an exported file (input `images`) with onnxruntime on the target's provider."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if target.threads:
        options.intra_op_num_threads = target.threads
        options.inter_op_num_threads = 1
    if target.clock == "cpu":  # threads spinning while they wait would count as CPU time
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=[provider_of(target)])
    feed = {"images": np.ascontiguousarray(images)}
    return lambda: session.run(None, feed)


def torch_forward(model: nn.Module, target: TargetConfig, images: np.ndarray) -> Forward:
    """One forward of `model` with torch on the target's device (eval, inference mode; bf16 and channels_last on
    CUDA, as the sweep). The model is moved there in place."""
    device = torch.device(target.device)
    x = torch.from_numpy(images).to(device)
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return forward


class Timer:
    """Times networks against the base model on one target: `pair(model)` -> (base, model) Spreads, measured
    in alternation. ONNX files are exported to a scratch folder (or the network is given as a file)."""

    def __init__(self, target: TargetConfig, base: nn.Module, image_size: int,
                 export: Callable[[Path, nn.Module], None], rounds: Rounds = Rounds(),
                 clock: Clock | None = None) -> None:
        self.target, self.image_size, self.export, self.rounds = target, image_size, export, rounds
        self.clock = clock or clock_of(target)
        self.images = example_batch(target, image_size)
        self.scratch = Path(tempfile.mkdtemp(prefix="prune-sweep-latency-"))
        self.base_forward = self.forward(base)

    def forward(self, model: nn.Module | Path) -> Forward:
        if self.target.runtime == "onnxruntime":
            path = model if isinstance(model, Path) else self._exported(model)
            return onnx_forward(path, self.target, self.images)
        if isinstance(model, Path):
            raise ValueError("a torch target times networks, not files")
        return torch_forward(model, self.target, self.images)

    def _exported(self, model: nn.Module) -> Path:
        path = self.scratch / "model.onnx"
        self.export(path, model)
        return path

    def pair(self, model: nn.Module | Path) -> tuple[Spread, Spread]:
        """(base, model), timed in alternation on the target."""
        forward = self.forward(model)
        with torch_threads(self.target.threads if self.target.runtime == "torch" else None):
            base, other = alternate([self.base_forward, forward], self.rounds, self.clock)
        return base, other

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)
