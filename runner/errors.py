"""Bad input: one line that names the field, the value seen, what is allowed and the fix (exit code 2)."""

from __future__ import annotations

from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def shown(value: Any, limit: int = 80) -> str:
    """A value as it appears in a message: repr, on one line, shortened."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
