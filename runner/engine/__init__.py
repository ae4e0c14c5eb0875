"""The engine: config-free tensors in, numbers out (criteria, masks, the cached layer sweep, the one evaluation).

May import: `model`, `runner.engine`, `runner.errors`. Never Ray, W&B, the grid (`runner.config`), or the
layers above it.
"""
