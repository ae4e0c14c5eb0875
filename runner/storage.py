"""Files written whole or not at all: a file is written beside its final name, flushed to disk and renamed into
place, so a full disk or a crash never leaves a truncated checkpoint, figure, array or report behind. The one
atomic writer of the project (stdlib only: every layer may use it).

May import: nothing of the project."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write to; renamed to `path` when the block succeeds, removed when it fails. An
    OSError leaves naming the final path (PIL and numpy often raise it without one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fsync(path: Path) -> None:
    """The data on disk before the rename makes it visible (a crash right after never shows an empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
