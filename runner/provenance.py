"""What every result carries: library versions (and, with the config and checkpoint sha256, its provenance).

May import: nothing of the project.
"""

from __future__ import annotations

import platform
from importlib import metadata


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers."""
    out = {"python": platform.python_version()}
    for dist in ("prune-sweep", "torch", "torchvision", "numpy", "ray", "wandb"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
