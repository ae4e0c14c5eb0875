"""The `prune-sweep` command (and the scripts, which call it): arguments, logging, exit codes.

    prune-sweep sweep --grid FILE [--output DIR] [--resume] [--wandb-mode M] [--address A] [--dry-run] [--set K=V]
    prune-sweep train --grid FILE [--set K=V]
    prune-sweep prune --grid FILE [--output DIR] [--resume] [--wandb-mode M] [--address A] [--dry-run] [--set K=V]
    prune-sweep validate --grid FILE [--output DIR] [--wandb-mode M] [--address A] [--dry-run] [--set K=V]
    prune-sweep score --grid FILE --model plans/<budget>-<method>/pruned.pt|pruned.onnx [--set K=V]

May import: `runner.job` (the jobs), `runner.engine.device` (the allocator, set first), `runner.errors`.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import sys
import threading
from typing import Callable, NoReturn, Sequence

from runner.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, InputError, plural

log = logging.getLogger("prune-sweep")

PROG = "prune-sweep"


class Parser(argparse.ArgumentParser):
    """argparse with bad flags reported as one line (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}; allowed: see {self.prog} --help; fix: correct the command line", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


OURS = ("runner", "model", "prune-sweep")  # loggers that -v turns to debug (libraries stay at info)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=max(level, logging.INFO), stream=sys.stderr, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(message)s", force=True)
    for name in OURS:
        logging.getLogger(name).setLevel(level)


def run_main(main: Callable[[], int | None], level: int = logging.INFO) -> int:
    """Run an entry point: bad input -> one line and 2, Ctrl-C -> 130, anything else -> traceback and 1."""
    from runner.engine.device import tune_allocator

    setup_logging(level)
    own_wandb_service()
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


def own_wandb_service() -> None:
    """A command starts its own W&B service. W&B tells child processes its service's address (WANDB_SERVICE); a
    job started by a process that uses W&B (a test session, a notebook, an orchestrating script) would log into
    that parent's service, where the runs of a killed job stay open, so that its --resume finds their ids in use
    and logs nothing. Ray's workers, children of the command, still share the command's service."""
    inherited = os.environ.pop("WANDB_SERVICE", None)
    if inherited is not None:
        log.debug("W&B: not using the parent process's service (%s); starting this command's own", inherited)


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


def _common() -> argparse.ArgumentParser:
    """Flags every command takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--grid", required=True, help="grid file (YAML): see sweeps/ and docs/grid.md")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the grid file (a YAML value), e.g. --set sweep.criteria=[l1_norm]")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
    talk.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def version() -> str:
    """The installed package's version ("unknown" when run from a checkout that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed(PROG)
    except PackageNotFoundError:
        return "unknown"


def parser() -> Parser:
    top = Parser(prog=PROG, description="Measure how sensitive each layer of a trained CNN is to channel pruning, "
                 "on Ray Tune, tracked in Weights & Biases.",
                 epilog="Exit codes: 0 done, 1 failed, 2 bad input (one line says what and how to fix it), "
                 "130 interrupted (continue with --resume).")
    top.add_argument("--version", action="version", version=f"{PROG} {version()}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sweep = commands.add_parser("sweep", parents=[_common()], help="run a sensitivity sweep (the main job)",
                                description="Run the grid's prune-and-evaluate trials; results, plots and report "
                                "land in <output>/<name>/, one W&B run per trial.")
    sweep.add_argument("--output", help="results folder (default: the grid's output key)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep in the same folder")
    sweep.add_argument("--wandb-mode", choices=["online", "offline", "disabled", "auto"], help="override wandb.mode")
    sweep.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and print the grid; compute nothing")
    sweep.set_defaults(run=_sweep)
    train = commands.add_parser("train", parents=[_common()], help="train the checkpoint a grid names",
                                description="Train the grid's checkpoint with its checkpoint.train recipe.")
    train.set_defaults(run=_train)
    prune = commands.add_parser("prune", parents=[_common()], help="plan, prune, fine-tune and verify (docs/numbers.md)",
                                description="From the sweep's results in the same output folder (measuring missing "
                                "points first): for each plan.budgets x plan.methods a plan, the channels removed "
                                "for real, fine-tuned as Ray Tune trials, exported (pruned.pt, pruned.onnx) and "
                                "verified; plans.csv and a report section in <output>/<name>/.")
    prune.add_argument("--output", help="results folder (default: the grid's output key)")
    prune.add_argument("--resume", action="store_true", help="continue an interrupted prune job in the same folder "
                       "(plans made, epochs fine-tuned and plans verified are kept; added budgets or methods are "
                       "planned)")
    prune.add_argument("--wandb-mode", choices=["online", "offline", "disabled", "auto"], help="override wandb.mode")
    prune.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    prune.add_argument("--dry-run", action="store_true", help="validate and print the grid and its plans; compute "
                       "nothing")
    prune.set_defaults(run=_prune)
    validate = commands.add_parser("validate", parents=[_common()], help="does the sweep predict? random plans "
                                   "vs the methods' plans, each fine-tuned (docs/validation.md)",
                                   description="For each plan.budgets: validate.random_plans random plans that meet "
                                   "it and the plan.methods' plans; each plan's predicted drop (plain and "
                                   "recalibrated curves), one-shot accuracy (masked, after adaptive BN) and accuracy "
                                   "after fine-tuning (Ray Tune trials); validation.csv, plots/validation.png and "
                                   "the predictors' rank correlations in <output>/<name>/report.md.")
    validate.add_argument("--output", help="results folder (default: the grid's output key)")
    validate.add_argument("--wandb-mode", choices=["online", "offline", "disabled", "auto"],
                          help="override wandb.mode")
    validate.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    validate.add_argument("--dry-run", action="store_true", help="validate and print what it would run; compute "
                          "nothing")
    validate.set_defaults(run=_validate)
    scorer = commands.add_parser("score", parents=[_common()], help="score a pruned.pt or pruned.onnx on its own",
                                 description="Read a pruned model with prune-sweep's loader alone (pruned.pt: the "
                                 "base architecture rebuilt, the plan's channels removed, the weights loaded) or run "
                                 "it with onnxruntime alone (pruned.onnx), and print its accuracy on the images the "
                                 "grid's plan scores plans on.")
    scorer.add_argument("--model", required=True, help="plans/<budget>-<method>/pruned.pt or pruned.onnx")
    scorer.set_defaults(run=_score)
    top.commands = {"sweep": sweep, "train": train, "prune": prune, "validate": validate, "score": scorer}
    return top


