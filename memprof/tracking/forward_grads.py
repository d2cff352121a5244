"""Gradients computed inside a forward (a chunked loss computing each chunk's gradients with its loss): not a
backward phase.

A training step's backward starts at the first op of a graph task (``loss.backward()``). Code that calls
``torch.autograd.grad`` inside the model's forward — :mod:`memprof.policy.loss_head` does, chunk by chunk, as
Liger's fused cross-entropy does — runs graph tasks too; tracked as backwards they would split the forward
into backward and ``other`` phases, and the planner would take memory that lives beside every activation
for a floor no checkpointing lowers. Inside :func:`grads_in_forward` a graph task is part of the phase it
runs in: the ledger neither enters the backward phase nor records it apart. Process-wide (the autograd
engine runs CUDA backwards on its own threads).
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["grads_in_forward", "active"]

_depth = [0]


@contextmanager
def grads_in_forward():
    """Graph tasks started in this block belong to the forward (see the module's docstring)."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def active() -> bool:
    return _depth[0] > 0
