"""The network, its layer listing, scoped feature-map capture, the cut used by pruning, and checkpoint I/O."""
