"""results.csv: one row per point, appended (and flushed to disk) as points finish, each point once.

A point is (layer, criterion, K, repeat): `repeat` numbers the random orders of a criterion that draws several
(random: sweep.random_repeats rows per K), and is 0 for every other criterion.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from runner.basics import TrialId

if TYPE_CHECKING:
    import pandas

STEP = {"step": True}  # a column also logged at every K of the trial's W&B run


@dataclass(frozen=True)
class PointRow:
    """The schema of a results.csv row, one measured point: its fields are the file's columns, in order, with
    their types (docs/outputs.md). Columns, types and the W&B step metrics are all read from here."""

    unit: str  # layer | group
    layer: str
    criterion: str
    target: str
    k: int
    repeat: int = field(metadata=STEP)
    fraction: float = field(metadata=STEP)
    channels: int
    accuracy: float = field(metadata=STEP)
    loss: float = field(metadata=STEP)
    baseline_accuracy: float  # the trial's own K = 0
    accuracy_drop: float = field(metadata=STEP)
    drop_low: float = field(metadata=STEP)  # 95% paired interval on the drop, points
    drop_high: float = field(metadata=STEP)
    right_to_wrong: int
    wrong_to_right: int
    params_removed: int = field(metadata=STEP)
    macs_removed: int = field(metadata=STEP)
    eval_images: int
    checkpoint_sha256: str
    seconds: float
    node: str
    device: str
    dtype: str
    per_class_accuracy: list[float]


COLUMNS = tuple(f.name for f in fields(PointRow))
STEP_METRICS = tuple(f.name for f in fields(PointRow) if f.metadata.get("step"))
INTS = {f.name for f in fields(PointRow) if f.type == "int"}
FLOATS = {f.name for f in fields(PointRow) if f.type == "float"}
TEXTS = {f.name for f in fields(PointRow) if f.type == "str"}  # ids that may look like numbers

Key = tuple[str, str, int, int]  # layer, criterion, k, repeat


class FeatureMaps(NamedTuple):
    """A point's mean feature maps (name -> float16 array) as one opaque value of its Tune result: Tune neither
    flattens it nor prints the arrays (Tune formats every result into a debug message, whatever the log level)."""

    arrays: dict[str, Any]

    def __repr__(self) -> str:
        return "FeatureMaps(" + ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in self.arrays.items()) + ")"


def by_trial(rows: Iterable[dict[str, Any]]) -> dict[TrialId, list[dict[str, Any]]]:
    """Rows grouped by trial, in first-seen order, each trial's rows by ascending K (then repeat)."""
    out: dict[TrialId, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(TrialId(r["layer"], r["criterion"]), []).append(r)
    return {t: sorted(pts, key=lambda r: (r["k"], r.get("repeat") or 0)) for t, pts in out.items()}


class ResultsError(OSError):
    """Writing results failed (disk full, permissions); the file still holds only whole rows."""


def key_of(row: dict[str, Any]) -> Key:
    return row["layer"], row["criterion"], int(row["k"]), int(row.get("repeat") or 0)


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
            row[c] = int(row[c]) if row[c] != "" else None
        for c in FLOATS & row.keys():
            row[c] = float(row[c]) if row[c] != "" else None
        rows.append(row)
    return rows


def frame_of(path: Path) -> "pandas.DataFrame":
    """results.csv as a DataFrame, row for row (a last line cut short by a crash is left out): the columns in
    the file's order, integers and floats as numbers (and any other numeric column the file has), text as text,
    `per_class_accuracy` as a list of floats."""
    import pandas as pd

    rows = read_rows(path)
    columns = list(rows[0]) if rows else list(COLUMNS)
    frame = pd.DataFrame.from_records(rows, columns=columns)
    for c in columns:
        if c in INTS:
            frame[c] = frame[c].astype("int64")
        elif c in FLOATS:
            frame[c] = frame[c].astype("float64")
        elif c == "per_class_accuracy":
            frame[c] = frame[c].map(per_class)
        elif c in TEXTS or not rows:
            frame[c] = frame[c].astype(str)
        else:  # a column this version does not know: numbers if they all are
            try:
                frame[c] = pd.to_numeric(frame[c])
            except (ValueError, TypeError):
                frame[c] = frame[c].astype(str)
    return frame


def per_class(cell: Any) -> list[float]:
    """A per_class_accuracy cell ("95.00;87.50;...") as floats."""
    if isinstance(cell, (list, tuple)):
        return [float(v) for v in cell]
    return [float(v) for v in str(cell).split(";") if v != ""]


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
