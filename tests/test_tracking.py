"""W&B as its users use it (runner.outputs.wandb_tracker, in process, no run started): the mode W&B's own switch
selects, settings this wandb has, run ids stable across --resume, and a trial run's summary that describes the
layer rather than its last K. The runs themselves are read back from real sweeps in tests/test_sweep.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.outputs.report import fraction_label, trial_summary
from runner.outputs.tracking import model_artifact
from runner.outputs.wandb_tracker import resolve_mode, run_id, usable_settings

KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return monkeypatch


@pytest.mark.parametrize("env, key, expected", [
    ({}, False, "offline"), ({}, True, "online"),
    ({"WANDB_MODE": "disabled"}, True, "disabled"), ({"WANDB_MODE": "offline"}, True, "offline"),
    ({"WANDB_MODE": "dryrun"}, True, "offline"), ({"WANDB_MODE": "online"}, False, "online"),
    ({"WANDB_MODE": "Disabled "}, True, "disabled"), ({"WANDB_DISABLED": "true"}, True, "disabled"),
    ({"WANDB_MODE": "sometimes"}, True, "online")])  # a value W&B does not know: the key decides
def test_auto_honours_wandb_mode(clean_env, env, key, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    if key:
        clean_env.setenv("WANDB_API_KEY", KEY)
    assert resolve_mode("auto") == expected


@pytest.mark.parametrize("mode", ["online", "offline", "disabled"])
def test_an_explicit_mode_is_kept(clean_env, mode):
    clean_env.setenv("WANDB_MODE", "disabled" if mode != "disabled" else "online")
    assert resolve_mode(mode) == mode


def test_private_settings_only_where_wandb_has_them():
    class Old:  # a wandb whose Settings lack one of the private settings
        model_fields = {"console": None, "silent": None, "x_disable_stats": None}

    values = {"console": "off", "silent": True, "x_disable_stats": True, "x_disable_meta": True}
    assert usable_settings(Old, values) == {"console": "off", "silent": True, "x_disable_stats": True}
    assert usable_settings(object, values) == {"console": "off", "silent": True}  # no field list: no private ones
    import wandb

    assert usable_settings(wandb.Settings, values) == values  # the installed wandb has them all


def test_run_ids_are_stable_per_sweep_and_distinct_per_run():
    names = ["layer1.0.conv1/l1_norm", "layer1.0.conv1/random", "layer1.0.conv2/l1_norm", "summary", "train"]
    ids = [run_id("1a2b3c4d", n) for n in names]
    assert ids == [run_id("1a2b3c4d", n) for n in names]  # the same every time
    assert len(set(ids)) == len(ids) and len(set(ids) & {run_id("ffff0000", n) for n in names}) == 0
    assert ids[-2:] == ["1a2b3c4d-summary", "1a2b3c4d-train"]
    assert all(len(i) <= 64 and all(ch.isalnum() or ch == "-" for ch in i) for i in ids)
    assert run_id(None, "summary") is None  # no sweep id: W&B makes a new one


def test_model_artifact_name():
    assert model_artifact("/x/checkpoints/cifar10 resnet18.pt", "ab" * 32) == \
        "checkpoint-cifar10-resnet18:sha256-abababababab"


def points(drops: list[float], channels: int = 8) -> list[dict]:
    """Points of one trial with a zero-width interval (drop_low = drop_high = the drop)."""
    return [{"layer": "conv1", "criterion": "l1_norm", "k": k, "fraction": k / channels, "channels": channels,
             "baseline_accuracy": 90.0, "accuracy": 90.0 - d, "accuracy_drop": d, "drop_low": d, "drop_high": d}
            for k, d in zip((1, 2, 4, 8), drops)]


def test_trial_summary_describes_the_layer_not_its_last_k():
    s = trial_summary(points([0.2, 0.9, 3.0, 80.0]))
    assert (s["safe_k_1pt"], s["safe_k_5pt"], s["safe_fraction_1pt"], s["safe_fraction_5pt"]) == (2, 4, 0.25, 0.5)
    # trapezoids from (0, 0): 1/8 * 0.1 + 1/8 * 0.55 + 2/8 * 1.95 + 4/8 * 41.5
    assert s["drop_auc"] == pytest.approx(0.0125 + 0.06875 + 0.4875 + 20.75)
    assert {k: v for k, v in s.items() if k.startswith("accuracy_at_")} == {
        "accuracy_at_12p5pct": 89.8, "accuracy_at_25pct": 89.1, "accuracy_at_50pct": 87.0, "accuracy_at_100pct": 10.0}
    assert (s["points"], s["max_k"]) == (4, 8)
    assert "accuracy" not in s  # the last K's accuracy (near chance) is not the layer's summary


def test_trial_summary_when_even_the_smallest_k_hurts():
    s = trial_summary(points([6.0, 9.0])[::-1])  # any order
    assert (s["safe_k_1pt"], s["safe_k_5pt"], s["safe_fraction_5pt"]) == (0, 0, 0.0)


def drawn(drops: list[float], margin: float, repeat: int) -> list[dict]:
    """One draw of a random order: its points, with an interval of drop +- margin."""
    return [{**p, "criterion": "random", "repeat": repeat, "drop_low": p["drop_low"] - margin,
             "drop_high": p["drop_high"] + margin} for p in points(drops)]


def test_trial_summary_uses_the_intervals_upper_end_and_the_mean_of_random_draws():
    """As the report does: a safe K is safe at the interval's upper end, for every draw of a random order; the
    rest describes the mean curve over the draws."""
    assert trial_summary(drawn([0.2, 0.9, 3.0, 80.0], 0.5, 0))["safe_k_1pt"] == 1  # K=2: 0.9, but up to 1.4
    s = trial_summary(drawn([0.2, 0.6, 3.0, 80.0], 0.1, 0) + drawn([0.4, 1.4, 5.0, 82.0], 0.1, 1))
    assert (s["points"], s["max_k"]) == (8, 8)  # points measured: 4 K x 2 draws
    assert s["accuracy_at_25pct"] == pytest.approx(90.0 - 1.0)  # the mean of 0.6 and 1.4
    assert (s["safe_k_1pt"], s["safe_k_5pt"]) == (1, 2)  # draw 1 crosses 1 point at K=2, 5 points at K=4
    assert s["drop_auc"] == pytest.approx(trial_summary(points([0.3, 1.0, 4.0, 81.0]))["drop_auc"])


@pytest.mark.parametrize("fraction, label", [(0.125, "12p5pct"), (0.25, "25pct"), (1.0, "100pct"),
                                             (1 / 3, "33p33pct"), (0.0625, "6p25pct")])
def test_fraction_label(fraction, label):
    assert fraction_label(fraction) == label


# ---- a W&B failure never stops a sweep (a stand-in for wandb whose server fails on artifacts) ----

class FakeRun:
    def __init__(self) -> None:
        self.summary: dict = {}
        self.logged: list = []
        self.exit_code: int | None = None

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, data: dict) -> None:
        self.logged.append(data)

    def log_artifact(self, *args, **kwargs) -> None:
        raise ConnectionError("server down")

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


class FakeWandb:
    class Settings:
        model_fields = {"console": None, "silent": None}

        def __init__(self, **values) -> None:
            self.values = values

    class Artifact:
        def __init__(self, name: str, type: str, metadata: dict | None = None) -> None:
            self.files: list = []

        def add_file(self, path: str, name: str | None = None, policy: str = "mutable") -> None:
            self.files.append(name)

    def __init__(self) -> None:
        self.runs: list[tuple[dict, FakeRun]] = []

    def init(self, **kwargs) -> FakeRun:
        run = FakeRun()
        self.runs.append((kwargs, run))
        return run


def test_an_artifact_that_cannot_be_logged_does_not_stop_the_sweep(tmp_path, caplog):
    from runner.outputs.tracking import SUMMARY_RUN, TRAIN_RUN, RunSpec, Tracking
    from runner.outputs.wandb_tracker import WandbTracker

    (tmp_path / "results.csv").write_text("layer\n")
    tracker = WandbTracker(Tracking("offline", "p", None, "g", tmp_path, {"seed": 0}, sweep_id="1a2b3c4d"))
    tracker.wandb = fake = FakeWandb()
    train = tracker.train_log(RunSpec(TRAIN_RUN, "train"))
    train.start({"recipe": "standard"})
    train.epoch({"epoch": 1, "loss": 2.0})
    train.trained(str(tmp_path / "results.csv"), "ab" * 32, {"test_accuracy": 50.0})  # logging it fails
    tracker.summary(RunSpec(SUMMARY_RUN, "summary"), [], 50.0, {}, [], [tmp_path / "results.csv"])
    tracker.close()
    (train_kwargs, train_run), = fake.runs  # offline failed too: W&B is off for the rest, the summary never started
    assert train_kwargs["id"] == "1a2b3c4d-train" and train_kwargs["resume"] == "allow"
    settings = train_kwargs["settings"].values
    assert settings["console"] == "off" and not [k for k in settings if k.startswith("x_")]  # none it lacks
    assert train_run.logged == [{"epoch": 1, "loss": 2.0}] and train_run.exit_code == 0
    assert tracker.mode == "disabled"
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("W&B:")]
    assert len(told) == 1 and "server down" in told[0] and "results are still on disk" in told[0]


def test_runs_use_the_model_artifact_online_and_name_it_offline(tmp_path):
    from runner.outputs.tracking import RunSpec, Tracking
    from runner.outputs.wandb_tracker import WandbTracker

    used: list = []

    class UsingRun(FakeRun):
        def use_artifact(self, ref: str, type: str | None = None) -> None:
            used.append((ref, type))
            if ref.startswith("checkpoint-missing"):
                raise ValueError("artifact not found")

    class UsingWandb(FakeWandb):
        def init(self, **kwargs) -> FakeRun:
            run = UsingRun()
            self.runs.append((kwargs, run))
            return run

    tracker = WandbTracker(Tracking("offline", "p", None, "g", tmp_path, sweep_id="1a2b3c4d"))
    tracker.wandb = fake = UsingWandb()
    spec = RunSpec("conv1/l1_norm", "prune-eval", {"layer": "conv1"}, ("criterion:l1_norm",),
                   uses="checkpoint-demo:sha256-0123456789ab")
    tracker.log_point(spec, {"k": 1, **dict.fromkeys(("accuracy", "accuracy_drop", "loss", "fraction",
                                                       "params_removed", "macs_removed"), 1)}, dict)
    assert used == []  # offline: W&B cannot record use, the config names the artifact
    assert fake.runs[0][0]["config"]["checkpoint_artifact"] == "checkpoint-demo:sha256-0123456789ab"
    assert fake.runs[0][0]["tags"] == ["criterion:l1_norm"] and fake.runs[0][0]["name"] == "conv1/l1_norm"
    tracker.mode = "online"
    for name in ("a/x", "b/x"):
        tracker.log_point(RunSpec(name, "prune-eval", uses=spec.uses), {"k": 1, **fake.runs[0][1].logged[0]}, dict)
    missing = RunSpec("c/x", "prune-eval", uses="checkpoint-missing:sha256-0")
    tracker.log_point(missing, {"k": 1, **fake.runs[0][1].logged[0]}, dict)
    tracker.log_point(RunSpec("d/x", "prune-eval", uses=missing.uses), {"k": 1, **fake.runs[0][1].logged[0]}, dict)
    assert used == [(spec.uses, "model"), (spec.uses, "model"), ("checkpoint-missing:sha256-0", "model")]
    assert tracker.mode == "online"  # an artifact that is not there is not a W&B outage: asked once, then skipped


def test_a_run_that_cannot_start_with_an_empty_error_falls_back(tmp_path, caplog):
    from runner.outputs.tracking import RunSpec, Tracking
    from runner.outputs.wandb_tracker import WandbTracker

    class Broken(FakeWandb):
        def init(self, **kwargs) -> FakeRun:
            raise RuntimeError()  # no message at all

    tracker = WandbTracker(Tracking("offline", "p", None, "g", tmp_path))
    tracker.wandb = Broken()
    tracker.log_point(RunSpec("conv1/l1_norm", "prune-eval"), {"k": 1}, dict)
    assert tracker.mode == "disabled"
    assert [r.getMessage() for r in caplog.records] == [
        "W&B: starting a run failed (RuntimeError: ); W&B logging is off for the rest of this sweep (results are "
        "still on disk)"]


def test_every_point_is_logged_and_images_only_for_the_first_random_order(tmp_path):
    import numpy as np

    from runner.outputs.tracking import RunSpec, Tracking
    from runner.outputs.wandb_tracker import WandbTracker

    class Images(FakeWandb):
        @staticmethod
        def Image(path: str, caption: str) -> tuple:
            from PIL import Image

            return np.asarray(Image.open(path))[0, 0, 0], caption

    tracker = WandbTracker(Tracking("offline", "p", None, "g", tmp_path, feature_maps=True))
    tracker.wandb = fake = Images()
    rendered = []

    def images(repeat: int):
        def render() -> dict:
            rendered.append(repeat)
            return {"pruned_layer": np.full((2, 2, 3), 10 + repeat, np.uint8),
                    "final_stage": np.full((2, 2, 3), 20 + repeat, np.uint8)}
        return render

    spec = RunSpec("conv1/random", "prune-eval")
    for repeat in (0, 1, 2):
        tracker.log_point(spec, {"k": 4, "accuracy": 50.0 + repeat, "repeat": repeat}, images(repeat))
    logged = fake.runs[0][1].logged
    assert [(d["k"], d["repeat"], d["accuracy"]) for d in logged] == [(4, 0, 50.0), (4, 1, 51.0), (4, 2, 52.0)]
    assert logged[0]["feature_maps/pruned_layer"] == (10, "conv1/random K=4")
    assert logged[0]["feature_maps/final_stage"] == (20, "conv1/random K=4")
    assert not any(key.startswith("feature_maps/") for d in logged[1:] for key in d)
    assert rendered == [0]  # the other draws' pictures are not even rendered


def test_feature_map_pngs_are_valid_fast_and_lossless():
    """runner.outputs.figures.png, read back two ways: chunk by chunk by hand (signature, IHDR, CRCs, one zlib
    stream at the fastest level, every row unfiltered, the pixels) and by Pillow (the same pixels)."""
    import io
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    from runner.outputs.figures import png

    rng = np.random.default_rng(0)
    image = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    image[:20] = 255  # some white, as the captions have
    data = png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        at += 12 + length
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (60, 40, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    stream = chunks[1][1]
    assert stream[1] >> 6 == 0  # FLEVEL: the fastest compression
    rows = np.frombuffer(zlib.decompress(stream), np.uint8).reshape(40, 1 + 60 * 3)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(40, 60, 3), image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
    with pytest.raises(ValueError, match="RGB uint8"):
        png(image.astype(np.float32))


def test_a_figure_point_gives_wandb_the_png_files_it_wrote(tmp_path):
    """A K whose figures go to disk: the PNGs are encoded once, and W&B gets those files; another K: W&B gets the
    rendered pixels (encoded by the tracker)."""
    import numpy as np
    from PIL import Image

    from runner.job.collector import Collector, Context, Live
    from runner.outputs.results import ResultsTable, TrialId
    from runner.outputs.tracking import NullTracker, RunSpec, Tracking

    class Recording(NullTracker):
        def __init__(self) -> None:
            self.pictures: list[dict] = []

        def log_point(self, run, row, images) -> None:
            self.pictures.append(images())

    trial = TrialId("layer1.0.conv1", "l1_norm")
    context = Context(folder=str(tmp_path), sweep="s", checkpoint_sha256="ab" * 32, eval_images=10,
                      tracking=Tracking("disabled", "p", None, "g", tmp_path), runs={trial.key: RunSpec(trial.key, "x")},
                      figure_ks={trial.key: (2,)}, total_points=2, board="b")
    collector = Collector(context)
    tracker = Recording()
    collector.live = Live(ResultsTable(tmp_path / "results.csv"), tracker, None)
    rng = np.random.default_rng(0)
    maps = {"layer": rng.normal(size=(16, 8, 8)).astype(np.float16),
            "final": rng.normal(size=(64, 2, 2)).astype(np.float16)}
    for k in (2, 4):
        row = {"layer": trial.layer, "criterion": trial.criterion, "target": "output", "k": k, "repeat": 0,
               "channels": 16, "accuracy": 50.0}
        collector._write(trial, row, maps)
    figure, other = tracker.pictures
    assert figure == {"pruned_layer": tmp_path / "feature_maps" / trial.layer / "l1_norm_k0002_layer.png",
                      "final_stage": tmp_path / "feature_maps" / trial.layer / "l1_norm_k0002_final.png"}
    assert sorted(other) == ["final_stage", "pruned_layer"]
    assert all(isinstance(image, np.ndarray) and image.dtype == np.uint8 for image in other.values())
    # the file holds the picture W&B would otherwise have been given (the same rendering, K aside)
    on_disk = np.asarray(Image.open(figure["final_stage"]))
    assert on_disk.shape == other["final_stage"].shape and on_disk.dtype == np.uint8
    assert not (tmp_path / "feature_maps" / trial.layer / "l1_norm_k0004_layer.png").exists()


def test_wandb_is_given_png_files_and_the_scratch_ones_are_removed(tmp_path):
    """A figure's PNG file is given as it is; pixels are encoded into a scratch PNG file, given by path, and
    removed once logged (the scratch folder with the tracker)."""
    import io

    import numpy as np
    from PIL import Image

    from runner.outputs.tracking import RunSpec, Tracking
    from runner.outputs.wandb_tracker import WandbTracker

    given = []

    class Images(FakeWandb):
        @staticmethod
        def Image(path, caption: str) -> str:
            given.append((path, Path(path).read_bytes()))  # W&B copies the file while logging
            return caption

    tracker = WandbTracker(Tracking("offline", "p", None, "g", tmp_path, feature_maps=True))
    tracker.wandb = Images()
    figure = tmp_path / "a.png"
    figure.write_bytes(b"a figure's png")
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    tracker.log_point(RunSpec("conv1/l1_norm", "prune-eval"), {"k": 1, "repeat": 0},
                      lambda: {"pruned_layer": figure, "final_stage": pixels})
    assert given[0] == (str(figure), b"a figure's png")
    scratch, data = given[1]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    assert not Path(scratch).exists() and Path(scratch).parent == tracker.scratch
    assert tracker.scratch.parent == tmp_path  # in the W&B folder
    tracker.close()
    assert tracker.scratch is None and not Path(scratch).parent.exists()


def test_preload_imports_what_every_wandb_init_imports():
    """The sweep imports W&B's Launch inputs module ahead (runner.outputs.wandb_tracker.preload) because every
    `wandb.init` imports it; if a W&B release stops doing so, the preload is wasted startup time: this fails.
    Reading W&B's source guards that workaround of ours (runner.outputs.wandb_tracker.preload) only."""
    import inspect
    import sys

    from runner.outputs.wandb_tracker import preload
    import wandb.sdk.wandb_run as wandb_run

    assert "self._detect_and_apply_job_inputs()" in inspect.getsource(wandb_run.Run._on_ready)
    assert "from wandb.sdk.launch.inputs.internal import" in \
        inspect.getsource(wandb_run.Run._detect_and_apply_job_inputs)
    preload("offline")
    assert "wandb.sdk.launch.inputs.internal" in sys.modules


def test_the_backlogs_error_waits_for_a_point_not_for_tunes_trial_complete_callback() -> None:
    """A full disk met by the driver's background work is raised again in the driver's thread: at the next
    point (`submit`) or at the end (`close`), never inside Tune's trial-complete or trial-error callbacks
    (`check=False`), where Tune would log it with a traceback and retry the trial instead of stopping."""
    from runner.job.collector import Backlog

    backlog, done = Backlog(), []

    def full() -> None:
        raise OSError(28, "No space left on device")

    backlog.submit(full)
    while backlog._error is None:  # the background thread meets it
        backlog._thread.join(0.01)
    backlog.submit(done.append, "trial finished", check=False)  # what on_trial_complete does: no raise
    with pytest.raises(OSError, match="No space left on device"):
        backlog.submit(done.append, "next point")
    with pytest.raises(OSError, match="No space left on device"):
        backlog.close()
    assert done == []  # after the error the rest is skipped: the sweep is stopping
