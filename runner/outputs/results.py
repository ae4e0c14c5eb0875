"""results.csv: one row per point, appended (and flushed to disk) as points finish, each point once."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple

COLUMNS = ("unit", "layer", "criterion", "target", "k", "fraction", "channels", "accuracy", "loss", "baseline_accuracy",
           "accuracy_drop", "params_removed", "macs_removed", "eval_images", "checkpoint_sha256", "seconds", "node",
           "device", "per_class_accuracy")
INTS = {"k", "channels", "params_removed", "macs_removed", "eval_images"}
FLOATS = {"fraction", "accuracy", "loss", "baseline_accuracy", "accuracy_drop", "seconds"}

Key = tuple[str, str, int]  # layer, criterion, k


class TrialId(NamedTuple):
    """One trial: a (layer, criterion)."""

    layer: str
    criterion: str

    @property
    def key(self) -> str:
        """Its name: the W&B run name and the rankings.json key."""
        return f"{self.layer}/{self.criterion}"


def by_trial(rows: Iterable[dict[str, Any]]) -> dict[TrialId, list[dict[str, Any]]]:
    """Rows grouped by trial, in first-seen order, each trial's rows by ascending K."""
    out: dict[TrialId, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(TrialId(r["layer"], r["criterion"]), []).append(r)
    return {t: sorted(pts, key=lambda r: r["k"]) for t, pts in out.items()}


class ResultsError(OSError):
    """Writing results failed (disk full, permissions); the file still holds only whole rows."""


def key_of(row: dict[str, Any]) -> Key:
    return row["layer"], row["criterion"], int(row["k"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a results file, typed; a last line cut short by a crash is ignored."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # an unfinished last row is not a result
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = dict(raw)
        for c in INTS & row.keys():
            row[c] = int(row[c])
        for c in FLOATS & row.keys():
            row[c] = float(row[c])
        rows.append(row)
    return rows


class ResultsTable:
    """Appends rows to results.csv, skipping points already there (a retried or resumed trial may report a
    point twice). Every row is one write, flushed and fsynced; a failed write is rolled back to the last
    whole row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = read_rows(path)
        self.keys = {key_of(r) for r in self.rows}
        if self.path.is_file():
            self._trim_partial_line()
        else:
            self._append(",".join(COLUMNS) + "\n")

    def _trim_partial_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def add(self, row: dict[str, Any]) -> bool:
        """Append one point; False when it was already recorded."""
        key = key_of(row)
        if key in self.keys:
            return False
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow([_cell(row.get(c, "")) for c in COLUMNS])
        self._append(line.getvalue())
        self.keys.add(key)
        self.rows.append(row)
        return True

    def _append(self, text: str) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            try:
                with open(self.path, "r+b") as f:
                    f.truncate(size)
            except OSError:
                pass
            raise ResultsError(e.errno, e.strerror, str(self.path)) from e


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, (list, tuple)):
        return ";".join(_cell(v) if not isinstance(v, float) else f"{v:.2f}" for v in value)
    return value
