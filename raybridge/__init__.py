"""raybridge: Ray clusters inside Slurm allocations."""

from raybridge.errors import RaybridgeError
from raybridge.profile import ClusterSpec, load_spec
from raybridge.render import render

__version__ = "0.1.0"
__all__ = ["ClusterSpec", "RaybridgeError", "load_spec", "render", "__version__"]
