"""Plan, prune, fine-tune and verify from a sweep: python scripts/prune.py --grid F (= prune-sweep prune ...)."""
import sys

from runner.cli import leave, main

if __name__ == "__main__":
    leave(main(["prune", *sys.argv[1:]]))
