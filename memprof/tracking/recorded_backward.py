"""Backward on the host run with the ledger's mode popped and the C++ allocation recorder on
(:class:`RecordedBackward`).

While tracking, :mod:`.patches` wraps ``torch.autograd._engine_run_backward`` (behind ``backward()`` and
``torch.autograd.grad``) with :meth:`RecordedBackward.run`: backward's ops run with no Python per op, every
byte the allocator hands out (op scratch included) is logged at module boundaries and frees
(:meth:`.ledger.Ledger.start_recording`), and after the engine returns the records still live are claimed by
the tensors holding them: parameters' gradients, optimizer state made there, what ``torch.autograd.grad``
returned.

It is used only on the host's allocator, where the ledger measures op scratch anyway and rehearses no device
limit. Backward is dispatched per op instead on CUDA, with sharded parameters (FSDP, DTensor), under
torch.profiler or another dispatch mode, with a device-memory limit, in the estimator, inside a backward
already recorded (reentrant checkpointing), and after a backward whose memory outlived it in tensors the
tracker cannot reach (noted in the profile; such bytes count until tracking stops, their frees unseen).
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import (
    _get_current_dispatch_mode,
    _get_current_dispatch_mode_stack,
    _pop_mode,
    _push_mode,
)

from ..categories import TEMPORARY
from ..errors import MemprofError
from ..units import format_bytes
from . import forward_grads, interrupts, native
from .ledger import real_tensors

__all__ = ["RecordedBackward"]


@interrupts.pass_through
def _user_backward(engine, args, kwargs):
    """Autograd's engine, run by the tracker: the user's backward (hooks, autograd Functions, recomputed
    forwards) runs under this frame, and a signal there is raised at once (:mod:`.interrupts`)."""
    return engine(*args, **kwargs)


def gradient_shapes(roots) -> dict:
    """``{nbytes: (shape, dtype)}`` of the gradients a backward from ``roots`` (tensors or gradient edges) will
    make: each autograd node's input metadata is the shape and dtype of a gradient it receives. The recorder
    sees allocations by size only; one whose size is a gradient's is given that gradient's shape (the first
    met from the roots when several shapes have that size). Nodes a checkpointed region builds during the
    backward are not walked yet: their temporaries keep no shape unless their size is one of these."""
    out: dict = {}
    stack = []
    for r in roots if isinstance(roots, (tuple, list)) else (roots,):
        node = r.grad_fn if isinstance(r, torch.Tensor) else getattr(r, "node", None)
        if node is not None:
            stack.append(node)
    seen = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        try:
            metadata = node._input_metadata
        except (AttributeError, RuntimeError):  # private API: without it, shapes stay unrecorded
            return out
        for m in metadata:
            if m.is_nested_tensor or m.dtype is None:
                continue
            shape = tuple(m.shape)
            nbytes = math.prod(shape) * m.dtype.itemsize
            out.setdefault(nbytes, (shape, m.dtype))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return out


class RecordedBackward:
    """The backward runs of one tracker. ``enabled``: whether backward may run on the recorder (it turns off
    for good once a sharded parameter or memory that outlived a recorded backward is seen)."""

    def __init__(self, ledger, notes: set, enabled: bool) -> None:
        self.ledger = ledger
        self.notes = notes
        self.enabled = enabled
        self.running = False  # set by the tracker
        # connected by the tracker (see connect)
        self.tree = self.enter_backward = self.end_backward = self.optimizers = self.known = None

    def connect(self, tree, phases, steps) -> None:
        """``tree``: gradient and state labels; ``phases``: the backward phase; ``steps``: the optimizers."""
        self.tree = tree
        self.enter_backward = phases.enter_backward
        self.end_backward = phases.end_backward
        self.optimizers = steps.optimizers
        self.known = steps.known

    def disconnect(self) -> None:
        """Drop the references that tie a finished tracker's parts into cycles."""
        self.tree = self.enter_backward = self.end_backward = self.optimizers = self.known = None

    def run(self, engine, args, kwargs):
        """Autograd's engine entry (``torch.autograd._engine_run_backward``, behind ``backward()`` and
        ``torch.autograd.grad``) while tracking: run it with the ledger's mode popped and the allocation
        recorder on, so backward's ops run with no Python per op; the ledger logs the recorder's events at
        module boundaries and frees (:meth:`.Ledger.start_recording`).

        On this project's CPU machine that takes memprof's cost on a GPT-2-small step from 1.046x to about
        1.024x (results/floors.json). Falls back to the per-op path when the ledger is not the only mode
        (another mode was pushed in the block), a backward runs inside one already recorded (reentrant
        checkpointing), or the recorder cannot start (torch.profiler runs on this thread).
        """
        led = self.ledger
        if led.recorder is not None or not self.running or forward_grads.active():
            # nested in a recorded backward, paused, or gradients inside a forward (tracked op by op)
            return _user_backward(engine, args, kwargs)
        rec = None
        if self.enabled and _get_current_dispatch_mode() is led \
                and len(_get_current_dispatch_mode_stack()) == 1:
            try:
                rec = native.AllocationRecorder().start()
            except MemprofError:
                pass
        if rec is None:  # per op
            result = _user_backward(engine, args, kwargs)
            if self.running:
                self.tree.label_grads(self.tree.unhooked)
            return result
        result = None
        phase_id = led.phase_id
        led.grad_shapes = gradient_shapes(args[0] if args else kwargs.get("t_outputs", ()))
        led.start_recording(rec)
        try:
            mode = _pop_mode()
            try:
                with native.quiet_allocator_log():
                    result = _user_backward(engine, args, kwargs)
            finally:
                _push_mode(mode)
                if not self.running and _get_current_dispatch_mode() is mode:
                    # Tracking stopped or paused inside backward (an optimizer step run from a gradient
                    # hook), when the mode was not on the stack to be removed: remove it now.
                    mode.__exit__(None, None, None)
        finally:
            try:
                if self.running and led.recorder is not None:
                    closing = led.phase_id == phase_id and led.undrained()
                    if closing:  # nothing in this backward drained: no module, no followed storage freed
                        self.enter_backward(queue=False)
                    led.drain(switch=False)
                    self._claim_survivors(result)
                    if closing:
                        self.end_backward()
            finally:
                before = led.unfollowed
                led.stop_recording()
                rec.stop()
                if led.unfollowed > before:
                    self.enabled = False
                    self.notes.add(
                        f"{format_bytes(led.unfollowed - before)} allocated in a backward outlived it in tensors "
                        "memprof does not follow (not a parameter's gradient nor a torch.autograd.grad result): "
                        "counted until tracking stopped (their frees unseen); later backwards were tracked per op")
        return result

    def _claim_survivors(self, result) -> None:
        """Give the recorder's records still live after backward to the tensors holding them: parameters'
        gradients (every parameter's: none has an accumulate hook in a recorded backward), the optimizers'
        state (made there when a gradient hook steps the optimizer) and what ``torch.autograd.grad``
        returned."""
        led = self.ledger
        tree = self.tree
        tree.label_grads(tree.owner)
        if led.anon:  # optimizer state made in backward (an optimizer stepped from a gradient hook)
            for opt in {id(o): o for o in (*self.optimizers, *self.known)}.values():
                tree.label_state(opt)
        if led.anon and isinstance(result, tuple):
            for t in result:
                if isinstance(t, torch.Tensor):
                    for rt in real_tensors(t):
                        s = rt.untyped_storage()
                        if id(s) not in led.live:
                            led.claim(s, rt.shape, rt.dtype, TEMPORARY)
