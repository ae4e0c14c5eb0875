"""The docs cannot drift: every key of the grid schema is named in docs/grid.md by its dotted path, and every
docs page (and section) that the code, the grids, the README or the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT
from pydantic import BaseModel

from runner.config import Grid

NAMED_IN = ("runner", "model", "scripts", "tests", "sweeps", "docs", "README.md")
PAGE = re.compile(r"docs/([\w-]+\.md)(#[\w-]+)?")
LINK = re.compile(r"\]\(((?:docs/)?[\w-]+\.md)(#[\w-]+)?\)")  # a markdown link to a page, relative or from the root


def sections(annotation: object) -> list[type[BaseModel]]:
    """The sections a field holds: `TrainConfig | None` and `list[Budget]` hold one each."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in getattr(annotation, "__args__", ()) for m in sections(a)]


def grid_keys(model: type[BaseModel] = Grid, prefix: str = "") -> list[str]:
    """Every key of the grid file by dotted path, sections included; a list's items as `list[].key`."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        for section in sections(info.annotation):
            nested = "[]." if "list[" in str(info.annotation) else "."
            keys += grid_keys(section, prefix + name + nested)
    return keys


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def named_pages() -> list[tuple[str, str, str]]:
    """(where, page, anchor) for every docs page named in the code, the grids, the README and the docs."""
    files = [p for name in NAMED_IN for p in ([ROOT / name] if name.endswith(".md") else (ROOT / name).rglob("*"))
             if p.is_file() and p.suffix in (".py", ".yaml", ".md", ".sh", ".cfg", ".toml")]
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(ROOT))
        for page, anchor in PAGE.findall(text):
            found.append((where, page, anchor))
        if path.suffix == ".md":
            for target, anchor in LINK.findall(text):
                found.append((where, Path(target).name, anchor))
    return found


def test_the_walk_finds_every_key_of_the_schema() -> None:
    keys = grid_keys()
    assert len(keys) == len(set(keys))
    assert {"name", "plan", "plan.finetune.epochs", "plan.budgets[].macs", "sweep.k.range",
            "checkpoint.train.recipe", "resources.tune_storage"} <= set(keys)
    assert "plan.budgets.macs" not in keys and "checkpoint.train" in keys


def test_every_grid_key_is_in_docs_grid_md() -> None:
    text = (ROOT / "docs" / "grid.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w.\[\]]+)`", text))
    assert [k for k in grid_keys() if k not in named] == []


def test_a_missing_key_is_named() -> None:
    class Inner(BaseModel):
        depth: int = 1

    class Outer(BaseModel):
        items: list[Inner] = []
        inner: Inner | None = None

    assert grid_keys(Outer) == ["items", "items[].depth", "inner", "inner.depth"]


def test_slugs_are_githubs() -> None:
    assert slug("On a GPU: `scripts/gpu_check.sh`") == "on-a-gpu-scriptsgpu_checksh"
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("`plan` (`prune-sweep prune`)") == "plan-prune-sweep-prune"


def test_the_docs_pages_of_the_issue_exist() -> None:
    for page in ("grid", "outputs", "numbers", "cluster", "design", "benchmarks"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), page


@pytest.mark.parametrize("where, page, anchor", named_pages())
def test_every_named_docs_page_exists(where: str, page: str, anchor: str) -> None:
    path = ROOT / "docs" / page
    assert path.is_file(), f"{where} names docs/{page}, which does not exist"
    if anchor:
        assert anchor[1:] in anchors(path), f"{where} names docs/{page}{anchor}, a section docs/{page} lacks"



def test_every_results_column_is_in_docs_outputs_md() -> None:
    from runner.outputs.results import COLUMNS

    named = set(re.findall(r"`([\w*]+)`", (ROOT / "docs" / "outputs.md").read_text(encoding="utf-8")))
    assert len(COLUMNS) == 25 and [c for c in COLUMNS if c not in named] == []


def test_the_readme_pictures_exist() -> None:
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert pictures and [p for p in pictures if not (ROOT / p).is_file()] == []
