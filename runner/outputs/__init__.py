"""What a sweep leaves behind: results.csv, plots, report.md and W&B runs, made from plain rows and arrays.

May import: `runner.outputs` and the basics (`runner.basics`, `runner.errors`, `runner.storage`,
`runner.provenance`); numpy, matplotlib, pandas (results as a table) and wandb. Never torch, Ray, `model`, or the engine.
"""
