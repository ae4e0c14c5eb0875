"""The grid made concrete: datasets, the checkpoint (loaded, checked, trained), and the trials to run.

May import: `model`, `runner.engine`, `runner.outputs.results` (trial names), and the basics (`runner.config`,
`runner.errors`, `runner.storage`, `runner.provenance`). Never Ray or W&B.
"""
