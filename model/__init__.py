"""The networks, their layer listing, scoped feature-map capture, the cut used by pruning, and checkpoint
reading.

May import: `model`. Never `runner`, Ray or W&B.
"""
