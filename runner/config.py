"""The grid file: frozen, validated configuration with defaults in code (DESIGN §3).

YAML only overrides the defaults. Unknown keys, wrong types and out-of-range values are rejected with the
key's full path; what needs the network (layer names, K against channel counts, criteria that cannot apply)
is checked by `runner.plan` before any work starts.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner.errors import InputError

MAX_POINTS = 100_000  # a grid larger than this is a typo, not a sweep


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(Section):
    arch: Literal["resnet18"] = "resnet18"
    width: float = Field(1.0, gt=0, le=8)  # multiplier on every channel count
    num_classes: int = Field(10, ge=2, le=10_000)


class DataConfig(Section):
    dataset: Literal["synthetic", "cifar10", "npz"] = "synthetic"
    root: str = "data"  # cifar10: torchvision's folder
    download: bool = True  # cifar10: allowed to download
    train: str | None = None  # npz: train arrays file
    test: str | None = None  # npz: test arrays file
    calibration_size: int = Field(1000, ge=1)  # images held out of train to rank channels; never trained on
    eval_size: int | None = Field(None, ge=1)  # first N test images; null = all
    train_size: int | None = Field(None, ge=1)  # first N train images (after the calibration hold-out); null = all
    synthetic_train: int = Field(16_000, ge=100, le=1_000_000)  # synthetic: generated train images
    synthetic_test: int = Field(2_000, ge=100, le=1_000_000)  # synthetic: generated test images

    @model_validator(mode="after")
    def _npz_files(self) -> "DataConfig":
        if self.dataset == "npz":
            for key in ("train", "test"):
                if getattr(self, key) is None:
                    raise InputError(f"data.{key}", None, "required when data.dataset is npz",
                                     "a path to an .npz file with images and labels arrays",
                                     f"set data.{key}: path/to/{key}.npz")
        return self


class TrainConfig(Section):
    """Training recipe; unset fields come from the named recipe (runner.train.RECIPES)."""

    recipe: Literal["standard", "seed"] = "standard"
    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int | None = Field(None, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam"] | None = None
    lr: float | None = Field(None, gt=0)  # peak learning rate
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: bool | None = None
    weight_decay: float | None = Field(None, ge=0)
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["onecycle", "cosine", "seed"] | None = None


class CheckpointConfig(Section):
    path: str = "checkpoints/model.pt"  # the shared trained checkpoint
    train: TrainConfig | None = None  # recipe, used only when the file is missing


class KSpec(Section):
    """Which K (channels pruned) to try per layer: exactly one of values, fractions, range."""

    values: list[int] | None = None
    fractions: list[float] | None = None
    range: list[int] | None = None  # [start, stop, step], stop excluded, like Python's range

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        return {"values": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _one_form(self) -> "KSpec":
        given = [k for k in ("values", "fractions", "range") if getattr(self, k) is not None]
        if len(given) != 1:
            raise InputError("sweep.k", self.model_dump(exclude_none=True), "give exactly one form of K",
                             "a list of ints [1, 3, 5], {fractions: [0.25, 0.5]} or {range: [start, stop, step]}",
                             "keep one of them")
        if self.values is not None:
            _check_list("sweep.k", self.values, lambda k: k >= 1, "integers >= 1 (K = 0 is the baseline, always measured)")
        if self.fractions is not None:
            _check_list("sweep.k.fractions", self.fractions, lambda f: 0 < f <= 1 and math.isfinite(f),
                        "numbers in (0, 1]")
        if self.range is not None:
            self._check_range()
        return self

    def _check_range(self) -> None:
        r = self.range
        if len(r) != 3 or r[0] < 1 or r[2] < 1 or r[1] <= r[0]:
            raise InputError("sweep.k.range", r, "not a valid range",
                             "[start, stop, step] with 1 <= start < stop and step >= 1 (stop excluded)",
                             "for K = 1, 3, ..., 127 write [1, 128, 2]")
        if len(range(*r)) > MAX_POINTS:
            raise InputError("sweep.k.range", r, f"{len(range(*r)):,} K values is too many",
                             f"at most {MAX_POINTS:,}", "use a larger step or a smaller stop")

    def form(self) -> Any:
        """The form the user wrote, for the resolved grid file."""
        return self.values if self.values is not None else self.model_dump(exclude_none=True)


def _check_list(field: str, values: list, ok, allowed: str) -> None:
    if not values:
        raise InputError(field, values, "empty", allowed, "give at least one value")
    for i, v in enumerate(values):
        if not ok(v):
            raise InputError(f"{field}[{i}]", v, "out of range", allowed, "remove or correct that value")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise InputError(field, values, f"duplicate value {dup[0]}", "each value once", "remove the duplicate")


class SweepConfig(Section):
    layers: Literal["all"] | list[str] = "all"  # all | [names] | glob patterns such as "layer*.conv2"
    include_shortcuts: bool = False  # `all` and globs: also the 1x1 shortcut convs
    k: KSpec = KSpec(fractions=[0.125, 0.25, 0.5, 0.75, 1.0])
    criteria: list[str] = ["mean_activation", "l1_norm", "random"]
    target: Literal["output", "input"] = "output"  # DESIGN §6
    calibration: Literal["holdout", "test"] = "holdout"  # test = the seed's leaky choice
    batch_size: int = Field(500, ge=1, le=65_536)  # evaluation and calibration batch
    retries: int = Field(2, ge=0, le=100)  # a crashed trial is retried this many times
    feature_map_points: int = Field(3, ge=0, le=100)  # K values per layer whose feature maps go to disk

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all":
            return [v]  # a single name or pattern
        if not isinstance(v, (str, list)):
            raise InputError("sweep.layers", v, "wrong type", "all, or a list of layer names or glob patterns",
                             "write layers: all, or a list such as [layer1.0.conv1, \"layer4.*\"]")
        if isinstance(v, list) and not v:
            raise InputError("sweep.layers", v, "empty", "all, or a list of layer names or glob patterns",
                             "write layers: all, or name at least one layer")
        return v

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, v: list[str]) -> list[str]:
        _check_list("sweep.criteria", v, lambda c: True, "criterion names")
        return v


class ResourcesConfig(Section):
    cpus_per_trial: int = Field(1, ge=1, le=1024)
    gpus_per_trial: Literal["auto"] | float = "auto"  # auto: a fraction of a GPU when there are GPUs, else 0
    max_concurrent: int | None = Field(None, ge=1)
    cache_gb: Literal["auto"] | float = "auto"  # memory for a trial's cached activations; auto: by device
    ray_dashboard: bool = False  # a local Ray's dashboard (on 127.0.0.1 only); off unless asked for
    # where Tune keeps its experiment state (for --resume): null = the output folder; on a cluster, a folder
    # every node reaches (NFS) or a cloud URI such as s3://bucket/prune-sweep (pyarrow's file systems)
    tune_storage: str | None = None

    @field_validator("tune_storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or ("://" in v and not re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", v))):
            raise InputError("resources.tune_storage", v, "not a folder or a URI", "null (the output folder), "
                             "a folder, or a URI like s3://bucket/path", "fix the value or remove the key")
        return v

    @field_validator("gpus_per_trial", "cache_gb")
    @classmethod
    def _non_negative(cls, v: Any, info: Any) -> Any:
        if v != "auto" and not (0 <= v < 1e6):
            raise InputError(f"resources.{info.field_name}", v, "out of range", "auto, or a number >= 0",
                             "use auto")
        return v


class WandbConfig(Section):
    project: str = "prune-sweep"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with a key, else offline
    feature_maps: bool = True  # log feature-map images at every K


class Grid(Section):
    name: str = "sweep"  # output folder name and W&B group
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sweep: SweepConfig = SweepConfig()
    resources: ResourcesConfig = ResourcesConfig()
    wandb: WandbConfig = WandbConfig()
    output: str = "runs"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise InputError("name", v, "not usable as a folder name",
                             "letters, digits, '.', '_' and '-', starting with a letter or digit, 1-100 long",
                             "rename the sweep")
        return v

    @property
    def folder(self) -> Path:
        """Where this sweep's results go: <output>/<name>."""
        return Path(self.output) / self.name

    def resolved(self, base: Path) -> "Grid":
        """The same grid with every relative path made absolute against `base`."""
        def absolute(p: str | None) -> str | None:
            return None if p is None else str((base / os.path.expanduser(p)).resolve())

        data = self.data.model_copy(update={k: absolute(getattr(self.data, k)) for k in ("root", "train", "test")})
        checkpoint = self.checkpoint.model_copy(update={"path": absolute(self.checkpoint.path)})
        storage = self.resources.tune_storage
        resources = self.resources.model_copy(update={"tune_storage": storage if storage is None or "://" in storage
                                                      else absolute(storage)})
        return self.model_copy(update={"data": data, "checkpoint": checkpoint, "output": absolute(self.output),
                                       "resources": resources})

    @property
    def tune_root(self) -> str:
        """Where this sweep's Tune experiments go: the output folder, or <tune_storage>/<name>."""
        storage = self.resources.tune_storage
        return str(self.folder) if storage is None else f"{storage.rstrip('/')}/{self.name}"

    def as_dict(self) -> dict[str, Any]:
        """The grid as plain YAML-ready data, in the form a grid file takes (loadable again)."""
        d = self.model_dump(mode="json")
        d["sweep"]["k"] = self.sweep.k.form()
        return d


