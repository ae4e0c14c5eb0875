"""Train the checkpoint that a grid file names: python scripts/train.py --grid sweeps/demo.yaml"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from runner.cli import Parser, run_main  # noqa: E402
from runner.config import load_grid  # noqa: E402
from runner.train import train_checkpoint  # noqa: E402


def main() -> None:
    parser = Parser(description=__doc__)
    parser.add_argument("--grid", required=True, help="grid file (YAML); its checkpoint section says what to train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    args = parser.parse_args()
    train_checkpoint(load_grid(args.grid, args.set))


if __name__ == "__main__":
    sys.exit(run_main(main))
