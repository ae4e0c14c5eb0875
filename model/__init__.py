"""The networks, their layer listing, scoped feature-map capture, the cut used by pruning, and checkpoint
reading. Imports nothing from `runner`."""
