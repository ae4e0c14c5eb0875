"""What every entry point shares: logging set-up and exit codes (DESIGN §2)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable

from runner.device import tune_allocator
from runner.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, InputError

log = logging.getLogger("prune-sweep")


class Parser(argparse.ArgumentParser):
    """argparse with bad flags reported as one line (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; allowed: see {self.prog} --help; fix: correct the command line", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_main(main: Callable[[], int | None]) -> int:
    """Run an entry point: bad input -> one line and 2, Ctrl-C -> 130, anything else -> traceback and 1."""
    setup_logging(os.environ.get("PRUNE_SWEEP_DEBUG") == "1")
    # a log handler that cannot write (W&B's debug log on a full disk) must not print tracebacks of its own
    logging.raiseExceptions = False
    tune_allocator()
    try:
        return main() or EXIT_OK
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head` and the like
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        storage = _storage_error(e)
        if storage is not None:  # disk full, file too large, read-only: no traceback, the cause in one line
            print(f"error: {storage_message(storage)}", file=sys.stderr)
            return EXIT_FAILED
        log.exception("failed")
        return EXIT_FAILED


def storage_message(e: OSError) -> str:
    """One line for a disk-level failure while writing results."""
    what = (e.strerror or str(e)).rstrip(".")
    where = f" while writing {e.filename}" if e.filename else ""
    return (f"output: {what[:1].lower()}{what[1:]}{where}; everything written before it is intact (results.csv "
            "holds whole rows only); fix: make room or fix the folder, then run the same command with --resume")


def _storage_error(e: BaseException | None) -> OSError | None:
    """The disk-level OSError behind an exception (Tune wraps errors raised in its callbacks), if any."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None
