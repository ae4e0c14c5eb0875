"""Run a pruning-sensitivity sweep: python scripts/sweep.py --grid sweeps/demo.yaml (= prune-sweep sweep ...)."""
import sys

from runner.cli import leave, main

if __name__ == "__main__":
    leave(main(["sweep", *sys.argv[1:]]))
