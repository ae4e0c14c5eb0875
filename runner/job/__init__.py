"""The Ray Tune jobs: Ray's environment and start, the trials, the driver's collector, the sweep's story, and
the prune job's (plans, physical removal, fine-tuning trials, verification).

May import everything in `runner` except `runner.cli`, and `model`. The only layer that imports Ray.
"""
