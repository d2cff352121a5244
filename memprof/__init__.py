"""memprof: where a PyTorch training step's memory goes, what to do about it, and proof that it worked.

The names below are bound on first use (PEP 562), so importing memprof, or any of its torch-free modules
(profiles, plans, report, units), does not import torch; ``memprof.track`` or ``memprof.estimate`` does.
Submodules are reachable as attributes too (``memprof.plots.timeline``).
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import MemprofError

# name -> the module that defines it
_API = {
    "Profile": "profiles", "ModuleStats": "profiles", "load": "loading", "table": "report",
    "Plan": "plans", "Tracker": "tracking", "track": "tracking", "profile": "tracking.decorator",
    "estimate": "estimation", "plan": "policy.engine", "apply": "policy.apply", "auto": "policy.auto",
    "verify": "policy.verify",
}

__all__ = ["__version__", "MemprofError", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
