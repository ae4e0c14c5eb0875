"""The grid made concrete: datasets, the checkpoint (loaded, checked, trained), and the trials to run.

May import: `model`, `runner.engine`, `runner.inputs` and the basics (`runner.basics`, `runner.config`,
`runner.errors`, `runner.storage`, `runner.provenance`). Never Ray, W&B or `runner.outputs`.
"""
