"""The phase and step state machine of a tracker (:class:`Phases`), and the finished steps kept for replay
(:class:`StepBacklog`).

Phases: ``forward`` starts at the first module forward outside a forward phase; ``backward`` at the first
backward op or module backward hook (the ledger or :mod:`.boundaries` call :meth:`Phases.enter_backward`)
and ends when autograd's graph task ends (a callback queued on the engine); ``optimizer`` is a tracked
optimizer step (:mod:`.optimizer_steps`); ``other`` is anything else. Every change is a ledger mark ("P")
and a new phase id. A step ends at its (last) optimizer step and the next one starts at the next forward,
or at a backward with no forward since; the tracker stops by itself at its step limit.

A finished step's log (the ledger's prelude, events and marks, with its per-op figures) is kept, not
replayed, until the profile is built or the kept logs grow past :data:`BACKLOG_EVENTS` events: a step's end
then costs no replay and, on a GPU, no wait for the device.

Limits: a forward that runs inside backward is a recomputation (activation checkpointing), not a phase; an
autograd graph built outside any tracked module is counted as the forward of the backward that follows it;
with several optimizers the step limit stops tracking at the last of them in the order the first step
stepped them (with one step so far and several optimizers, at the next forward).
"""

from __future__ import annotations

import torch

from ..categories import ACTIVATION, BACKWARD, FORWARD, OTHER, OTHER_PHASE
from .ledger import expand_pattern_runs
from .marks import BACKWARD_OUT, PHASE

__all__ = ["BACKLOG_EVENTS", "Phases", "StepBacklog"]

_graph_task_id = torch._C._current_graph_task_id
BACKLOG_EVENTS = 200_000  # finished steps kept unreplayed up to this many ledger events (~100-200 bytes each)


class Phases:
    """Phases and steps of one tracker. ``steps_limit``: stop after this many optimizer steps (None: never);
    ``t0``: the tracker's start time (the first step's start)."""

    def __init__(self, ledger, timer, backlog: StepBacklog, *, steps_limit: int | None, t0) -> None:
        self.ledger = ledger
        self.timer = timer
        self.backlog = backlog
        self.steps_limit = steps_limit
        self.running = False  # set by the tracker: the engine callback does nothing once paused or stopped
        self.step_index = 0
        self.step_t0 = t0
        self.after_opt = False  # an optimizer step ended: the next forward (or backward) starts a new step
        self.opt_in_step: list = []  # optimizers stepped in this step, in order
        self.opt_order: list | None = None  # those of the first step: the last of them ends a step
        self.stop_at_next = False
        # connected by the tracker (see connect)
        self.nodes = self.bstack = self.grad_hooks = self.current = self.stop = None

    def connect(self, bounds, nodes: dict, stop) -> None:
        """``bounds``: the module boundaries (their stacks); ``nodes``: module -> node; ``stop``: the
        tracker's stop()."""
        self.bstack = bounds.bstack
        self.grad_hooks = bounds.grad_hooks
        self.current = bounds.current
        self.nodes = nodes
        self.stop = stop

    def disconnect(self) -> None:
        """Drop the references that tie a finished tracker's parts into cycles."""
        self.nodes = self.bstack = self.grad_hooks = self.current = self.stop = None

    def set_phase(self, phase, payload=None) -> None:
        led = self.ledger
        led.phase_id += 1
        led.phase = phase
        led.mark(PHASE, payload)

    def begin_forward(self) -> None:
        if self.after_opt:
            if self.step_limit_reached():
                self.stop()
                return
            self.end_step()
        self.grad_hooks.clear()
        self.set_phase(FORWARD)

    def enter_backward(self, queue: bool = True) -> None:
        led = self.ledger
        led.entering_backward = True
        try:
            self._enter_backward_phase(queue)
        finally:
            led.entering_backward = False

    def _enter_backward_phase(self, queue: bool) -> None:
        led = self.ledger
        if self.after_opt:  # backward with no forward since the optimizer step (stops wait for a forward)
            self.end_step()
        if led.phase == OTHER_PHASE:
            # Autograd graph built outside any tracked module: treat that stretch as the forward.
            pid = led.phase_id
            for rec in led.live.values():
                if rec.phase_id == pid and rec.cat == OTHER:
                    rec.cat, rec.phase = ACTIVATION, FORWARD
            led.phase = FORWARD
        fwd_id = led.phase_id if led.phase == FORWARD else None
        if fwd_id is not None:
            self._note_recompute_fractions(fwd_id)
        self.set_phase(BACKWARD, fwd_id)
        if queue:
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)

    def _note_recompute_fractions(self, forward_id) -> None:
        """Per module: the share of its forward op time before the last tensor backward keeps was made.

        Non-reentrant checkpointing recomputes a region only until every tensor its backward needs is back
        (early stop), so this share of the forward is what checkpointing the module costs.
        """
        last: dict = {}
        for rec in self.ledger.live.values():
            if rec.phase_id == forward_id and rec.cat == ACTIVATION:
                node = rec.node
                while node is not None:
                    # A module's own outputs are kept by whoever uses them, outside its checkpointed region.
                    if rec.t > last.get(node, -1.0) and id(rec) not in node.output_ids:
                        last[node] = rec.t
                    node = node.parent
        for node, t in last.items():
            span = node.clock_out - node.clock_in
            if span > 0:
                node.recompute_fraction = min(1.0, max(0.0, (t - node.clock_in) / span))

    def end_backward(self) -> None:
        if not self.running:
            return
        led = self.ledger
        while self.bstack:
            node = self.bstack.pop()
            led.cur = self.current()
            led.mark(BACKWARD_OUT, node)
        led.cur = self.current()
        led.closed_task = _graph_task_id()
        self.set_phase(OTHER_PHASE)

    def optimizer_step_ended(self, opt, n_optimizers: int) -> bool:
        """A tracked optimizer step of ``opt`` ended (``n_optimizers`` known so far): the phase is ``other``
        until the next forward. Returns whether tracking should stop now (the step limit is reached with
        this step's last optimizer step, as far as can be known)."""
        self.set_phase(OTHER_PHASE)
        self.after_opt = True
        self.opt_in_step.append(opt)
        if self.steps_limit is not None and self.step_index + 1 >= self.steps_limit:
            if self.opt_order is not None:
                done = opt is self.opt_order[-1] and self.opt_in_step.count(opt) >= self.opt_order.count(opt)
            else:
                done = n_optimizers == 1
            if done:
                return True
            self.stop_at_next = True
        return False

    def step_limit_reached(self) -> bool:
        return self.stop_at_next or (self.steps_limit is not None and self.step_index + 1 >= self.steps_limit)

    def end_step(self) -> None:
        led = self.ledger
        t = self.timer()
        self.timer.sync()
        if self.opt_order is None and self.opt_in_step:
            self.opt_order = list(self.opt_in_step)
        self.opt_in_step = []
        op_stats = {}
        for node in self.nodes.values():  # this step's per-op figures; the nodes start afresh for the next
            if node.op_ms or node.op_bytes:
                op_stats[node] = (node.op_ms, node.op_bytes)
                node.op_ms, node.op_bytes = {}, {}
        self.backlog.keep((self.step_index, led.prelude, led.events, led.marks, self.step_t0, t, op_stats),
                          len(led.events))
        led.prelude, led.events, led.marks = [], [], []
        self.step_index += 1
        self.step_t0 = t
        self.after_opt = False


