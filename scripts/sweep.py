"""Run a pruning-sensitivity sweep: python scripts/sweep.py --grid sweeps/demo.yaml"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from runner.cli import Parser, run_main  # noqa: E402
from runner.errors import EXIT_FAILED, EXIT_INTERRUPTED  # noqa: E402
from runner.sweep import Options, dry_run, run_sweep  # noqa: E402


def main() -> int:
    parser = Parser(description=__doc__)
    parser.add_argument("--grid", required=True, help="grid file (YAML), see sweeps/ and the README")
    parser.add_argument("--output", help="results folder (default: the grid's output key)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--wandb-mode", choices=["online", "offline", "disabled", "auto"], help="override wandb.mode")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local Ray")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the grid; compute nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key of the grid file, e.g. --set sweep.criteria=[l1_norm]")
    args = parser.parse_args()
    opts = Options(args.grid, args.output, args.resume, args.wandb_mode, args.address, args.dry_run, tuple(args.set))
    if args.dry_run:
        print("\n".join(dry_run(opts)))
        return 0
    outcome = run_sweep(opts)
    print(f"{outcome.points}/{outcome.expected} points ({outcome.measured} measured in this run) in "
          f"{outcome.seconds:.0f} s; report: {outcome.folder / 'report.md'}")
    if outcome.interrupted:
        print("interrupted: continue with the same command and --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.failed:
        print(f"{len(outcome.failed)} trials failed: {', '.join(outcome.failed)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
