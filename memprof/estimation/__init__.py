"""Estimate before you allocate: a training step of fake tensors, for any model, precision, batch and world size.

:func:`estimate` (``memprof.estimate``) runs the step under fake tensors with the tracker attached and
returns a :class:`~memprof.profiles.Profile` marked ``estimated``; :mod:`.catalog` names architectures
(HF configs: data, not code); :mod:`.sources` gives the planner estimates of configurations it was not
given; :mod:`.live` estimates a model already in memory. Device capacities are :mod:`memprof.hardware`'s.
"""

from ..hardware import DEVICES, SPECS, device_capacity, resolve_capacity
from .catalog import CATALOG, Architecture, architecture_from_config_file, get_architecture
from .core import EstimateError
from .repeated import estimate

__all__ = [
    "estimate", "EstimateError", "CATALOG", "Architecture", "get_architecture", "architecture_from_config_file",
    "DEVICES", "SPECS", "device_capacity", "resolve_capacity",
]
