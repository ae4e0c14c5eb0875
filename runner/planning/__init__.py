"""From sensitivity curves to a smaller model (docs/numbers.md): a plan under a MACs or params budget, the combined
plan corrected, the channels removed for real (Torch-Pruning), counted, saved, exported and timed.

    curves      a unit's measured curve made monotone, and the K a plan may choose (round_to, min_keep)
    units       the units a plan may prune (and why others are left out), their curves from results.csv
    solve       knapsack / threshold / uniform, and the re-plan that meets the budget counted on the real model
    correction  the combined plan measured with all masks at once, and corrected while it misses the prediction
    removal     Torch-Pruning groups, physical removal, the same plan as masks, MACs and params counted
    export      pruned.pt (state_dict + plan) and its loader, ONNX with the normalisation inside
    latency     base vs pruned, batch 1 and 64, medians
    record      plan.json's content (written by runner.outputs.plans, with plans.csv)

`curves`, `solve` and `correction` are plain Python (no torch), so planning is testable on made-up numbers.

May import: `model`, `runner.engine`, `runner.inputs`, `runner.outputs`, `runner.planning` and the basics
(`runner.basics`, `runner.config`, `runner.errors`, `runner.storage`, `runner.provenance`); torch, torch_pruning,
onnx, onnxruntime. Never Ray or W&B (the job runs fine-tuning trials and logs them).
"""
