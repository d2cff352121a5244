"""The boundary marks the tracker puts in the ledger's log, and the spans the replay measures between them.

A mark is ``(kind, payload)`` at a position of the event log: a module's forward entered or left, its
forward recomputed inside backward (checkpointing), its backward entered or left, or a phase change (payload:
the phase's data). The replay (:mod:`.replay`) pairs them into spans per module: forward, backward, and the
gap from the end of a module's forward to the start of its backward (what it keeps for backward is live
there). Plain ``str`` constants: a mark is made at every module boundary, so they cost a constant load.
"""

from __future__ import annotations

__all__ = ["FORWARD_IN", "FORWARD_OUT", "RECOMPUTE_IN", "RECOMPUTE_OUT", "BACKWARD_IN", "BACKWARD_OUT",
           "PHASE", "FORWARD_SPAN", "BACKWARD_SPAN", "GAP_SPAN", "SPAN_OF"]

FORWARD_IN, FORWARD_OUT = "F+", "F-"
RECOMPUTE_IN, RECOMPUTE_OUT = "R+", "R-"  # a forward recomputed inside backward
BACKWARD_IN, BACKWARD_OUT = "B+", "B-"
PHASE = "P"

FORWARD_SPAN, BACKWARD_SPAN = "F", "B"
GAP_SPAN = "G"  # from a module's forward end to its backward start
SPAN_OF = {FORWARD_IN: FORWARD_SPAN, FORWARD_OUT: FORWARD_SPAN, BACKWARD_IN: BACKWARD_SPAN,
           BACKWARD_OUT: BACKWARD_SPAN}
