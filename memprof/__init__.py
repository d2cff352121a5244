"""memprof: where a PyTorch training step's memory goes, what to do about it, and proof that it worked."""

from ._version import __version__
from .errors import MemprofError
from .estimation import estimate
from .files import load
from .policy.apply import apply
from .policy.auto import auto
from .policy.engine import plan
from .policy.plan import Plan
from .policy.verify import verify
from .profiles import ModuleStats, Profile
from .tracking import Tracker, track
from .tracking.decorator import profile

__all__ = [
    "__version__", "MemprofError", "Profile", "ModuleStats", "Plan", "Tracker", "track", "profile", "estimate",
    "plan", "apply", "auto", "verify", "load",
]
