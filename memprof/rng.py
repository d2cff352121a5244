"""Leave the user's random numbers alone: save and restore every generator memprof's own work may draw from.

Estimating or planning inside a training process runs real kernels on made-up data (the estimator's scratch
measurement draws ``torch.randn``), real ops on shadows (dropout) and timed steps. Each would advance the
script's generators, so a seeded script would print other losses under memprof than without it.
:func:`preserved_rng` restores, on the way out (also after an exception):

* torch's default CPU generator (``torch.get_rng_state``),
* every CUDA device's generator, when CUDA has been initialised in this process (it is not initialised here),
* Python's ``random`` module,
* NumPy's global ``RandomState``, when NumPy has been imported.

Limits: generators the script made itself (``torch.Generator()``, ``numpy.random.default_rng()``) are not
touched by memprof and so need no restoring; other accelerators' generators (MPS, XPU) are not saved.
"""

from __future__ import annotations

import contextlib
import random
import sys

__all__ = ["preserved_rng", "rng_states"]


def rng_states() -> dict:
    """A snapshot of the generators :func:`preserved_rng` restores (comparable with ``==`` after ``repr``)."""
    import torch

    states: dict = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        states["numpy"] = np.random.get_state()
    return states


def _restore(states: dict) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])


@contextlib.contextmanager
def preserved_rng():
    """Run the block, then put torch's (CPU, CUDA), Python's and NumPy's global generators back as they were."""
    states = rng_states()
    try:
        yield
    finally:
        _restore(states)
