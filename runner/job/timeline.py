"""Where a sweep's seconds go: wall-clock marks of its phases, from the process's start to the report.

Logged at -v, and read by `scripts/bench.py --end-to-end` (the `timeline {...}` line). The fixed part of a
sweep is everything that is not measuring points: the time to the first point plus the time after the last.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def process_start() -> float:
    """Wall-clock time this process started (Linux: its start in clock ticks after boot, against the uptime now,
    both to 10 ms; the boot time /proc/stat gives is rounded to whole seconds. Elsewhere: now)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


@dataclass
class Timeline:
    """Phases in order; each mark closes the phase named by it."""

    start: float = field(default_factory=process_start)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, phase: str, when: float | None = None) -> None:
        self.marks[phase] = time.time() if when is None else when

    def phases(self) -> dict[str, float]:
        """Seconds per phase (marks in time order; a phase starts where the previous one ended)."""
        out, before = {}, self.start
        for phase, when in sorted(self.marks.items(), key=lambda kv: kv[1]):
            out[phase] = round(when - before, 2)
            before = when
        return out

    def fixed_seconds(self) -> float | None:
        """Time to the first point plus time after the last point (None before both are known)."""
        m = self.marks
        if "first point" not in m or "last point" not in m or not m:
            return None
        return round((m["first point"] - self.start) + (max(m.values()) - m["last point"]), 2)

    def log(self) -> None:
        phases = self.phases()
        log.debug("timeline: %s; fixed part (to the first point and after the last) %s s",
                  " | ".join(f"{k} {v:.1f} s" for k, v in phases.items()), self.fixed_seconds())
        log.debug("timeline %s", json.dumps({"phases": phases, "fixed": self.fixed_seconds(), "start": self.start,
                                             "first_point": self.marks.get("first point"),
                                             "last_point": self.marks.get("last point")}))
