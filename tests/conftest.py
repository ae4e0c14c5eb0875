"""Shared fixtures: tiny CPU models and data (width 0.125, a few hundred images), the real CIFAR-10 copy when
../shared is beside the checkout (a visible skip otherwise), one Ray for every in-process sweep, and the command
run in this process (`cli`)."""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from e2e_helpers import SCRUB, CliRun, cli_env, closed_port, e2e, grid_dict, run_cli, write_grid

from runner.config import Grid, parse_grid
from runner.engine.device import tune_allocator
from runner.job.ray_env import ray_env  # (imports no Ray)

# Ray reads some of these when it is imported (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: sockets on 127.0.0.1 only),
# so they are set here, before anything imports ray; CLI subprocesses inherit them.
for _key, _value in ray_env(None).items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("WANDB_SILENT", "true")
# Ray keeps its sockets under $TMPDIR/ray/session_*/sockets (a Unix socket path holds at most 107 bytes): with a
# long TMPDIR no Ray could start. So the tests keep them where Ray keeps them by default, whatever TMPDIR says.
os.environ.setdefault("RAY_TMPDIR", "/tmp")

tune_allocator()
# One thread: on cores shared with other processes, OpenMP's waiting threads spin against them (the one-pass
# rankings test took 46 s with 2 threads on a loaded 2-core machine, 1.2 s with 1).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture
def tiny_grid(tmp_path: Path) -> Grid:
    return parse_grid(grid_dict(tmp_path), "tiny")


def scramble_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine terms, so that pruning any channel changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (SHARED_CIFAR / "cifar10-test.npz").is_file():
        pytest.skip(f"real CIFAR-10 arrays not found at {SHARED_CIFAR} (only on the team's machines)")
    return SHARED_CIFAR


# ---- End-to-end: Ray, the command in this process, the shared checkpoint and sweep ----

@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process sweep, started as the command starts its own (127.0.0.1 only, no
    dashboard); `runner.job.cluster.ray_session` finds it running, uses it and leaves it running."""
    import ray

    from runner.job.cluster import start_ray

    started = start_ray(None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@pytest.fixture
def cli(monkeypatch, capsys):
    """`prune-sweep COMMAND ARGS` in this process: `cli(ARGS, cwd=FOLDER, env={...}, command="sweep")` runs the
    command's own entry point in that folder, with the developer's W&B and Ray settings removed and `env` added, and
    returns its exit code and what it printed (a CliRun). Sweeps that get as far as Ray need the `ray_session`
    fixture too."""
    from runner.cli import OURS, main

    def run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, command: str = "sweep") -> CliRun:
        monkeypatch.chdir(cwd)
        for key in SCRUB:
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        # the command configures logging for the process: the root logger's handlers and level, and its own
        # loggers' levels (runner.cli.OURS); the session gets its own back afterwards
        loggers = [logging.getLogger(), *(logging.getLogger(name) for name in OURS)]
        handlers, levels, raise_exceptions = loggers[0].handlers[:], [g.level for g in loggers], logging.raiseExceptions
        capsys.readouterr()
        started = time.time()
        try:
            code = main([command, *args])
        finally:
            loggers[0].handlers[:], logging.raiseExceptions = handlers, raise_exceptions
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
        out, err = capsys.readouterr()
        return CliRun(code, out, err, time.time() - started)

    return run


@pytest.fixture(scope="session")
def sweep_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint every end-to-end sweep shares: trained once (width 0.125, 1 epoch on tiny synthetic data)."""
    from runner.inputs.train import train_checkpoint

    folder = tmp_path_factory.mktemp("checkpoint")
    grid = parse_grid(grid_dict(folder), "tiny")
    return Path(train_checkpoint(grid, progress=False))


@pytest.fixture(scope="session")
def small_sweep(ray_session, sweep_checkpoint, tmp_path_factory) -> SimpleNamespace:
    """The small sweep (3 layers x 2 K x 2 criteria, W&B offline) run once, in process, on the shared Ray."""
    from e2e_helpers import SMALL_CRITERIA, SMALL_FRACTIONS, SMALL_LAYERS, e2e, write_grid

    from runner.job.sweep import Options, run_sweep

    tmp = tmp_path_factory.mktemp("small_sweep")
    grid = grid_dict(tmp, e2e(sweep_checkpoint), name="small", sweep={
        "layers": list(SMALL_LAYERS), "k": {"fractions": list(SMALL_FRACTIONS)}, "criteria": list(SMALL_CRITERIA)})
    path = write_grid(tmp / "small.yaml", grid)
    outcome = run_sweep(Options(str(path)))
    return SimpleNamespace(grid_path=path, grid=grid, outcome=outcome, folder=outcome.folder,
                           checkpoint=sweep_checkpoint, tmp=tmp)


@pytest.fixture(scope="session")
def script_sweep(sweep_checkpoint, tmp_path_factory) -> SimpleNamespace:
    """`python scripts/sweep.py` on a 4-point grid (2 trials), once per session, in a process of its own: its own
    Ray, whose workers see what the environment brings. W&B: the grid says offline, --wandb-mode says auto, a key
    is there (so online) and no server listens where W&B_BASE_URL points (so offline runs after all): read by
    tests/test_security.py (the key) and tests/test_sweep.py (the fallback). And a fault that makes trial
    layer2.0.conv2/l1_norm crash once (tests/test_sweep.py)."""
    tmp = tmp_path_factory.mktemp("script")
    grid = write_grid(tmp / "crash.yaml", grid_dict(tmp, e2e(sweep_checkpoint), name="crash", sweep={
        "layers": ["layer1.0.conv1", "layer2.0.conv2"], "k": [1, 2], "criteria": ["l1_norm"]}))
    key, marker = secrets.token_hex(20), tmp / "crashed"  # a key of 40 characters, like a real one
    url = f"http://127.0.0.1:{closed_port()}"
    env = cli_env(PRUNE_SWEEP_CRASH_ONCE=f"layer2.0.conv2/l1_norm:{marker}", WANDB_API_KEY=key, WANDB_BASE_URL=url)
    started = time.time()
    run = run_cli(["--grid", str(grid), "--wandb-mode", "auto"], cwd=tmp, env=env)
    return SimpleNamespace(run=run, folder=tmp / "runs" / "crash", crashed=marker, key=key, wandb_url=url,
                           started=started)
