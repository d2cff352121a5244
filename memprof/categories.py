"""Memory categories and step phases, as ``str`` enums, plus the integer indices the hot path uses.

Categories
    param       parameters (de-duplicated by storage: tied weights count once)
    buffer      module buffers (BatchNorm running stats, ...)
    grad        ``.grad`` of parameters after accumulation
    optimizer   optimizer state (Adam moments, momentum buffers, step counters)
    activation  made in forward and kept alive after it (saved for backward, outputs held)
    temporary   made and freed inside one phase (or made in backward/optimizer and not kept as grad/state)
    input       the batch: tensors handed to a root module's forward
    other       anything else still alive (made outside forward/backward/optimizer, or found already live)

Phases
    forward, backward, optimizer (inside ``optimizer.step()``), other (data loading, zero_grad, logging, ...)
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Category", "Phase", "CATEGORIES", "PHASES"]


class Category(str, Enum):
    PARAM = "param"
    BUFFER = "buffer"
    GRAD = "grad"
    OPTIMIZER = "optimizer"
    ACTIVATION = "activation"
    TEMPORARY = "temporary"
    INPUT = "input"
    OTHER = "other"


class Phase(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    OTHER = "other"


CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)
PHASES: tuple[str, ...] = tuple(p.value for p in Phase)

# Integer indices into CATEGORIES / PHASES for the per-op path.
PARAM, BUFFER, GRAD, OPTIMIZER, ACTIVATION, TEMPORARY, INPUT, OTHER = range(len(CATEGORIES))
FORWARD, BACKWARD, OPT_PHASE, OTHER_PHASE = range(len(PHASES))
