"""The grid file: frozen, validated configuration with defaults in code (every key: docs/grid.md).

YAML only overrides the defaults. Unknown keys, wrong types and out-of-range values are rejected with the
key's full path; what needs the network (layer names, K against channel counts, criteria that cannot apply)
is checked by `runner.inputs.trials` before any work starts.

pydantic finds every problem and records where it is (its error `loc`); `_one_line` words the first one as
our one line. Bounds and lengths are pydantic constraints (`Field`), with `Allowed` saying in words what the
field takes; what pydantic cannot express (duplicates, one form of K, a sane range) is a validator that
raises `_invalid(problem, allowed, fix)`.

May import: `runner.errors`.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from runner.errors import InputError

MAX_POINTS = 100_000  # a grid larger than this is a typo, not a sweep
GRID_ERROR = "prune_sweep"  # the pydantic error type of `_invalid`; its context holds our message's parts


def _invalid(problem: str, allowed: str, fix: str) -> PydanticCustomError:
    """A validation error for a validator to raise: pydantic adds where it is, `_one_line` words it."""
    return PydanticCustomError(GRID_ERROR, "{problem}", {"problem": problem, "allowed": allowed, "fix": fix})


@dataclass(frozen=True)
class Allowed:
    """Field metadata: what the field takes, in words, for its range and length errors (pydantic's own words
    name one bound only), and optionally the fix to suggest."""

    text: str
    fix: str | None = None


def _distinct(values: list | None) -> list | None:
    dup = sorted({v for v in values if values.count(v) > 1}) if values else []
    if dup:
        raise _invalid(f"duplicate value {dup[0]}", "each value once", "remove the duplicate")
    return values


Distinct = AfterValidator(_distinct)  # each value of a list once
K_INTS = "integers >= 1 (K = 0 is the baseline, always measured)"
LAYERS = "all, or a list of layer names or glob patterns"
# gpus_per_trial and cache_gb: the number comes first so that a bad number's error is the one reported
AutoOrAmount = Annotated[Annotated[float, Field(ge=0, lt=1e6)] | Literal["auto"],
                         Allowed("auto, or a number >= 0", fix="use auto")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


MODEL_FORMS = "resnet18, torchvision:<builder>, timm:<name>, python:<module>:<callable>"


class ModelConfig(Section):
    # where the network comes from (model.zoo): ours, torchvision, timm or the user's factory
    arch: str = "resnet18"
    width: float = Field(1.0, gt=0, le=8)  # resnet18 only: multiplier on every channel count
    num_classes: int = Field(10, ge=2, le=10_000)
    kwargs: dict[str, Any] = {}  # torchvision, timm, python: keyword arguments of the builder
    weights: str | None = None  # torchvision: a weights name such as IMAGENET1K_V1 (timm: any = pretrained)
    python_path: str | None = None  # python: the folder its module is imported from; null = the grid file's

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        source, sep, name = v.partition(":")
        known = source in ("torchvision", "timm", "python") and sep and name
        if v != "resnet18" and not known:
            raise _invalid("not a known model source", MODEL_FORMS, "use one of those forms")
        return v

    @field_validator("width")
    @classmethod
    def _width(cls, v: float, info: ValidationInfo) -> float:
        arch = info.data.get("arch")  # validated before width: it is declared first
        if v != 1 and arch not in (None, "resnet18"):
            raise _invalid(f"scales arch resnet18 only, not {arch}", "1 (the default) with this arch",
                           "remove model.width, and give the builder's own width argument in model.kwargs "
                           "(e.g. kwargs: {width_mult: 0.5} for torchvision:mobilenet_v2)")
        return v


class DataConfig(Section):
    dataset: Literal["synthetic", "cifar10", "npz", "imagefolder"] = "synthetic"
    root: str = "data"  # cifar10: torchvision's folder; imagefolder: holds train/ and test/ (or val/)
    download: bool = True  # cifar10: allowed to download
    train: str | None = Field(None, validate_default=True)  # npz: train arrays file
    test: str | None = Field(None, validate_default=True)  # npz: test arrays file
    calibration_size: int = Field(1000, ge=1)  # images held out of train to rank channels; never trained on
    eval_size: int | None = Field(None, ge=1)  # first N test images (in `order`); null = all
    train_size: int | None = Field(None, ge=1)  # first N train images (after the calibration hold-out); null = all
    # the order eval_size, train_size and plan.score_on: test take their images in (docs/data.md); null =
    # stratified for imagefolder (its order is only file names), given for the others
    order: Literal["given", "stratified"] | None = None
    synthetic_train: int = Field(16_000, ge=100, le=1_000_000)  # synthetic: generated train images
    synthetic_test: int = Field(2_000, ge=100, le=1_000_000)  # synthetic: generated test images
    # the normalisation, per channel in [0, 1] pixel units: required with a foreign checkpoint (a plain
    # state_dict), otherwise it overrides the checkpoint's own
    mean: Annotated[list[float] | None, Field(min_length=3, max_length=3), Allowed("three numbers (R, G, B)")] = None
    std: Annotated[list[Annotated[float, Field(gt=0)]] | None, Field(min_length=3, max_length=3),
                   Allowed("three numbers > 0 (R, G, B)")] = None
    image_size: int | None = Field(None, ge=8, le=1024)  # side of the square images; null = 32 (our datasets)
    resize: int | None = Field(None, ge=8, le=4096)  # imagefolder: shorter side before the center crop;
    # null = image_size * 8 / 7 (256 for 224)
    cache: str | None = None  # imagefolder: the decoded uint8 array file; null = next to the data

    @field_validator("train", "test")
    @classmethod
    def _npz_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        # fields are validated in the order they are declared, so `dataset` is in info.data when it is valid
        if v is None and info.data.get("dataset") == "npz":
            raise _invalid("required when data.dataset is npz", "a path to an .npz file with images and labels "
                           "arrays", f"set data.{info.field_name}: path/to/{info.field_name}.npz")
        return v

    @property
    def resolved_order(self) -> str:
        """`order` with null resolved for this dataset."""
        return self.order or ("stratified" if self.dataset == "imagefolder" else "given")


class TrainConfig(Section):
    """A training recipe. In a grid, unset fields (None) come from the named recipe; the named recipes
    (runner.inputs.train.RECIPES) are TrainConfigs with every field set, and `recipe_of` fills one in."""

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
    normalise: Literal["dataset", "half"] | None = None  # dataset: train images' mean/std; half: 0.5 and 0.5


class CheckpointConfig(Section):
    path: str = "checkpoints/model.pt"  # the shared trained checkpoint
    train: TrainConfig | None = None  # recipe, used only when the file is missing
    # not trained by prune-sweep on this grid's split: its calibration hold-out is not checked (and the report
    # says the calibration images may have been trained on)
    foreign: bool = False


class KSpec(Section):
    """Which K (channels pruned) to try per layer: exactly one of values, fractions, range."""

    values: Annotated[list[Annotated[int, Field(ge=1)]] | None, Field(min_length=1), Distinct, Allowed(K_INTS)] = None
    fractions: Annotated[list[Annotated[float, Field(gt=0, le=1)]] | None, Field(min_length=1), Distinct,
                         Allowed("numbers in (0, 1]")] = None
    range: list[int] | None = None  # [start, stop, step], stop excluded, like Python's range

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        return {"values": data} if isinstance(data, list) else data

    @field_validator("range")
    @classmethod
    def _range(cls, r: list[int] | None) -> list[int] | None:
        if r is None:
            return r
        if len(r) != 3 or r[0] < 1 or r[2] < 1 or r[1] <= r[0]:
            raise _invalid("not a valid range", "[start, stop, step] with 1 <= start < stop and step >= 1 "
                           "(stop excluded)", "for K = 1, 3, ..., 127 write [1, 128, 2]")
        if len(range(*r)) > MAX_POINTS:
            raise _invalid(f"{len(range(*r)):,} K values is too many", f"at most {MAX_POINTS:,}",
                           "use a larger step or a smaller stop")
        return r

    @model_validator(mode="after")
    def _one_form(self) -> "KSpec":
        if sum(form is not None for form in (self.values, self.fractions, self.range)) != 1:
            raise _invalid("give exactly one form of K", "a list of ints [1, 3, 5], {fractions: [0.25, 0.5]} "
                           "or {range: [start, stop, step]}", "keep one of them")
        return self

    def form(self) -> Any:
        """The form the user wrote, for the resolved grid file."""
        return self.values if self.values is not None else self.model_dump(exclude_none=True)


class SweepConfig(Section):
    # all | [names] | glob patterns such as "layer*.conv2"; the list comes first so that its errors are reported
    layers: Annotated[Annotated[list[str], Field(min_length=1)] | Literal["all"],
                      Allowed(LAYERS, fix="write layers: all, or name at least one layer")] = "all"
    include_shortcuts: bool = False  # `all` and globs: also the side-branch convs (ResNet's 1x1 shortcuts)
    unit: Literal["layer", "group"] = "layer"  # group: a coupled channel group (model.groups), masked everywhere
    k: KSpec = KSpec(fractions=[0.125, 0.25, 0.5, 0.75, 1.0])
    criteria: Annotated[list[str], Field(min_length=1), Distinct, Allowed("criterion names")] = [
        "mean_activation", "l1_norm", "random"]
    target: Literal["output", "input"] = "output"  # docs/numbers.md#criteria-and-targets
    calibration: Literal["holdout", "test"] = "holdout"  # test = the seed's leaky choice
    random_repeats: int = Field(3, ge=1, le=100)  # random: orders drawn per layer, each measured at every K
    random_seed: int = Field(0, ge=0, le=2**63 - 1)  # random: seeds the draws (the grid's seed splits the data)
    batch_size: int = Field(500, ge=1, le=65_536)  # evaluation and calibration batch
    retries: int = Field(2, ge=0, le=100)  # a crashed trial is retried this many times
    feature_map_points: int = Field(3, ge=0, le=100)  # K values per layer whose feature maps go to disk
    # adaptive BN: images of the calibration hold-out that re-estimate the BatchNorm statistics a mask reaches
    # before each point is scored a second time (docs/adaptive-bn.md); 0 = off
    bn_recalibration: int = Field(0, ge=0, le=1_000_000)
    # a curve stops once a point's drop is above this many points beyond doubt (its interval's lower end); the
    # larger K are recorded as skipped; null = every K measured
    stop_drop: Annotated[float | None, Field(gt=0, le=100), Allowed("null, or points of accuracy, 0 < D <= 100")] = None

    @model_validator(mode="after")
    def _group_output(self) -> "SweepConfig":
        if self.unit == "group" and self.target != "output":
            raise _invalid("unit: group masks its members' outputs", "target: output with unit: group",
                           "set sweep.target: output, or sweep.unit: layer")
        return self

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all":
            return [v]  # a single name or pattern
        if not isinstance(v, (str, list)):
            raise _invalid("wrong type", LAYERS, "write layers: all, or a list such as [layer1.0.conv1, \"layer4.*\"]")
        return v


class ResourcesConfig(Section):
    cpus_per_trial: int = Field(1, ge=1, le=1024)
    gpus_per_trial: AutoOrAmount = "auto"  # auto: a fraction of a GPU when there are GPUs, else 0
    max_concurrent: int | None = Field(None, ge=1)
    cache_gb: AutoOrAmount = "auto"  # memory for a trial's cached activations; auto: by device
    ray_dashboard: bool = False  # a local Ray's dashboard (on 127.0.0.1 only); off unless asked for
    # where Tune keeps its experiment state (for --resume): null = the output folder; on a cluster, a folder
    # every node reaches (NFS) or a cloud URI such as s3://bucket/prune-sweep (pyarrow's file systems)
    tune_storage: str | None = None

    @field_validator("tune_storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or ("://" in v and not re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", v))):
            raise _invalid("not a folder or a URI", "null (the output folder), a folder, or a URI like "
                           "s3://bucket/path", "fix the value or remove the key")
        return v


class WandbConfig(Section):
    project: str = "prune-sweep"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with a key, else offline
    feature_maps: bool = True  # log feature-map images at every K


FRACTION = "a fraction of the base model to keep, 0 < f < 1"
PLAN_METHODS = ("knapsack", "threshold", "uniform", "global")


class Budget(Section):
    """What a plan must reach: exactly one of `macs`, `params` or `latency` (measured on `plan.target`), the
    fraction of the base model's to keep."""

    macs: Annotated[float | None, Field(gt=0, lt=1), Allowed(FRACTION)] = None
    params: Annotated[float | None, Field(gt=0, lt=1), Allowed(FRACTION)] = None
    latency: Annotated[float | None, Field(gt=0, lt=1), Allowed(FRACTION)] = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Budget":
        if sum(v is not None for v in (self.macs, self.params, self.latency)) != 1:
            raise _invalid("give exactly one of macs, params, latency", "{macs: 0.5}, {params: 0.6} or "
                           "{latency: 0.6}", "write one budget per list item")
        return self

    @property
    def kind(self) -> str:
        """macs, params or latency."""
        return next(k for k in ("macs", "params", "latency") if getattr(self, k) is not None)

    @property
    def keep(self) -> float:
        """The fraction of the base model's MACs, params or latency the plan may keep."""
        return getattr(self, self.kind)

    @property
    def label(self) -> str:
        """Its name in folders and tables: macs0.5, params0.6."""
        return f"{self.kind}{self.keep:g}"


