"""Scoped forward hooks: every hook of the project lives only inside a `with` block (`hooked`), and the
activations of named modules are read through them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import Tensor, nn

Watcher = Callable[[Tensor, Tensor], None]
Hook = tuple[nn.Module, Callable, bool]  # a module, the hook, True for a forward pre-hook (False: after forward)


@contextmanager
def hooked(hooks: Iterable[Hook]) -> Iterator[None]:
    """The hooks registered for the block only: all removed when it exits, also when a registration, the
    forward or a hook raises."""
    handles = []
    try:
        for module, fn, pre in hooks:
            handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def watch(model: nn.Module, watchers: dict[str, Watcher]) -> Iterator[None]:
    """Call `watchers[name](input, output)` on every forward of each named module, inside the block only.

    The hooks are removed when the block exits, also when the forward or a watcher raises.
    """
    modules = dict(model.named_modules())
    missing = sorted(set(watchers) - set(modules))
    if missing:
        raise KeyError(f"no module named {', '.join(missing)} in {type(model).__name__}")
    with hooked([(modules[name], _hook(fn), False) for name, fn in watchers.items()]):
        yield


def _hook(fn: Watcher) -> Callable:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        fn(inputs[0], output)

    return hook


@contextmanager
def capture(model: nn.Module, names: list[str], what: str = "output") -> Iterator[dict[str, Tensor]]:
    """Feature maps of named modules: the dict holds each module's latest `output` (or `input`)."""
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Watcher:
        def store(inp: Tensor, out: Tensor) -> None:
            seen[name] = (inp if what == "input" else out).detach()

        return store

    with watch(model, {name: keep(name) for name in names}):
        yield seen
