"""The grid resolved against the network: which layers, which K per layer, which criteria; all checked
before any work starts."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from model.convs import ConvSite, list_convs
from model.groups import Group, list_groups
from runner.basics import TrialId
from runner.config import MAX_POINTS, Grid, KSpec
from runner.engine.criteria import CRITERIA
from runner.engine.prune import channels_of
from runner.errors import InputError
from runner.inputs.models import build_for

IMAGE_SIZE = 32  # the datasets' images (synthetic, cifar10, npz)


@dataclass(frozen=True)
class Trial:
    """One Tune trial: a (layer, criterion), its K values, ascending, and how many orders it measures at each
    (sweep.random_repeats for random, else 1)."""

    layer: str
    criterion: str
    target: str
    ks: tuple[int, ...]
    channels: int
    repeats: int = 1

    @property
    def id(self) -> TrialId:
        return TrialId(self.layer, self.criterion)

    @property
    def points(self) -> tuple[tuple[int, int], ...]:
        """(K, repeat) of every point, in the order they are measured."""
        return tuple((k, r) for k in self.ks for r in range(self.repeats))

    def figure_ks(self, count: int) -> tuple[int, ...]:
        """A few K spread over the trial's range (first, middle, last for 3): their feature maps go to disk."""
        ks = self.ks
        if count <= 0:
            return ()
        if len(ks) <= count:
            return ks
        idx = sorted({round(i * (len(ks) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [len(ks) - 1]
        return tuple(ks[i] for i in idx)


@dataclass(frozen=True)
class TrialPlan:
    convs: tuple[ConvSite, ...]  # every conv of the network
    layers: tuple[ConvSite, ...]  # the ones swept, in forward order (unit: group: the groups' naming convs)
    criteria: tuple[str, ...]
    target: str
    trials: tuple[Trial, ...]
    unit: str = "layer"
    groups: tuple[Group, ...] = ()  # unit: group: the swept groups, in the order of `layers`

    @property
    def units(self) -> dict[str, ConvSite | Group]:
        """The swept units by name: convs, or groups (a group is named by its first conv)."""
        return {g.name: g for g in self.groups} if self.unit == "group" else {c.name: c for c in self.layers}

    @property
    def ranked(self) -> tuple[ConvSite, ...]:
        """The convs to rank: the swept ones, or every conv member of a swept group."""
        if self.unit == "layer":
            return self.layers
        names = {m.name for g in self.groups for m in g.members if m.kind == "conv" and m.dim == "out"}
        return tuple(c for c in self.convs if c.name in names)

    @property
    def points(self) -> int:
        return sum(len(t.points) for t in self.trials)

    @property
    def table(self) -> dict[str, ConvSite]:
        return {c.name: c for c in self.convs}

    def describe(self) -> list[str]:
        """Human-readable lines: the layers with channel counts and K values, criteria, totals."""
        side = [c.name for c in self.convs if c.shortcut]
        lines = [f"convs found in the graph: {len(self.convs)}" + (f" ({len(side)} side branches: "
                 f"{', '.join(side)})" if side else ""),
                 f"target: {self.target}   criteria: {', '.join(self.criteria)}"
                 + (f"   unit: group ({len(self.groups)} groups, each named by its first conv)"
                    if self.unit == "group" else ""), "groups:" if self.unit == "group" else "layers:"]
        width = max(len(c.name) for c in self.layers)
        ks = {t.layer: t.ks for t in self.trials}
        for c in self.layers:
            shown = ", ".join(map(str, ks[c.name])) if len(ks[c.name]) <= 12 else \
                f"{', '.join(map(str, ks[c.name][:5]))}, ..., {ks[c.name][-1]} ({len(ks[c.name])} values)"
            lines.append(f"  {c.name:<{width}}  {c.in_channels:>4} -> {c.out_channels:<4} K: {shown}")
        drawn = {t.repeats for t in self.trials if t.repeats > 1}
        if drawn:
            shown = ", ".join(map(str, sorted(drawn)))
            lines.append(f"random orders drawn per layer: {shown} (each measured at every K)")
        lines.append(f"trials: {len(self.trials)} points: {self.points}")
        return lines


def select_layers(convs: list[ConvSite], wanted: str | list[str], include_shortcuts: bool) -> list[ConvSite]:
    """Layers named by `all`, exact names or glob patterns, in forward order."""
    pool = [c for c in convs if include_shortcuts or not c.shortcut]
    if wanted == "all":
        return pool
    names = [c.name for c in convs]
    chosen: set[str] = set()
    for i, pattern in enumerate(wanted):
        if wanted.index(pattern) != i:
            raise InputError(f"sweep.layers[{i}]", pattern, "listed twice", "each layer or pattern once",
                             "remove the duplicate")
        if pattern in names:
            chosen.add(pattern)
            continue
        hits = [c.name for c in pool if fnmatch.fnmatchcase(c.name, pattern)]
        if not hits and any(fnmatch.fnmatchcase(c.name, pattern) for c in convs):
            raise InputError(f"sweep.layers[{i}]", pattern, "matches only shortcut convs",
                             "shortcut convs by exact name, or by pattern with include_shortcuts: true",
                             "set sweep.include_shortcuts: true")
        if not hits and any(c in pattern for c in "*?["):
            raise InputError(f"sweep.layers[{i}]", pattern, "the pattern matches no layer", ", ".join(names),
                             "correct the pattern so that it matches some of those names")
        if not hits:
            raise InputError(f"sweep.layers[{i}]", pattern, "no such layer", ", ".join(names),
                             "use one of those names or a glob pattern such as \"layer*.conv2\"")
        chosen.update(hits)
    return [c for c in convs if c.name in chosen]


def ks_for(spec: KSpec, channels: int) -> tuple[int, ...]:
    """K values for a layer with `channels` prunable channels; fractions round to the nearest K >= 1."""
    if spec.values is not None:
        return tuple(sorted(spec.values))
    if spec.range is not None:
        return tuple(range(*spec.range))
    return tuple(sorted({max(1, min(channels, math.floor(f * channels + 0.5))) for f in spec.fractions}))


def plan_trials(grid: Grid) -> TrialPlan:
    """Resolve and check the sweep section against the network; raises InputError on the first problem."""
    sweep = grid.sweep
    if sweep.bn_recalibration > grid.data.calibration_size:
        raise InputError("sweep.bn_recalibration", sweep.bn_recalibration, "more images than the calibration "
                         f"hold-out has ({grid.data.calibration_size})", f"0 .. {grid.data.calibration_size}",
                         "lower it, or raise data.calibration_size")
    # the shapes come from one forward of zeros on the CPU: meta tensors would import torch._dynamo and sympy
    model = build_for(grid, pretrained=False)
    image_size = grid.data.image_size or IMAGE_SIZE
    try:
        convs = list_convs(model, image_size)
    except ValueError as e:  # model.tracing and model.convs word what cannot be traced or cut, and where
        raise InputError("model.arch", grid.model.arch, str(e).splitlines()[0][:300], "a network torch.fx can "
                         "trace, each conv called once", "make the forward traceable (no data-dependent Python "
                         "control flow), or wrap that part in a leaf module") from None
    for i, name in enumerate(sweep.criteria):
        if name not in CRITERIA:
            raise InputError(f"sweep.criteria[{i}]", name, "unknown criterion", ", ".join(CRITERIA),
                             "use one of those names")
    groups: tuple[Group, ...] = ()
    if sweep.unit == "group":  # Torch-Pruning's dependency graph needs real tensors: a CPU copy, not the plan's
        found = {g.name: g for g in list_groups(build_for(grid, pretrained=False).eval(), image_size)}
        pool = [c for c in convs if c.name in found]
        layers = select_layers(pool, sweep.layers, sweep.include_shortcuts)
        groups = tuple(found[c.name] for c in layers)
    else:
        layers = select_layers(convs, sweep.layers, sweep.include_shortcuts)
    units = {g.name: g for g in groups}
    trials = []
    for conv in layers:
        channels = channels_of(units.get(conv.name, conv), sweep.target)
        ks = ks_for(sweep.k, channels)
        if ks[-1] > channels:
            raise InputError("sweep.k", sweep.k.form(), f"K = {ks[-1]} is above the {channels} "
                             f"{'output' if sweep.target == 'output' else 'input'} channels of {conv.name}",
                             f"K from 1 to {channels} for that layer",
                             "use k: {fractions: [...]} to scale K per layer, or leave that layer out")
        for name in sweep.criteria:
            problem = CRITERIA[name].problem(conv, sweep.target)
            if groups and not problem:
                members = [c for c in convs if any(m.name == c.name and m.kind == "conv" and m.dim == "out"
                                                   for m in units[conv.name].members)]
                problem = "criterion seed does not apply to groups" if name == "seed" else next(
                    (p for c in members if (p := CRITERIA[name].problem(c, sweep.target))), None)
            if problem:
                raise InputError("sweep.criteria", name, problem, "criteria that apply to every swept layer",
                                 "change sweep.target, or sweep that criterion on other layers in its own grid")
            repeats = sweep.random_repeats if CRITERIA[name].draws else 1
            trials.append(Trial(conv.name, name, sweep.target, ks, channels, repeats))
    points = sum(len(t.points) for t in trials)
    if points > MAX_POINTS:
        raise InputError("sweep", f"{points:,} points", "the grid is too large", f"at most {MAX_POINTS:,} points",
                         "use fewer layers, K values or criteria")
    return TrialPlan(tuple(convs), tuple(layers), tuple(sweep.criteria), sweep.target, tuple(trials), sweep.unit,
                     groups)
