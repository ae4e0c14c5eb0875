"""Does the sweep predict? python scripts/validate.py --grid F (= prune-sweep validate ...)."""
import sys

from runner.cli import leave, main

if __name__ == "__main__":
    leave(main(["validate", *sys.argv[1:]]))
