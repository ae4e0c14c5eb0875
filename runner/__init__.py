"""prune-sweep's runner: everything above the networks, in layers whose imports go one way only.

    runner.cli                 the command (argument parsing, logging, exit codes)
    runner.job                 the Ray Tune job: Ray's start, trials, the driver's collector, the sweep's story
    runner.inputs              the grid resolved: data, checkpoints, training, the trials to run
    runner.engine              tensors in, numbers out: criteria, masks, the cached layer sweep, evaluation
    runner.outputs             results.csv, report, figures, W&B tracking (no torch)
    runner.config, .errors, .storage, .provenance   basics every layer may use

A layer imports only the layers listed below it (and `model`, which imports nothing from here);
tests/test_imports.py checks it.
"""
