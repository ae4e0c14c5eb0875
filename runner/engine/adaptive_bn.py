"""Adaptive BN (EagleEye, Li et al. ECCV 2020): after a mask, the BatchNorm layers it reaches forget their
running statistics and estimate them again on a few held-out training images, as a cumulative average
(`momentum=None`: every batch weighs the same), with every other module in eval mode. A pruned network scored
this way ranks the way it ranks after fine-tuning far better than with the stale statistics (see
docs/adaptive-bn.md).

`estimate` runs the caller's batches with the layers in that state and returns their new statistics;
`using` evaluates with statistics so estimated. Both restore every layer as it was on exit, so a network
shared by many points is never left changed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from model.tracing import eval_mode

Stats = dict[str, tuple[Tensor, Tensor]]  # BN name -> (running_mean, running_var)


def norms_in(gm: fx.GraphModule, nodes: Sequence[fx.Node] | frozenset) -> tuple[str, ...]:
    """The BatchNorm layers (with running statistics) that `nodes` call, in graph order."""
    names = []
    for node in gm.graph.nodes:
        if node in nodes and node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, _BatchNorm) and module.track_running_stats:
                names.append(node.target)
    return tuple(dict.fromkeys(names))


def downstream_norms(model: nn.Module, starts: Sequence[str]) -> tuple[str, ...]:
    """The BatchNorm layers that read, directly or through other layers, the output of any module in `starts`
    (module names of the traced graph): the layers a mask at those outputs reaches."""
    from model.tracing import trace

    gm = trace(model)
    wanted = set(starts)
    seen: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in wanted]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return norms_in(gm, frozenset(seen))


@contextmanager
def _saved(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, _BatchNorm]]:
    """The named layers; their statistics, momentum and mode put back on exit (every module's mode too)."""
    layers = {n: model.get_submodule(n) for n in names}
    kept = {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
            for n, m in layers.items()}
    try:
        with eval_mode(model):
            yield layers
    finally:
        with torch.no_grad():
            for n, m in layers.items():
                mean, var, tracked, momentum = kept[n]
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
                m.momentum = momentum


def estimate(model: nn.Module, names: Sequence[str], run: Callable[[], None]) -> Stats:
    """The named layers' statistics re-estimated over the batches `run` sends through the network (each layer
    reset, momentum None, in train mode; every other module in eval mode). The model is left as it was."""
    with _saved(model, names) as layers:
        for m in layers.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        run()
        return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()}


@contextmanager
def using(model: nn.Module, stats: Stats) -> Iterator[None]:
    """Inside the block, the layers named in `stats` evaluate with those statistics (eval mode)."""
    with _saved(model, list(stats)) as layers, torch.no_grad():
        for n, m in layers.items():
            m.running_mean.copy_(stats[n][0])
            m.running_var.copy_(stats[n][1])
        yield
