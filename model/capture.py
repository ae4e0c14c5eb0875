"""Scoped access to the activations of named modules: hooks live only inside a `with` block."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor, nn

Watcher = Callable[[Tensor, Tensor], None]


@contextmanager
def watch(model: nn.Module, watchers: dict[str, Watcher]) -> Iterator[None]:
    """Call `watchers[name](input, output)` on every forward of each named module, inside the block only.

    The hooks are removed when the block exits, also when the forward or a watcher raises.
    """
    modules = dict(model.named_modules())
    missing = sorted(set(watchers) - set(modules))
    if missing:
        raise KeyError(f"no module named {', '.join(missing)} in {type(model).__name__}")
    handles = []
    try:
        for name, fn in watchers.items():
            handles.append(modules[name].register_forward_hook(_hook(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
