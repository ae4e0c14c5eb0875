"""Time the seed's loop, the usual tool's loop, this engine and the floor side by side (or, with --end-to-end,
the whole sweep against the engine alone): python scripts/bench.py [--json FILE]"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from runner import bench  # noqa: E402
from runner.cli import Parser, run_main  # noqa: E402
from runner.errors import EXIT_FAILED  # noqa: E402


def main() -> int:
    p = Parser(description=__doc__)
    p.add_argument("--grid", default="sweeps/demo.yaml", help="grid whose model, data and checkpoint to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one grid key")
    p.add_argument("--criterion", default="mean_activation")
    p.add_argument("--layers", nargs="+", default=None, help="layer names or patterns (default: all 17 main-path)")
    p.add_argument("--eval-size", type=int, default=1000, help="eval images")
    p.add_argument("--calibration-size", type=int, default=1000, help="calibration images")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--skip-seed", action="store_true", help="leave out (a), the slowest")
    p.add_argument("--end-to-end", action="store_true", help="time the whole sweep.py run against the engine alone")
    p.add_argument("--repeat", type=int, default=2, help="--end-to-end: alternated pairs of runs")
    p.add_argument("--engine-alone", action="store_true", help=argparse.SUPPRESS)  # the timed half of --end-to-end
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args()
    if args.engine_alone:
        print(f"{bench.engine_alone(args.grid, args.set)} points")
        return 0
    if args.end_to_end:
        with tempfile.TemporaryDirectory() as work:
            result = bench.end_to_end(args.grid, args.set, Path(work), args.repeat)
        print(f"sweep.py {' + '.join(map(str, result['sweep_seconds']))} s, engine alone "
              f"{' + '.join(map(str, result['engine_seconds']))} s, {result['points']} points in {result['trials']} "
              "trials")
        print(f"e2e {result['e2e']:.2f}")
    else:
        setup = bench.prepare(args.grid, args.set, args.criterion, args.eval_size, args.calibration_size,
                              args.layers or "all", args.device)
        result = bench.run_bench(setup, skip_seed=args.skip_seed)
        print("\n".join(bench.table(result)))
    if args.json:
        bench.write_json(args.json, result)
    return 0 if result.get("identical_accuracies", True) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(run_main(main))