class FinetuneConfig(TrainConfig):
    """The fine-tuning recipe: the keys of checkpoint.train (unset keys from the named recipe); epochs 0 = none."""

    epochs: int = Field(2, ge=0, le=10_000)
    lr: float | None = Field(0.01, gt=0)
    schedule: Literal["onecycle", "cosine", "seed"] | None = "cosine"  # from the trained model down: no warm-up


class TargetConfig(Section):
    """Where the pruned model will run and how it is timed (docs/latency.md): latency tables and budgets."""

    runtime: Literal["torch", "onnxruntime"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    batch: int = Field(1, ge=1, le=65_536)
    threads: int | None = Field(None, ge=1, le=1024)  # null = what the runtime picks
    provider: str | None = None  # onnxruntime: an execution provider (tensorrt, cuda, cpu, ...); null = by device
    # wall: elapsed time (latency); cpu: the process's CPU time per forward, which other processes on a shared
    # machine do not inflate (equal to latency on an idle core with threads: 1; CPU devices only)
    clock: Literal["wall", "cpu"] = "wall"
    # every timing (table entries, plans) goes on until its time over the base's, paired by round, has at most
    # this standard error (or 60 s have passed); null: 20 rounds and 1 s, however noisy
    precision: float | None = Field(0.01, gt=0, le=0.5)
    # times the latency table is timed over, a whole pass before the next: timings minutes apart differ by more
    # than one timing's rounds show on a shared machine; more passes average that (and cost as many tables)
    passes: int = Field(1, ge=1, le=20)

    @model_validator(mode="after")
    def _provider_runtime(self) -> "TargetConfig":
        if self.provider is not None and self.runtime != "onnxruntime":
            raise _invalid("a provider is an onnxruntime setting", "provider: null with runtime: torch",
                           "remove provider, or use runtime: onnxruntime")
        if self.clock == "cpu" and self.device != "cpu":
            raise _invalid("CPU time says nothing of a GPU's work", "clock: wall on cuda", "use clock: wall")
        return self

    @property
    def label(self) -> str:
        """Its name in plans.csv and the report: onnxruntime/cpu/b32, torch/cpu/b1/t4."""
        out = f"{self.runtime}/{self.provider or self.device}/b{self.batch}"
        return out + (f"/t{self.threads}" if self.threads else "") + ("/cpu-time" if self.clock == "cpu" else "")


class PlanConfig(Section):
    """`prune-sweep prune`: budgets x methods, each a plan from the sweep's curves, removed for real,
    fine-tuned and verified."""

    budgets: Annotated[list[Budget], Field(min_length=1),
                       Allowed("a list of {macs: f}, {params: f} or {latency: f}")] = [Budget(macs=0.5)]
    # global: Torch-Pruning's global pruning, the baseline a user has without sweeping (docs/validation.md)
    methods: Annotated[list[Literal["knapsack", "threshold", "uniform", "global"]], Field(min_length=1), Distinct,
                       Allowed(", ".join(PLAN_METHODS))] = list(PLAN_METHODS)
    # whose curves the plan reads and whose channel order it removes; null = the first of sweep.criteria that
    # ranks channels (not random, not seed)
    criterion: str | None = None
    # channels kept per unit: a multiple of this (or the unit untouched); auto: only K on the latency table's
    # lower envelope (needs a target)
    round_to: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    min_keep: float = Field(0.1, ge=0, lt=1)  # never keep fewer than this fraction of a unit's channels (and >= 1)
    finetune: FinetuneConfig = FinetuneConfig()
    # which images give the final figures: eval = the sweep's eval images (the ones that chose the plan, so its
    # figures are flattered: the report says so); test = the test images the sweep did not evaluate (those after
    # data.eval_size), never seen by the plan
    score_on: Literal["eval", "test"] = "eval"
    # knapsack and threshold: moves of the combined-plan correction (runner.planning.correction); 0 = none
    max_corrections: int = Field(8, ge=0, le=1000)
    # accept: the correction stops at the first plan whose measured drop its prediction explains; search: it
    # takes all max_corrections moves and keeps the plan that measured least (docs/numbers.md)
    correction: Literal["accept", "search"] = "accept"
    # which curves plan: plain (the trained BatchNorm statistics) or recalibrated (after adaptive BN, which needs
    # sweep.bn_recalibration > 0; the correction then measures with adaptive BN too): docs/adaptive-bn.md
    curves: Literal["plain", "recalibrated"] = "plain"
    # where the model will run: latency tables, {latency: f} budgets, every plan timed there; null = no table,
    # plans timed with torch at batch 1 and 64
    target: TargetConfig | None = Field(None, validate_default=True)

    @field_validator("target")
    @classmethod
    def _needs_target(cls, v: TargetConfig | None, info: ValidationInfo) -> TargetConfig | None:
        if v is None:
            latency = next((b.label for b in info.data.get("budgets") or [] if b.kind == "latency"), None)
            if latency:
                raise _invalid(f"budget {latency} needs a target to time plans on", "a plan.target with a latency "
                               "budget", "add plan.target: {runtime: onnxruntime, device: cpu, batch: 1}")
            if info.data.get("round_to") == "auto":
                raise _invalid("round_to: auto reads the latency table of a target", "a plan.target with round_to: "
                               "auto", "add plan.target, or set plan.round_to to a number")
        return v

    @field_validator("budgets")
    @classmethod
    def _distinct_budgets(cls, v: list[Budget]) -> list[Budget]:
        labels = [b.label for b in v]
        dup = next((x for x in labels if labels.count(x) > 1), None)
        if dup:
            raise _invalid(f"duplicate budget {dup}", "each budget once", "remove the duplicate")
        return v


class ValidateConfig(Section):
    """`prune-sweep validate` (docs/validation.md): random plans per budget next to the methods' plans, each
    predicted, measured one-shot and fine-tuned with the plan section's recipe."""

    random_plans: int = Field(16, ge=3, le=1000)  # random plans per budget (rank correlations need >= 3)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # seeds the random plans' draws
    bn_images: int = Field(512, ge=1, le=1_000_000)  # calibration hold-out images for a plan's adaptive-BN accuracy


# the section is named like its command; the BaseModel.validate it shadows is pydantic's deprecated classmethod
warnings.filterwarnings("ignore", message='Field name "validate" in "Grid" shadows', category=UserWarning)


class Grid(Section):
    name: str = "sweep"  # output folder name and W&B group
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sweep: SweepConfig = SweepConfig()
    resources: ResourcesConfig = ResourcesConfig()
    wandb: WandbConfig = WandbConfig()
    plan: PlanConfig = PlanConfig()  # prune-sweep prune only (not part of a sweep's identity)
    validate: ValidateConfig = ValidateConfig()  # prune-sweep validate only
    output: str = "runs"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise _invalid("not usable as a folder name",
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

        data = self.data.model_copy(update={k: absolute(getattr(self.data, k))
                                            for k in ("root", "train", "test", "cache")})
        checkpoint = self.checkpoint.model_copy(update={"path": absolute(self.checkpoint.path)})
        model = self.model.model_copy(update={"python_path": absolute(self.model.python_path)})
        storage = self.resources.tune_storage
        resources = self.resources.model_copy(update={"tune_storage": storage if storage is None or "://" in storage
                                                      else absolute(storage)})
        return self.model_copy(update={"model": model, "data": data, "checkpoint": checkpoint, "output": absolute(self.output),
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
        if item.startswith("model.") and "python:" in item:
            raise InputError("--set", item, "python: models run the user's code", "python: only in the grid "
                             "file named by --grid", "write model.arch in the grid file")
    try:
        grid = parse_grid(raw, source)
    except InputError as e:
        for item in overrides:  # a bad value that came from --set is blamed on the flag, not the file
            key = item.partition("=")[0]
            if e.field == key or e.field.startswith((key + ".", key + "[")):
                e.source = f"--set {item}"
        raise
    grid = grid.resolved(base or Path.cwd())
    if grid.model.arch.startswith("python:") and grid.model.python_path is None:
        grid = grid.model_copy(update={"model": grid.model.model_copy(
            update={"python_path": str(path.parent.resolve())})})
    return grid


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


def _child(node: Any, part: str | int) -> Any:
    try:
        return node[part]
    except (KeyError, IndexError, TypeError):
        return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (`TrainConfig | None` holds TrainConfig), if any."""
    return next((a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type)
                 and issubclass(a, BaseModel)), None)


def _walk(loc: tuple, raw: Any,
          root: type[BaseModel] | None = None) -> tuple[str, type[BaseModel] | None, FieldInfo | None]:
    """Follow a pydantic error location through the sections: the key path in the grid file, the section
    reached and the last field passed.

    A location also names union members and validators, which are not keys of the file. Rather than match
    pydantic's names for them, keep only what the file has: a field of the section at hand, or an index into a
    list, and skip every other part."""
    path, model, field, node = "", root or Grid, None, raw
    for part in loc:
        if isinstance(part, int):
            path, node = f"{path}[{part}]", _child(node, part)
        elif model is not None and part in model.model_fields:
            field = model.model_fields[part]
            if not (model is KSpec and part == "values" and isinstance(node, list)):  # a bare list of K is k.values
                path, node = f"{path}.{part}" if path else part, _child(node, part)
            model = _model_in(field.annotation)
    return path, model, field


OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _one_line(e: ValidationError, raw: Any, source: str, root: type[BaseModel] | None = None) -> InputError:
    """pydantic's first error as our one line: the key path, the value, the problem, what is allowed, the fix.
    `root`: the model that was validated (default the Grid)."""
    err = e.errors()[0]
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    if kind == "extra_forbidden":
        where, model, _ = _walk(loc[:-1], raw, root)
        return InputError(f"{where}.{loc[-1]}" if where else str(loc[-1]), loc[-1], "unknown key",
                          ", ".join(model.model_fields if model else ()), "remove it or correct its spelling", source)
    field, _, info = _walk(loc, raw, root)
    field = field or "(top level)"
    if kind == GRID_ERROR:
        ctx = err["ctx"]
        return InputError(field, value, ctx["problem"], ctx["allowed"], ctx["fix"], source)
    if kind == "missing":
        return InputError(field, None, "missing", "a value", f"add {field}", source)
    words = next((m for m in (info.metadata if info else ()) if isinstance(m, Allowed)), None)
    allowed = err["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    fix = f"change {field} in the grid file (or --set {field.split('[')[0]}=...)"
    if kind == "too_short" and not value:
        problem, fix = "empty", "give at least one value"
    elif kind in OUT_OF_RANGE:
        problem, fix = "out of range", "remove or correct that value" if loc and isinstance(loc[-1], int) else fix
    else:  # a wrong type or a value outside a closed set: pydantic's words are exact
        problem, words = "wrong type" if kind.endswith("_type") else "not allowed", None
    if words:
        allowed, fix = words.text, words.fix or fix
    return InputError(field, value, problem, allowed, fix, source)
