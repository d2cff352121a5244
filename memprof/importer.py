"""Importing what the user names on the command line as ``PKG.MODULE:NAME`` (a model factory, a batch function).

Only names the user typed are imported: nothing read from a profile or plan file ever reaches this module
(a profile's ``factory:...`` source is text to show, see :mod:`memprof.estimation.sources`). The current
folder is importable, as under ``python -m``. Every failure is a :class:`~memprof.errors.MemprofError` that
names the option. Torch-free.
"""

from __future__ import annotations

import importlib
import sys

from .errors import MemprofError

__all__ = ["import_attr", "import_module"]


def import_module(module_name: str, what: str):
    """The module ``module_name`` (for option ``what``), with the current folder on the path."""
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like python -m: the current folder is importable
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise MemprofError(f"cannot import {module_name!r} for {what}: {e}") from None


def import_attr(spec: str, what: str):
    """``NAME`` of ``PKG.MODULE`` for a spec ``PKG.MODULE:NAME`` given as option ``what`` (e.g. ``--model``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MemprofError(f"{what} must look like PKG.MODULE:NAME, got {spec!r}")
    module = import_module(module_name, what)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise MemprofError(f"{module_name!r} has no {attr!r} (for {what})") from None
