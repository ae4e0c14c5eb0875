"""Train the checkpoint a grid file names: python scripts/train.py --grid sweeps/demo.yaml (= prune-sweep train)."""
import sys

from runner.cli import leave, main

if __name__ == "__main__":
    leave(main(["train", *sys.argv[1:]]))
