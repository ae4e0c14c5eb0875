"""What every entry point shares: logging set-up and exit codes (DESIGN §2)."""

from __future__ import annotations

import argparse
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
    tune_allocator()
    try:
        return main() or EXIT_OK
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        log.exception("failed")
        return EXIT_FAILED