def parse_grid(raw: Any, source: str) -> Grid:
    """Validate a loaded grid mapping; every problem becomes a one-line InputError naming `source`."""
    if not isinstance(raw, dict):
        raise InputError("(top level)", raw, "not a mapping", "a YAML mapping of sections (name, model, data, ...)",
                         "see sweeps/demo.yaml for the layout", source)
    try:
        return Grid.model_validate(raw)
    except InputError as e:
        raise e.at(source)
    except ValidationError as e:
        raise _one_line(e, raw, source) from None


def load_grid(path: str | Path, overrides: list[str] = (), base: Path | None = None) -> Grid:
    """Read, override (`--set key=value`), validate and resolve a grid file."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise InputError("--grid", source, "no such file", "a YAML grid file", "check the path; see sweeps/")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError("(file)", source, f"not valid YAML ({_yaml_problem(e)})",
                         "plain YAML (no Python tags)", "fix the syntax at that line") from None
    for item in overrides:
        raw = apply_override(raw, item)
    try:
        grid = parse_grid(raw, source)
    except InputError as e:
        for item in overrides:  # a bad value that came from --set is blamed on the flag, not the file
            key = item.partition("=")[0]
            if e.field == key or e.field.startswith((key + ".", key + "[")):
                e.source = f"--set {item}"
        raise
    return grid.resolved(base or Path.cwd())


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or type(e).__name__
    return f"{what} at line {mark.line + 1}" if mark else str(what)


def apply_override(raw: Any, item: str) -> dict:
    """Apply one `--set dotted.key=YAML` to the raw mapping (validation happens afterwards)."""
    key, sep, text = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise InputError("--set", item, "not KEY=VALUE", "a dotted key, '=', a YAML value",
                         "write for example --set sweep.criteria=[l1_norm]")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise InputError("--set", item, "the value is not valid YAML", "a YAML value",
                         "quote it, for example --set name='my-sweep'") from None
    raw = dict(raw) if isinstance(raw, dict) else {}
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[leaf] = value
    return raw


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[str]", "literal['all']", "function-after[_one_form(), KSpec]"):
            continue  # pydantic's names for union members and validators, not keys of the file
        elif part == "values" and out.endswith(".k"):
            continue  # a bare list of K is stored as k.values
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed in the mapping at `loc`."""
    model: type[BaseModel] | None = Grid
    for part in loc:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        model = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model else []


def _one_line(e: ValidationError, raw: Any, source: str) -> InputError:
    err = e.errors()[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        return InputError(_location(loc), loc[-1], "unknown key", ", ".join(_fields_at(loc[:-1])),
                          "remove it or correct its spelling", source)
    allowed = err["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "missing":
        return InputError(_location(loc), None, "missing", "a value", f"add {_location(loc)}", source)
    key = _location(loc).split("[")[0]
    fix = f"change {_location(loc)} in the grid file (or --set {key}=...)"
    problem = "wrong type" if err["type"].endswith("_type") else "not allowed"
    return InputError(_location(loc), value, problem, allowed, fix, source)
