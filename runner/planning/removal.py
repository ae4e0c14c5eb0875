"""Channels removed for real with Torch-Pruning, the same removal as masks, and MACs / params counted.

A removal maps a unit to the output channels of its conv to remove: `{conv name: [channel indices]}`, the
indices those of the base model. A unit is named by its conv (a group by its first conv in execution order,
as in model/groups.py), and Torch-Pruning's dependency graph gives the channels that go with it: the conv's
BN, the input slices of every conv that reads them, and for a group every coupled member (residual
additions, concatenations, depthwise convs). We never work the dependencies out ourselves. A whole plan is
removed at once: every unit's group is taken from the unpruned model, then each is pruned.

`dependency_graph`, `tp_group` and `counts` have the signatures of model/groups.py's `dependency_graph`,
`tp_group` and `count` (branch `graph`); once that lands, these three become imports from there.

`masked` is the same removal as masks: the group's channels are zeroed at the output of every
conv and BN that loses them, so a masked forward equals the pruned model's forward (tests check it).
`counts` counts MACs (FLOPs / 2 of convs and linears, `torch.utils.flop_counter`) and params on a model as it
is: the pruned model's numbers are counted on the pruned model, never computed from the plan.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from model.capture import hooked
from model.tracing import eval_mode
from runner.errors import InputError

Removal = Mapping[str, Sequence[int]]  # conv name -> output channels (base model indices) to remove
PRUNED = (nn.Conv2d, nn.BatchNorm2d)  # where `masked` zeroes a group's channels


@dataclass(frozen=True)
class Counts:
    macs: int  # multiply-accumulates of one forward of the example input (convs and linears)
    params: int

    def kept(self, base: "Counts", kind: str) -> float:
        """The fraction of `base` these counts keep, for kind macs or params."""
        return getattr(self, kind) / getattr(base, kind)


def _zeros(model: nn.Module, image_size: int) -> Tensor:
    return torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)


def counts(model: nn.Module, image_size: int) -> Counts:
    """MACs per image (FlopCounterMode's FLOPs / 2: convs and linears) and the number of parameters."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as flops:
        model(_zeros(model, image_size))
    return Counts(flops.get_total_flops() // 2, sum(p.numel() for p in model.parameters()))


def dependency_graph(model: nn.Module, image_size: int) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph, traced in eval mode (a forward in train mode would move BN statistics)
    with autograd on (it traces through autograd's graph), also when called under torch.no_grad()."""
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=_zeros(model, image_size), verbose=False)


def tp_group(graph: tp.DependencyGraph, conv: nn.Conv2d, idxs: Sequence[int]) -> tp.Group:
    """The group that removing output channels `idxs` of `conv` takes with it (depthwise handled by it)."""
    return graph.get_pruning_group(conv, graph.get_pruner_of_module(conv).prune_out_channels, sorted(idxs))


def _losers(dg: tp.DependencyGraph, group: tp.Group) -> list[tuple[nn.Module, list[int]]]:
    """The modules of a group that lose output channels, with those channels."""
    return [(dep.target.module, [int(i) for i in idxs]) for dep, idxs in group
            if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, (nn.Conv2d, nn.Linear,
                                                                                             nn.BatchNorm2d))]


def check_removal(model: nn.Module, removal: Removal, field: str = "plan") -> None:
    """Every unit a conv of the model, its channels distinct, in range, and at least one kept (InputError)."""
    modules = dict(model.named_modules())
    fix = "rebuild the plan with prune-sweep prune (do not edit it by hand)"
    for unit, idxs in removal.items():
        where = f"{field}[{unit!r}]"
        conv = modules.get(unit)
        if not isinstance(conv, nn.Conv2d):
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            raise InputError(where, unit, "not a conv of the model", f"conv names such as {', '.join(convs[:3])}",
                             fix)
        c = conv.out_channels
        if len(idxs) >= c:
            raise InputError(where, len(idxs), "K larger than the unit's channels allow",
                             f"K from 0 to {c - 1} ({unit} has {c} output channels; at least one must stay)", fix)
        if not all(isinstance(i, int) and 0 <= i < c for i in idxs) or len(set(idxs)) != len(idxs):
            raise InputError(where, list(idxs), "channel indices out of range or repeated",
                             f"distinct integers 0..{c - 1} ({unit} has {c} output channels)", fix)


def _groups(model: nn.Module, removal: Removal, image_size: int) -> tuple[tp.DependencyGraph, list[tp.Group]]:
    check_removal(model, removal)
    dg = dependency_graph(model, image_size)
    groups, owner = [], {}
    for unit, idxs in removal.items():
        if not idxs:
            continue
        group = tp_group(dg, model.get_submodule(unit), idxs)
        for module, _ in _losers(dg, group):
            if id(module) in owner:
                raise ValueError(f"units {owner[id(module)]} and {unit} are one group: plan one of them")
            owner[id(module)] = unit
        if not dg.check_pruning_group(group):
            raise ValueError(f"removing {len(idxs)} channels of {unit} would empty a member of its group")
        groups.append(group)
    return dg, groups


def remove_channels(model: nn.Module, removal: Removal, image_size: int) -> nn.Module:
    """Remove the channels for real, in place (Torch-Pruning), and return the model.

    Every group is found on the unpruned model first and then pruned, so the indices are the base model's."""
    _, groups = _groups(model, removal, image_size)
    for group in groups:
        group.prune()
    return model


def pruned_copy(model: nn.Module, removal: Removal, image_size: int) -> nn.Module:
    """A pruned deep copy; `model` is left as it was."""
    return remove_channels(copy.deepcopy(model), removal, image_size)


def zeroed(model: nn.Module, removal: Removal, image_size: int) -> dict[str, Tensor]:
    """The convs and BNs that lose channels, by name: 1 for each channel kept, 0 for each removed."""
    dg, groups = _groups(model, removal, image_size)
    names = {m: n for n, m in model.named_modules()}
    keep: dict[str, Tensor] = {}
    for group in groups:
        for module, idxs in _losers(dg, group):
            if isinstance(module, PRUNED):
                channels = module.out_channels if isinstance(module, nn.Conv2d) else module.num_features
                k = keep.setdefault(names[module], torch.ones(channels))
                k[idxs] = 0
    return keep


@contextmanager
def masked(model: nn.Module, removal: Removal, image_size: int) -> Iterator[nn.Module]:
    """Inside the block, `model` computes as if the channels were removed: each group's channels are zeroed at
    the output of every conv and BN that loses them (hooks removed on exit)."""
    keep = {model.get_submodule(name): k for name, k in zeroed(model, removal, image_size).items()}

    def zero(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
        k = keep[m]
        return out * k.to(out.device, out.dtype).view(1, -1, *([1] * (out.dim() - 2)))

    with hooked([(module, zero, False) for module in keep]):
        yield model


def removable_alone(model: nn.Module, units: Sequence[str], image_size: int) -> dict[str, str | None]:
    """For `unit: layer` plans: None for a conv whose output channels can be removed on their own (only the
    conv and its BN lose them; readers lose input slices), else why not (the convs its channels are tied to)."""
    dg = dependency_graph(model, image_size)
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for unit in units:
        group = tp_group(dg, model.get_submodule(unit), [0])
        tied = sorted({names[m] for m, _ in _losers(dg, group) if m is not model.get_submodule(unit)
                       and not isinstance(m, nn.BatchNorm2d)})
        bns = [m for m, _ in _losers(dg, group) if isinstance(m, nn.BatchNorm2d)]
        if len(bns) > 1 and not tied:
            tied = sorted(names[m] for m in bns)
        out[unit] = None if not tied else (f"its channels are tied to {', '.join(tied[:4])}"
                                           f"{f' and {len(tied) - 4} more' if len(tied) > 4 else ''} (residual "
                                           "addition, concatenation or depthwise conv): plan it as a group")
    return out


def removal_from(ks: Mapping[str, int], orders: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """The channels a plan removes: per unit the first K of its ranking (rankings.json's order), sorted."""
    return {u: sorted(int(c) for c in orders[u][:k]) for u, k in ks.items() if k}


def counter(model: nn.Module, orders: Mapping[str, Sequence[int]], kind: str,
            image_size: int) -> Callable[[Mapping[str, int]], float]:
    """`count` for `Planner.fit`: the MACs or params a plan's physically pruned model keeps (memoised)."""
    seen: dict[tuple, float] = {}

    def kept(ks: Mapping[str, int]) -> float:
        key = tuple(sorted(ks.items()))
        if key not in seen:
            pruned = pruned_copy(model, removal_from(ks, orders), image_size)
            seen[key] = getattr(counts(pruned, image_size), kind)
        return seen[key]

    return kept