def _sweep(args: argparse.Namespace) -> int:
    from runner.job.options import Options
    from runner.job.sweep import dry_run, run_sweep

    opts = Options(args.grid, args.output, args.resume, args.wandb_mode, args.address, args.dry_run, tuple(args.set))
    if args.dry_run:
        print("\n".join(dry_run(opts)))
        return EXIT_OK
    outcome = run_sweep(opts)
    print(f"{outcome.points}/{outcome.expected} points ({outcome.measured} measured in this run) in "
          f"{outcome.seconds:.0f} s; report: {outcome.folder / 'report.md'}")
    if outcome.interrupted:
        print("interrupted: continue with the same command and --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.failed:
        print(f"{plural(len(outcome.failed), 'trial')} failed: {', '.join(outcome.failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _prune(args: argparse.Namespace) -> int:
    from runner.job.options import Options
    from runner.job.prune import dry_run, run_prune

    opts = Options(args.grid, args.output, args.resume, args.wandb_mode, args.address, args.dry_run, tuple(args.set))
    if args.dry_run:
        print("\n".join(dry_run(opts)))
        return EXIT_OK
    outcome = run_prune(opts)
    print(f"{plural(len(outcome.rows), 'plan')} in {outcome.seconds:.0f} s; table: {outcome.folder / 'plans.csv'}, "
          f"report: {outcome.folder / 'report.md'}")
    if outcome.failed:
        print(f"{plural(len(outcome.failed), 'plan')} failed: {', '.join(outcome.failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from runner.job.sweep import Options
    from runner.job.validate import dry_run, run_validate

    opts = Options(args.grid, args.output, False, args.wandb_mode, args.address, args.dry_run, tuple(args.set))
    if args.dry_run:
        print("\n".join(dry_run(opts)))
        return EXIT_OK
    outcome = run_validate(opts)
    print(f"{len(outcome.rows)} plans in {outcome.seconds:.0f} s; table: {outcome.folder / 'validation.csv'}, "
          f"report: {outcome.folder / 'report.md'}")
    if outcome.failed:
        print(f"{len(outcome.failed)} plans failed: {', '.join(outcome.failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _score(args: argparse.Namespace) -> int:
    from runner.job.options import Options
    from runner.job.prune import score_file

    print(score_file(Options(args.grid, overrides=tuple(args.set)), args.model))
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from runner.job.options import Options
    from runner.job.train import run_train

    print(run_train(Options(args.grid, overrides=tuple(args.set))))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: `prune-sweep COMMAND ...`; returns the exit code."""
    top = parser()
    try:
        args, extra = top.parse_known_args(argv)
        if extra:  # reported by the command's own parser, so the line names its --help
            top.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a bad flag (2, already reported in one line)
        return int(e.code or 0)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    return run_main(lambda: args.run(args), level)


def console() -> None:
    leave(main())


def leave(code: int) -> NoReturn:
    """End a command's process with `code` (the console script and scripts/*.py). With no other thread left:
    the exit handlers run (Ray's shutdown, W&B's teardown, temporary folders), the streams are flushed, and the
    process ends at once, skipping Python's slow teardown of torch's and Ray's modules (docs/benchmarks.md).
    With another thread still running, the usual exit, which waits for it."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":  # python -m runner.cli
    console()
