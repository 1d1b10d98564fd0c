"""raybridge: Ray clusters inside Slurm allocations."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ClusterSpec", "RaybridgeError", "load_spec", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `python -m raybridge.envcheck` must start on a node that lacks raybridge's dependencies,
    # to say which one is missing.
    if name in ("ClusterSpec", "load_spec"):
        from raybridge.client import profile

        return getattr(profile, name)
    if name == "RaybridgeError":
        from raybridge.errors import RaybridgeError

        return RaybridgeError
    raise AttributeError(f"module 'raybridge' has no attribute {name!r}")
