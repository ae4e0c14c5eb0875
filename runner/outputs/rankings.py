"""rankings.json: the channel order and scores of every (layer, criterion) of a sweep, written once.

One JSON object keyed by trial name ("<layer>/<criterion>", `TrialId.key`); each value is
{"order": [channel indices, lowest score first: the first K are the ones pruned at K], "scores": [per channel]},
and for a criterion that draws several orders (random) "order" and "scores" are lists of those lists, one per
repeat, with "seeds" (one per repeat). One entry per line, so that the file reads (and edits) by hand.
`--resume` reads the orders from here instead of ranking again, so one curve never mixes two orders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.errors import InputError
from runner.storage import write_text

NAME = "rankings.json"


def write_rankings(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in entries.items()]
    write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")


def read_rankings(path: Path) -> dict[str, dict[str, Any]]:
    """The file's entries, checked for shape only (the job checks them against the network)."""
    fix = "restore it, or delete it to rank again (points already in results.csv keep their order)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(NAME, str(path), f"not readable JSON ({type(e).__name__})",
                         "the file the first run of this sweep wrote", fix) from None
    if not isinstance(data, dict):
        raise InputError(NAME, str(path), "not a JSON object", 'an object keyed "<layer>/<criterion>"', fix)
    for key, value in data.items():
        if not isinstance(value, dict) or not {"order", "scores"} <= value.keys():
            raise InputError(f"{NAME}: {key}", value, "not an entry", '{"order": [...], "scores": [...]}', fix)
    return data
