"""Optimizer steps while tracking (:class:`OptimizerSteps`): the ``optimizer`` phase, optimizer state labels,
and steady steps replayed from a recorded allocation pattern.

Global optimizer step pre/post hooks (installed by :mod:`.patches`) delimit the optimizer phase of the
tracked optimizers (all of them when none was given); a step inside a step (a subclass's ``step()`` calling
``super().step()``, an optimizer wrapping another) belongs to the outer one. After each step the optimizer's
state tensors are labelled ``optimizer`` (through :mod:`.hierarchy`) and the step's end is handed to
:meth:`.phases.Phases.optimizer_step_ended`, which may end tracking at the step limit.

Steady steps are replayed: where :mod:`.optpattern` holds a pattern for the optimizer's signature, the step
runs with the ledger's mode off and the ledger appends the recorded births and frees; otherwise the step's
events are recorded and kept as a pattern when they qualify (see :mod:`.optpattern` for what does and for
its limits). A replayed step that raised or changed the optimizer's state drops its pattern (noted).

Limits: a step called with a closure (it runs forward and backward) is never replayed; an optimizer step
that raises is known only at the next module forward (its post hook never runs) and then forgotten.
"""

from __future__ import annotations

from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..categories import OPT_PHASE
from . import optpattern

__all__ = ["OptimizerSteps"]


class OptimizerSteps:
    """The optimizer steps of one tracker.

    ``optimizers``: those given to the tracker (empty: every optimizer stepped in the block);
    ``replay``: replay steady steps; ``context``: the kind of tracker a pattern is shared with.
    """

    def __init__(self, ledger, notes: set, optimizers: list, *, replay: bool, context) -> None:
        self.ledger = ledger
        self.notes = notes
        self.optimizers = optimizers
        self.replay = replay
        self.context = context
        self.known: list = []  # every optimizer met (tracked ones)
        self.running = False  # set by the tracker: hooks do nothing while paused or stopped
        self.nested = 0  # optimizer steps running inside the open one
        self.skipping = None  # the optimizer whose step runs without the ledger (replayed pattern)
        self.replayed = 0
        self.recording = None  # (optimizer, signature, events index, phase id, prelude/marks lengths)
        self.in_post = False  # stopping from the post hook (the tracker's hooks are being iterated)
        # connected by the tracker (see connect)
        self.bounds = self.label_state = self.current = self.phases = self.stop = None
        own = ledger.own_time
        self.hook_pre, self.hook_post = own(self.pre), own(self.post)

    def connect(self, bounds, tree, phases, stop) -> None:
        """``bounds``: the module boundaries (which hold the open step, see Boundaries.open_step); ``tree``:
        the module tree (state labels); ``phases``: the phase machine; ``stop``: the tracker's stop()."""
        self.bounds = bounds
        self.current = bounds.current
        self.label_state = tree.label_state
        self.phases = phases
        self.stop = stop

    def disconnect(self) -> None:
        """Drop the references that tie a finished tracker's parts into cycles."""
        self.bounds = self.label_state = self.current = self.phases = self.stop = None
        self.hook_pre = self.hook_post = None

    def add(self, opt) -> None:
        if any(o is opt for o in self.known):
            return
        self.known.append(opt)
        self.label_state(opt)

    def _tracked(self, opt) -> bool:
        return not self.optimizers or any(o is opt for o in self.optimizers)

    def pre(self, opt, args, kwargs):
        bounds = self.bounds
        if bounds.open_step is not None:
            # A step inside a step: a subclass's step() calling super().step() (both are hooked once torch
            # has patched the base class), or an optimizer wrapping another. The outer one is the phase.
            self.nested += 1
            return
        if not self.running or not self._tracked(opt):
            return
        # args[0] is the optimizer itself; anything else is a closure (which runs forward and backward).
        closure = any(a is not None for a in args[1:]) or any(v is not None for v in kwargs.values())
        bounds.open_step = (opt, closure)
        self.add(opt)
        led = self.ledger
        led.cur = None
        self.phases.set_phase(OPT_PHASE)
        if not self.replay or closure:
            return
        sig = optpattern.signature(opt)
        pattern = optpattern.lookup(opt, self.context, sig)
        if pattern is not None and _get_current_dispatch_mode() is led:
            led.replay_pattern(pattern)
            led.__exit__(None, None, None)
            self.replayed += 1
            self.skipping = opt
            self.recording = (opt, sig)
        else:
            self.recording = (opt, sig, len(led.events), led.phase_id, len(led.prelude), len(led.marks))

    def post(self, opt, args, kwargs):
        if self.nested:
            self.nested -= 1
            return
        if not self.running or not self._tracked(opt):
            return
        self.bounds.open_step = None
        if self.skipping is opt:
            # A replayed step that ended as recorded made no storage that outlives it: the state is the
            # tensors labelled before (or the pattern is dropped and they are labelled again).
            if not self._resume_after_skip(opt, failed=False):
                self.label_state(opt)
        else:
            if self.recording is not None and self.recording[0] is opt:
                self._record_pattern(opt)
            self.label_state(opt)
        self.ledger.cur = self.current()
        if self.phases.optimizer_step_ended(opt, len(self.known)):
            self.in_post = True
            try:
                self.stop()
            finally:
                self.in_post = False

    def abandon(self) -> None:
        """An optimizer step raised (its post hook never ran) and the block went on: forget that step."""
        if self.skipping is not None:
            self._resume_after_skip(self.skipping, failed=True)
        self.bounds.open_step = None
        self.nested = 0
        self.recording = None

    def _resume_after_skip(self, opt, failed: bool) -> bool:
        """Put the ledger back after a replayed optimizer step; drop the pattern if it no longer holds.
        Returns whether the step ended as recorded."""
        self.skipping = None
        led = self.ledger
        led.__enter__()
        _, sig = self.recording
        self.recording = None
        if failed or optpattern.signature(opt) != sig:
            optpattern.forget(opt)
            self.notes.add("an optimizer step replayed from its recorded pattern did not end as recorded "
                           "(it raised or changed the optimizer's state): that step's temporaries may be off")
            return False
        return True

    def _record_pattern(self, opt) -> None:
        _, sig, start, pid, n_prelude, n_marks = self.recording
        self.recording = None
        led = self.ledger
        if len(led.prelude) != n_prelude or len(led.marks) != n_marks or led.phase_id != pid:
            return
        if optpattern.signature(opt) != sig:
            return  # the step made state (the first step): not steady yet
        pattern = optpattern.extract(led.events[start:], pid, led.device_names)
        if pattern is not None:
            optpattern.store(opt, self.context, sig, pattern)
