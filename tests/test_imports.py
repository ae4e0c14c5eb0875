"""Imports go one way: no cycle under model/ and runner/, `model` imports nothing from `runner`, and each runner
layer imports only what its package docstring allows (read from the source, every import statement counted,
also those inside functions)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("model", "runner")
# words of a "Never ..." sentence that name a third-party package, and the import names they stand for
THIRD_PARTY = {"Ray": ("ray",), "W&B": ("wandb",), "torch": ("torch", "torchvision")}


def docstring_of(layer: str) -> str:
    """A layer's docstring: its package's __init__.py, or its module's."""
    path = ROOT.joinpath(*layer.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def rule_of(doc: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the project's modules a layer may import, the third-party packages it never imports), read from its
    docstring's "May import:" sentence (the names in backticks) and "Never ..." sentence (Ray, W&B, torch)."""
    text = " ".join(doc.split())
    may = text.partition("May import:")[2].partition(" Never ")[0]
    allowed = tuple(re.findall(r"`((?:model|runner)(?:\.\w+)*)`", may))
    never = text.partition(" Never ")[2].partition(". ")[0]
    forbidden = tuple(name for word, names in THIRD_PARTY.items() if re.search(rf"(?<![\w`]){re.escape(word)}\b", never)
                      for name in names)
    return allowed, forbidden


def layers() -> list[str]:
    """`model`, `runner`, every subpackage of runner and every module directly in it."""
    subpackages = [f"runner.{p.parent.name}" for p in (ROOT / "runner").glob("*/__init__.py")]
    modules = [f"runner.{p.stem}" for p in (ROOT / "runner").glob("*.py") if p.stem != "__init__"]
    return sorted(["model", "runner", *subpackages, *modules])


RULES = {layer: rule_of(docstring_of(layer)) for layer in layers()}
ALLOWED = {layer: allowed for layer, (allowed, _) in RULES.items()}
FORBIDDEN_THIRD_PARTY = {layer: forbidden for layer, (_, forbidden) in RULES.items() if forbidden}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module a file imports (absolute names; `from pkg import mod` counts as pkg.mod when that is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in modules else node.module)
    return out


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str) -> str:
    return max((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), key=len)


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_under_model_and_runner() -> None:
    assert find_cycle(project_graph()) is None


def test_model_imports_nothing_from_runner() -> None:
    bad = {m: sorted(i for i in imps if i.split(".")[0] == "runner")
           for m, imps in project_graph().items() if m.startswith("model")}
    assert {m: v for m, v in bad.items() if v} == {}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    graph = project_graph()
    own = [m for m in graph if layer_of(m) == layer]
    assert own, f"no module in layer {layer}"
    wrong = []
    for m in own:
        for i in graph[m]:
            if i.split(".")[0] in PACKAGES and i not in ("model", "runner") and not any(
                    i == a or i.startswith(a + ".") for a in (layer, *ALLOWED[layer])):
                wrong.append(f"{m} -> {i}")
            if i.split(".")[0] in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                wrong.append(f"{m} -> {i}")
    assert wrong == []


@pytest.mark.parametrize("layer", layers())
def test_every_layer_states_its_rule(layer: str) -> None:
    assert "May import:" in docstring_of(layer)


def test_the_rules_are_read_from_the_docstrings() -> None:
    assert rule_of("Tensors in.\n\nMay import: `model`, `runner.engine`, `runner.errors`. Never Ray, W&B, the grid\n"
                   "(`runner.config`), or the layers above it.") == (("model", "runner.engine", "runner.errors"),
                                                                    ("ray", "wandb"))
    assert rule_of("May import: nothing of the project.") == ((), ())
    assert ALLOWED["runner.inputs"] == ("model", "runner.engine", "runner.inputs", "runner.basics", "runner.config",
                                        "runner.errors", "runner.storage", "runner.provenance")
    assert FORBIDDEN_THIRD_PARTY["runner.outputs"] == ("ray", "torch", "torchvision")
    assert FORBIDDEN_THIRD_PARTY["model"] == ("ray", "wandb")


@pytest.mark.parametrize("command", ["sweep", "train", "prune"])
def test_scripts_only_call_the_command(command: str) -> None:
    """scripts/<command>.py is the command's shim (scripts/bench.py and gpu_check.py are programs of their own)."""
    text = (ROOT / "scripts" / f"{command}.py").read_text(encoding="utf-8")
    assert "sys.path" not in text and len(text.splitlines()) <= 10
    assert f'leave(main(["{command}", *sys.argv[1:]]))' in text


def test_import_runner_is_cheap_and_the_api_is_there() -> None:
    """`from runner import sweep, load_results` (runner.api, re-exported on first use) loads neither torch, Ray nor
    pandas until a function is called."""
    import subprocess

    code = ("import sys, runner; from runner import sweep, load_results; "
            "print(sorted(m for m in ('torch', 'ray', 'pandas', 'wandb') if m in sys.modules)); "
            "print(sweep.__module__, load_results.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "runner.api runner.api"]


def test_planning_a_sweep_and_listing_layers_import_no_compiler() -> None:
    """Shapes come from CPU forwards, not meta ones: a forward on meta tensors imports torch._dynamo (0.7 s of
    every sweep's start, before anything else could begin, and of every trial worker's first trial), and moving
    meta tensors to the CPU imports sympy (0.15 s). Nor does the trials' module load triton, as
    torch.utils.flop_counter does (60 ms of the sweep's input checks and of every trial worker's start): MACs are
    counted only by the commands that count them."""
    import subprocess

    code = ("import sys; from runner.config import load_grid; from runner.inputs.trials import plan_trials; "
            "from model.layers import list_convs; from model.resnet import ResNet18; import runner.job.trial; "
            "plan = plan_trials(load_grid('sweeps/demo.yaml', [])); "
            "layers = {c.name: c for c in list_convs(ResNet18(width=0.125, num_classes=10))}; "
            "print(any(m in sys.modules for m in ('torch._dynamo', 'sympy', 'triton', 'torch.utils.flop_counter')), "
            "plan.table['layer2.0.conv1'].in_hw, plan.table['layer2.0.conv1'].out_hw, "
            "layers['layer3.0.conv2'].in_hw, layers['layer3.0.conv2'].out_hw)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "(32,", "32)", "(16,", "16)", "(8,", "8)", "(8,", "8)"]
