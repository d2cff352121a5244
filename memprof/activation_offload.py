"""Activation offload: a unit's saved tensors kept in (pinned) host memory from its forward to its backward.

A unit run under :func:`offloaded` saves its tensors for backward through
``torch.autograd.graph.saved_tensors_hooks``: a saved tensor on an accelerator (device type other than
``"cpu"``) that is not a parameter or buffer of the model is copied to host memory (pinned where CUDA is
available, ``non_blocking`` on the current stream) when autograd saves it, and copied back to its device when
backward unpacks it. The device keeps what the unit's output and other references keep alive; its saved
activations live on the host in between, and come back one backward node at a time.

Known limits, said in every plan that uses it (:mod:`memprof.policy.chain`):

* the copies run on the current stream, not on a side stream: nothing overlaps them with compute, and the
  planner prices them so (bytes moved both ways over :data:`memprof.policy.costs.HOST_LINK_GBS`, modelled);
* parameters and buffers are never copied (they stay on the device anyway), nor are CPU tensors: on a CPU the
  lever changes nothing, and the planner does not offer it there;
* nor are the unit's inputs (for a chain of blocks, the previous block's output): they stay on the device, as
  a checkpointed unit keeps them, so that what a unit leaves on the device does not depend on its neighbours'
  choices (the chain model's assumption);
* a tensor saved by two ops is copied twice; a unit is offloaded or recomputed, never both.

The copies go through one seam, :data:`COPIES` (see :func:`copies_used`): the estimator replaces it while it
emulates CUDA on CPU kernels (:mod:`memprof.estimation.activation_offload`), where a host copy would be a no-op.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

__all__ = ["HostCopies", "COPIES", "copies_used", "offloaded", "model_storages"]


class HostCopies:
    """How saved tensors travel: which move, and the two copies. The default is a real run's."""

    def moves(self, t: torch.Tensor) -> bool:
        """Whether a saved tensor (not a parameter or buffer) goes to the host: one on an accelerator."""
        return t.device.type != "cpu"

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        pin = torch.cuda.is_available() and t.device.type == "cuda" and t.layout == torch.strided
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.to(device, non_blocking=host.is_pinned())


COPIES: list[HostCopies] = [HostCopies()]  # the copies in use: COPIES[-1] (the estimator pushes its own)


@contextlib.contextmanager
def copies_used(copies: HostCopies):
    """Use ``copies`` for every offloaded unit while inside (the estimator's emulation)."""
    COPIES.append(copies)
    try:
        yield copies
    finally:
        COPIES.remove(copies)


def model_storages(model: nn.Module) -> set[int]:
    """ids of the storages of the model's parameters and buffers (saved as they are, never copied)."""
    out = set()
    for t in list(model.parameters()) + list(model.buffers()):
        out.add(id(t.untyped_storage()))
    return out


def _input_storages(args, kwargs) -> set[int]:
    from torch.utils._pytree import tree_leaves

    return {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}


def offloaded(original, root: nn.Module):
    """``original`` (a unit's forward) with its saved tensors offloaded to the host; ``root``: the model, whose
    parameters and buffers are not copied (read at each call: a cast in place gives them new storages)."""

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        copies = COPIES[-1]
        kept = model_storages(root) | _input_storages(args, kwargs)

        def pack(t):
            if id(t.untyped_storage()) in kept or not copies.moves(t):
                return t.detach()  # as saved (a detached alias: returning ``t`` itself can make a cycle)
            return (t.device, copies.to_host(t.detach()))

        def unpack(packed):
            if isinstance(packed, tuple):
                device, host = packed
                return copies.to_device(host, device)
            return packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return original(*args, **kwargs)

    return forward
