"""Coupled channel groups (`sweep.unit: group`), found by Torch-Pruning's dependency graph.

A group is a set of channels that must be removed together to leave a working, smaller network: joined by
residual additions, concatenations or depthwise convs. Each is named by its first conv in execution order
whose output channels it holds; asking Torch-Pruning for that conv's output-channel group gives it back.
Masking group channels I zeroes them at every member's mask point (after a conv's own BN, else the conv's
output; and at the output of a BN member that follows no member conv, e.g. densenet's norm reading a concat),
which equals removing them (`remove_group`), to float rounding: a removed input slice and a zeroed one differ
only in the order of the additions.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from model.convs import ConvSite, list_convs
from model.mask import MaskPoint, masked_points
from model.savings import Savings, conv_macs
from model.tracing import eval_mode, trace

log = logging.getLogger(__name__)

KINDS = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.Linear: "linear"}


@dataclass(frozen=True)
class Member:
    """One module of a group: along `dim` ("out" or "in"), its channel idxs[j] is the group's channel root[j]."""

    name: str
    kind: str  # conv | bn | linear | other (a module Torch-Pruning also prunes, e.g. PReLU or GroupNorm)
    dim: str
    idxs: tuple[int, ...]
    root: tuple[int, ...]

    def local(self, channels: Iterable[int]) -> list[int]:
        """This module's indices for the given group channels (several per channel after a flatten)."""
        wanted = set(channels)
        return [i for i, r in zip(self.idxs, self.root) if r in wanted]


@dataclass(frozen=True)
class Group:
    """Channels removed together. `mask_points` come in execution order, the named conv's first."""

    name: str
    channels: int
    members: tuple[Member, ...]
    mask_points: tuple[MaskPoint, ...]

    def member(self, name: str, dim: str = "out") -> Member:
        return next(m for m in self.members if m.name == name and m.dim == dim)

    def keep(self, pruned: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """The keep vector over the group's channels: 0 at the pruned ones."""
        mask = torch.ones(self.channels, device=device)
        mask[list(pruned)] = 0
        return mask


def dependency_graph(model: nn.Module, image_size: int) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of the model (traced with autograd on one zero image, in eval mode)."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device)
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)


def tp_group(graph: tp.DependencyGraph, conv: nn.Conv2d, idxs: Sequence[int]) -> tp.dependency.Group:
    """Torch-Pruning's group for removing output channels `idxs` of `conv` (depthwise handled by it)."""
    return graph.get_pruning_group(conv, graph.get_pruner_of_module(conv).prune_out_channels, list(idxs))


def list_groups(model: nn.Module, image_size: int) -> list[Group]:
    """Every prunable group, in the execution order of the convs that name them. Skipped (logged): groups
    that reach the network's output (a conv whose channels are the logits), and groups with a grouped,
    non-depthwise conv member (RegNet, ResNeXt): its channels cannot be removed one index at a time."""
    gm = trace(model)
    eager = getattr(gm, "eager", model)
    sites = list_convs(gm, image_size)
    graph = dependency_graph(eager, image_size)
    names = {module: name for name, module in eager.named_modules()}
    order = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    covered: set[str] = set()
    groups = []
    skipped: dict[str, list[str]] = {"whose channels are the network's output": [], "with a grouped conv member": []}
    for site in sites:
        if site.name in covered:
            continue
        conv = eager.get_submodule(site.name)
        found = tp_group(graph, conv, range(conv.out_channels))
        members = _members(found, names, graph)
        covered |= {m.name for m in members if m.kind == "conv" and m.dim == "out"}
        if any(item.dep.target.type == tp.ops.OPTYPE.OUTPUT for item in found.items):
            skipped["whose channels are the network's output"].append(site.name)
            continue
        grouped = [m.name for m in members if m.kind == "conv" and _grouped(eager.get_submodule(m.name))]
        if grouped:
            skipped["with a grouped conv member"].append(site.name)
            continue
        points = _mask_points(eager, site, members, sites, order)
        groups.append(Group(site.name, conv.out_channels, members, points))
    if any(skipped.values()):  # one line, however many: the dry run's own lines follow it
        total = sum(map(len, skipped.values()))
        log.info("%d group%s skipped (%s)", total, "" if total == 1 else "s", "; ".join(
            f"{len(names)} {why}, first {names[0]}" for why, names in skipped.items() if names))
    return groups


