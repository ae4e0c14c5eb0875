"""Latency tables (docs/latency.md): per unit and K, the base model's time on the target with only that unit
pruned by K, physically; and what plans make of them. Plain Python: the timing is a callable.

An entry is measured in alternation with the base model (`runner.planning.timing.Timer.pair`), so its saving,
`base_ms - ms` of the same rounds, is paired: a slow spell of the machine moves both. The table's base time is
the median of every entry's base median, and an entry's saving in the table is its paired saving as a fraction
of its own rounds' base, times the table's base time (a spell that slowed both by 10% leaves it as it is). A
plan's predicted time is that base time less the summed savings of its units' K (a K between two entries is
interpolated); its standard error, from the entries' own, is `Table.se`.

A table is cached in `<output>/<name>/latency/<key file>.json` under its target key (runtime and version,
device, machine, batch, threads, image size, base sha256): a later plan, or a later job, with the same key
reuses every entry it has, and measures only the (unit, K) it lacks, or that were timed to a looser precision
than the target asks (`plan.target.precision`); the file is written after every entry, so a killed job loses
at most one.

`envelope` is what `round_to: auto` keeps of a unit: the K whose time is below that of every smaller K (a K
that costs more time than a smaller K is never chosen); `avoided` lists the others.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from runner.planning.curves import Curve, Option
from runner.storage import write_text

log = logging.getLogger(__name__)

FORMAT = "prune-sweep/latency-table/1"
FOLDER = "latency"


@dataclass(frozen=True)
class Entry:
    """One unit pruned by K alone: its median forward time, spread, and the base's median in the same rounds."""

    ms: float
    low: float
    high: float
    base_ms: float
    runs: int
    seconds: float = 0.0  # how long measuring it took (removal, export, warm-up and timing)
    ratio: float | None = None  # median over the rounds of its time over the base's (None: ms / base_ms)
    se: float | None = None  # the standard error of that ratio
    precision: float | None = None  # the standard error it was timed to reach (None: a fixed number of rounds)
    passes: tuple[tuple[float, float], ...] = ()  # (ratio, se) of each time it was timed, minutes apart

    @property
    def saved(self) -> float:
        return self.base_ms - self.ms

    @property
    def fraction(self) -> float:
        """Its saving as a fraction of the base's time in the same rounds (paired round by round when the
        rounds gave a ratio)."""
        return self.saved / self.base_ms if self.ratio is None else 1.0 - self.ratio


@dataclass
class Table:
    key: dict[str, Any]
    entries: dict[str, dict[int, Entry]] = field(default_factory=dict)  # unit -> K -> entry

    @property
    def base_ms(self) -> float:
        """The base model's time: the median of every entry's base median."""
        bases = sorted(e.base_ms for by_k in self.entries.values() for e in by_k.values())
        if not bases:
            raise ValueError("an empty latency table has no base time")
        n = len(bases)
        return bases[n // 2] if n % 2 else (bases[n // 2 - 1] + bases[n // 2]) / 2

    def saved(self, unit: str, k: int) -> float:
        """ms saved by pruning K channels of `unit` alone; interpolated between measured K (0 at K = 0)."""
        if k == 0:
            return 0.0
        lo, hi, w = self._between(unit, k)
        a = 0.0 if lo is None else lo.fraction
        return self.base_ms * (a + w * (hi.fraction - a))

    def _between(self, unit: str, k: int) -> tuple[Entry | None, Entry, float]:
        """The entries at or either side of K (None below the smallest: K = 0 saves nothing), and K's weight on
        the upper one."""
        by_k = self.entries[unit]
        if k in by_k:
            return None, by_k[k], 1.0
        ks = sorted(by_k)
        lo = max((x for x in ks if x < k), default=0)
        hi = min((x for x in ks if x > k), default=None)
        if hi is None:
            raise ValueError(f"{unit}: K={k} beyond the table's largest K {ks[-1]}")
        return (by_k[lo] if lo else None), by_k[hi], (k - lo) / (hi - lo)

    def se(self, ks: Mapping[str, int]) -> float | None:
        """The standard error of a plan's summed savings, as a fraction of the base's time, from its entries'
        (an interpolated K takes the larger of its two entries'); None when an entry has none recorded."""
        total = 0.0
        for u, k in ks.items():
            if not k:
                continue
            lo, hi, _ = self._between(u, k)
            ses = [e.se for e in (lo, hi) if e is not None]
            if any(x is None for x in ses):
                return None
            total += max(ses) ** 2
        return math.sqrt(total)

    def predict(self, ks: Mapping[str, int]) -> float:
        """A plan's predicted time: the base time less its units' summed savings."""
        return self.base_ms - sum(self.saved(u, k) for u, k in ks.items() if k)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for by_k in self.entries.values() for e in by_k.values())

    @property
    def size(self) -> int:
        return sum(len(by_k) for by_k in self.entries.values())

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "base_ms": self.base_ms if self.size else None,
                "entries": {u: {str(k): vars(e) for k, e in sorted(by_k.items())} for u, by_k in self.entries.items()}}

    def rows(self) -> list[dict[str, Any]]:
        """One row per entry (for W&B and the report)."""
        return [{"unit": u, "k": k, "ms": e.ms, "low": e.low, "high": e.high, "base_ms": e.base_ms,
                 "saved_ms": e.saved, "runs": e.runs, "seconds": e.seconds, "se": e.se}
                for u, by_k in self.entries.items() for k, e in sorted(by_k.items())]