class StepBacklog:
    """Finished steps' logs not replayed yet, and their replay into ``replay`` (a :class:`~.replay.Replay`).

    ``each``: replay every step as it ends (the estimator: its offload emulation moves records between
    devices between steps).
    """

    def __init__(self, replay, timer, ledger, notes: set, each: bool) -> None:
        self.replay = replay
        self.timer = timer
        self.ledger = ledger
        self.notes = notes
        self.each = each
        self.steps: list = []
        self.events = 0

    def keep(self, step: tuple, n_events: int) -> None:
        self.steps.append(step)
        self.events += n_events
        if self.each or self.events > BACKLOG_EVENTS:
            self.flush()

    def flush(self) -> None:
        """Replay the finished steps kept so far. Steps are kept rather than replayed as each ends, so that a
        step's end costs no replay and, on a GPU, no wait for the device (its module times are CUDA events);
        the estimator replays each step at once (its offload emulation moves records between devices)."""
        if not self.steps:
            return
        self.timer.sync()
        self.host_apart()
        backlog, self.steps, self.events = self.steps, [], 0
        for index, prelude, events, marks, *rest in backlog:
            self.replay.replay_step(index, prelude, *expand_pattern_runs(events, marks), *rest)

    def finish(self, last, index: int, t_start, t_end) -> None:
        """Replay what is kept, then the last step's log ``last`` (``(prelude, events, marks)`` or None), and
        close the modules still open at ``t_end``."""
        self.flush()
        if last is not None:
            prelude, events, marks = last
            self.replay.replay_step(index, prelude, *expand_pattern_runs(events, marks), t_start, t_end)
        self.replay.close_all(t_end)

    def host_apart(self) -> None:
        """With an accelerator in use, its memory is what runs out: host storages (a CPU batch, step counters,
        offloaded state) are counted on their device in ``devices`` but not in the totals and peaks."""
        names = self.ledger.device_names
        if any(n.startswith("cuda") for n in names):
            self.replay.apart = frozenset(i for i, n in enumerate(names) if not n.startswith("cuda"))
            self.notes.add("totals and peaks are the CUDA device's; host memory is given per device only "
                           "(devices)")