def _grouped(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and not (conv.groups == conv.in_channels == conv.out_channels)


def _members(found: tp.dependency.Group, names: dict[nn.Module, str], graph: tp.DependencyGraph) \
        -> tuple[Member, ...]:
    members = []
    for item in found.items:
        module = item.dep.target.module
        if module not in names:  # Torch-Pruning's stand-ins for additions, concatenations, the output
            continue
        kind = next((k for cls, k in KINDS.items() if isinstance(module, cls)), "other")
        dim = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        members.append(Member(names[module], kind, dim, tuple(item.idxs), tuple(item.root_idxs)))
    return tuple(members)


def _mask_points(model: nn.Module, site: ConvSite, members: tuple[Member, ...], sites: list[ConvSite],
                 order: dict[str, int]) -> tuple[MaskPoint, ...]:
    """A point after each member conv's own BN (else at the conv), and at each BN member no member conv owns."""
    own_bn = {s.name: s.bn for s in sites}
    points: dict[str, Member] = {}
    convs = [m for m in members if m.kind == "conv" and m.dim == "out"]
    owned = {own_bn[m.name] for m in convs}
    for m in convs:
        points.setdefault(own_bn[m.name] or m.name, m)
    for m in members:
        if m.kind == "bn" and m.dim == "out" and m.name not in owned:
            points.setdefault(m.name, m)
    first = own_bn[site.name] or site.name
    ordered = sorted(points, key=lambda name: (name != first, order[name]))
    return tuple(_point(model, name, points[name]) for name in ordered)


def _point(model: nn.Module, name: str, member: Member) -> MaskPoint:
    module = model.get_submodule(name)
    channels = module.out_channels if isinstance(module, nn.Conv2d) else module.num_features
    if member.idxs == member.root == tuple(range(channels)):
        return MaskPoint(name, channels=channels)
    return MaskPoint(name, channels=channels, local=member.idxs, root=member.root)


@contextmanager
def masked_group(model: nn.Module, group: Group, pruned: Sequence[int]) -> Iterator[None]:
    """Inside the block, every forward of `model` runs with the group's channels `pruned` zeroed at every
    member's mask point (hooks removed on exit)."""
    _check_maskable(group)
    with masked_points(model, group.mask_points, group.keep(pruned, _device(model))):
        yield


def _check_maskable(group: Group) -> None:
    others = [m.name for m in group.members if m.kind == "other" and m.dim == "out"]
    if others:
        raise ValueError(f"group {group.name!r} cannot be masked exactly: its members {others} are neither conv, "
                         "BN nor linear (removing their channels is not zeroing an output)")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def remove_group(model: nn.Module, group: Group, idxs: Sequence[int], image_size: int = 32) -> nn.Module:
    """A copy of the model with the group's channels `idxs` physically removed by Torch-Pruning."""
    pruned = copy.deepcopy(model)
    graph = dependency_graph(pruned, image_size)
    tp_group(graph, pruned.get_submodule(group.name), idxs).prune()
    return pruned


def count(model: nn.Module, image_size: int) -> tuple[int, int]:
    """(MACs per image, parameters): MACs = FLOPs / 2 as FlopCounterMode counts them (convs and linears)."""
    from torch.utils.flop_counter import FlopCounterMode  # here: its import loads triton, and the sweep's
    # driver and trial workers import this module but never count

    x = torch.zeros(1, 3, image_size, image_size, device=_device(model))
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


def savings(model: nn.Module, group: Group, idxs: Sequence[int], sites: Sequence[ConvSite]) -> Savings:
    """What removing the group's channels `idxs` saves, from the members' shapes (no removal done): every
    member loses its slices; a depthwise conv loses whole filters."""
    removed = {(m.name, m.dim): len(m.local(idxs)) for m in group.members}
    hw = {s.name: s.out_hw for s in sites}
    macs = params = 0
    for name in {m.name for m in group.members}:
        module = model.get_submodule(name)
        k_out, k_in = removed.get((name, "out"), 0), removed.get((name, "in"), 0)
        before, after = _size(module, 0, 0), _size(module, k_out, k_in)
        macs += conv_macs(before[0] - after[0], hw[name]) if isinstance(module, nn.Conv2d) else before[0] - after[0]
        params += before[1] - after[1]
    return Savings(params, macs)


def _size(module: nn.Module, k_out: int, k_in: int) -> tuple[int, int]:
    """(weight elements multiplied per output position, parameters) after removing k_out / k_in channels."""
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        out = module.out_channels - k_out
        inp = module.in_channels - (k_out if depthwise else k_in)
        groups = module.groups - k_out if depthwise else module.groups
        weight = out * (inp // groups) * module.kernel_size[0] * module.kernel_size[1]
        return weight, weight + (out if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        weight = (module.out_features - k_out) * (module.in_features - k_in)
        return weight, weight + (module.out_features - k_out if module.bias is not None else 0)
    if isinstance(module, nn.BatchNorm2d):
        return 0, (module.num_features - k_out) * 2 if module.affine else 0
    raise ValueError(f"cannot count {type(module).__name__} {module}: only conv, BN and linear members")
