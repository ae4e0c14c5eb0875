"""Bad input: one line that names the field, the value seen, what is allowed and the fix (exit code 2).

May import: nothing of the project.
"""

from __future__ import annotations

import os
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def shown(value: Any, limit: int = 80, path_limit: int = 4096) -> str:
    """A value as it appears in a message: repr, on one line, shortened; a path (a string or path with a
    separator in it) is named in full, however deep its folder (up to `path_limit` characters)."""
    text = " ".join(repr(str(value) if isinstance(value, os.PathLike) else value).split())
    if isinstance(value, (str, os.PathLike)) and os.sep in str(value):
        limit = path_limit
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plural(count: int, one: str, many: str | None = None) -> str:
    """`1 point`, `2 points`, `1,000 images` (`many` when adding an s is wrong: class -> classes)."""
    return f"{count:,} {one if count == 1 else (many or one + 's')}"


class InputError(Exception):
    """A problem with what the user gave us (grid file, flags, checkpoint, data) that they can fix."""

    def __init__(self, field: str, value: Any, problem: str, allowed: str, fix: str, source: str | None = None):
        self.field, self.value, self.problem, self.allowed, self.fix = field, value, problem, allowed, fix
        self.source = source
        super().__init__(str(self))

    def at(self, source: str) -> "InputError":
        """The same error, attributed to a source (a grid file or a flag) when it had none yet."""
        if self.source is None:
            self.source = source
        return self

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.field}: {self.problem}: got {shown(self.value)}; allowed: {self.allowed}; fix: {self.fix}"
