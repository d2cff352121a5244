"""Estimate before you allocate: fake-tensor estimation for any model, precision, batch and world size.

(Named ``estimation`` because ``memprof.estimate`` is the function of the public API.)

(A package rather than DESIGN.md's single ``estimate.py``: the estimator, the catalog of architectures and
the device table are separate concerns that the CLI and the policy engine use separately.)
"""

from .catalog import CATALOG, Architecture, architecture_from_config_file, get_architecture
from .core import EstimateError
from .devices import DEVICES, SPECS, device_capacity, resolve_capacity
from .repeated import estimate

__all__ = [
    "estimate", "EstimateError", "CATALOG", "Architecture", "get_architecture", "architecture_from_config_file",
    "DEVICES", "SPECS", "device_capacity", "resolve_capacity",
]