def read_table(path: Path, key: Mapping[str, Any]) -> Table:
    """The cached table at `path` when it was measured under `key`; an empty one otherwise."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Table(dict(key))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("key") != dict(key):
        log.warning("latency table %s was measured under another key: measuring again", path)
        return Table(dict(key))
    entries = {u: {int(k): _entry(e) for k, e in by_k.items()} for u, by_k in raw.get("entries", {}).items()}
    return Table(dict(key), entries)


def _entry(raw: Mapping[str, Any]) -> Entry:
    return Entry(**{**raw, "passes": tuple(tuple(p) for p in raw.get("passes", ()))})


def write_table(path: Path, table: Table) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(path), json.dumps(table.as_json(), indent=1) + "\n")


Measure = Callable[[str, int], tuple[Any, Any]]  # (unit, K) -> (base Spread, pruned Spread)


def merged(old: Entry | None, new: Entry) -> Entry:
    """An entry timed once more (`new`, one pass) added to what `old` had: the passes' mean ratio, and a standard
    error that is the larger of their own, combined, and their spread over sqrt(passes): timings minutes apart
    differ by more than one timing's rounds say (the machine's state drifts), and only the passes see it."""
    if new.ratio is None or new.se is None:
        return new
    before = () if old is None else old.passes or (
        ((old.ratio, old.se),) if old.ratio is not None and old.se is not None else ())
    if not before:
        return replace(new, passes=((new.ratio, new.se),))
    passes = before + ((new.ratio, new.se),)
    n = len(passes)
    ratios = [r for r, _ in passes]
    own = math.sqrt(sum(se * se for _, se in passes)) / n
    se = max(own, statistics.stdev(ratios) / math.sqrt(n))

    def avg(a: float, b: float) -> float:
        return round((a * (n - 1) + b) / n, 4)

    return Entry(avg(old.ms, new.ms), avg(old.low, new.low), avg(old.high, new.high), avg(old.base_ms, new.base_ms),
                 old.runs + new.runs, round(old.seconds + new.seconds, 3), round(sum(ratios) / n, 6), round(se, 6),
                 new.precision, passes)


def looser(entry: Entry | None, precision: float | None) -> bool:
    """Whether an entry is missing, or was timed to a looser precision than `precision` asks."""
    if entry is None:
        return True
    return precision is not None and (entry.precision is None or entry.precision > precision)


def _timed(entry: Entry | None) -> int:
    """How many passes an entry has (one for an entry timed before passes were kept)."""
    return 0 if entry is None else max(1, len(entry.passes))


def fill_table(path: Path, key: Mapping[str, Any], wanted: Mapping[str, Sequence[int]], measure: Measure,
               clock: Callable[[], float] = time.perf_counter, precision: float | None = None,
               passes: int = 1) -> tuple[Table, int]:
    """The table at `path` with every (unit, K > 0) of `wanted` timed `passes` times: entries it has are reused,
    the rest (and those timed to a looser precision, from scratch) measured one by one (`measure(unit, k)`, which
    times to `precision`), a whole pass over the table before the next, each written as it is made, with
    progress logged. Also returns how many timings were made."""
    table = read_table(path, key)
    entries = [(u, k) for u, ks in wanted.items() for k in sorted(set(ks)) if k]
    for u, k in entries:
        if k in table.entries.get(u, {}) and looser(table.entries[u][k], precision):
            del table.entries[u][k]  # timed to a looser precision: its passes are not worth keeping
    todo = [(p, u, k) for p in range(1, passes + 1) for u, k in entries
            if _timed(table.entries.get(u, {}).get(k)) < p]
    have = sum(_timed(table.entries.get(u, {}).get(k)) for u, k in entries)
    if not todo:
        log.info("latency table %s: all %d entries reused", path, len(entries))
        return table, 0
    log.info("latency table %s: %d timings to make (%d entries x %d passes; %d reused)", path, len(todo),
             len(entries), passes, have)
    started = clock()
    for i, (p, unit, k) in enumerate(todo, 1):
        t0 = clock()
        base, pruned = measure(unit, k)
        new = Entry(round(pruned.median, 4), round(pruned.low, 4), round(pruned.high, 4), round(base.median, 4),
                    pruned.runs, round(clock() - t0, 3), _rounded(pruned.ratio), _rounded(pruned.ratio_se),
                    precision)
        entry = merged(table.entries.get(unit, {}).get(k), new)
        table.entries.setdefault(unit, {})[k] = entry
        write_table(path, table)
        spent = clock() - started
        log.info("latency table %d/%d (pass %d of %d): %s K=%d %.2f ms (base %.2f, saves %.1f%% +- %.1f, %d "
                 "rounds); %.0f s, about %.0f s left", i, len(todo), p, passes, unit, k, new.ms, new.base_ms,
                 100 * entry.fraction, 100 * (entry.se or 0.0), new.runs, spent, spent / i * (len(todo) - i))
    return table, len(todo)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def envelope(table: Table, unit: str, ks: Sequence[int] | None = None) -> list[int]:
    """The K of `unit` (of `ks`, default all the table has) on the table's lower envelope: each faster than
    every smaller K (K = 0 included: the base)."""
    kept, best = [], table.base_ms
    for k in sorted(table.entries.get(unit, {}) if ks is None else ks):
        ms = table.base_ms - table.saved(unit, k)
        if ms < best:
            kept.append(k)
            best = ms
    return kept


def avoided(table: Table, unit: str, channels: int, ks: Sequence[int] | None = None) -> list[int]:
    """Channel counts (kept) that `round_to: auto` never chooses for `unit`: off the lower envelope."""
    ks = sorted(table.entries.get(unit, {}) if ks is None else ks)
    on = set(envelope(table, unit, ks))
    return [channels - k for k in ks if k not in on]


def latency_curves(curves: Sequence[Curve], table: Table, wanted: Mapping[str, Sequence[int]],
                   auto: bool) -> list[Curve]:
    """Each unit's curve at its `wanted` K (those of them on the lower envelope when `auto`), with each option's
    latency saving from the table; drops, MACs and params from the sweep's curve."""
    out = []
    for c in curves:
        ks = sorted(wanted.get(c.unit, []))
        ks = envelope(table, c.unit, ks) if auto else ks
        points = [c.points[0]] + [_with_latency(c.at(k), table.saved(c.unit, k)) for k in ks if 0 < k <= c.kmax]
        out.append(Curve(c.unit, c.channels, tuple(points)))
    return out


def _with_latency(o: Option, saved: float) -> Option:
    return Option(o.k, o.drop, o.macs, o.params, o.measured, latency=saved)
