"""The Ray Tune jobs: Ray's environment and start, the trials, the driver's collector, the sweep's story, and
the prune job's (plans, physical removal, fine-tuning trials, verification).

May import: `model`, `runner.engine`, `runner.inputs`, `runner.outputs`, `runner.planning`, `runner.job` and the
basics (`runner.basics`, `runner.config`, `runner.errors`, `runner.storage`, `runner.provenance`): everything
but the entry points. The only layer that imports Ray.
"""
