"""The Ray Tune job: Ray's environment and start, the trials, the driver's collector, and the sweep's story.

May import everything in `runner` except `runner.cli`, and `model`. The only layer that imports Ray.
"""
