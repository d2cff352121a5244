"""Backward on the allocation recorder, and where marks go in the log: the part of the :class:`.ledger.Ledger`
that logs what the C++ allocation recorder (:class:`.native.AllocationRecorder`) reports instead of ops.

While autograd's engine runs, the tracker pops the ledger's dispatch mode (the per-op path would cost more
than everything else in a backward, results/floors.json) and the ledger reads the recorder instead: every
allocation and free the host allocator reports, op scratch included. Each allocation becomes a record of
the phase and module it happened in, with no op and no shape unless its size is a gradient's
(:func:`.recorded_backward.gradient_shapes`), logged when the recorder is drained: at phase
marks, when a storage is claimed and when backward ends. Module boundaries inside backward
(:meth:`LedgerRecording.defer_mark`) and frees of storages the ledger follows (their weakrefs) wait for
the drain, each placed at the recorder's count when it happened, so the log keeps the allocator's order.
Marks (:meth:`LedgerRecording.mark`, module and phase boundaries at event positions) are here because a
mark must first log what the recorder saw before it.

Known limits: an allocation is followed from its birth only once a tensor claims it (a gradient); one no
tensor claims stays counted, its free unseen (:attr:`~LedgerRecording.unfollowed`). Frees of memory the
recorder did not see born are the ledger's followed storages (their weakrefs log them) or older memory,
and are skipped.

:class:`LedgerRecording` is a mixin of :class:`.ledger.Ledger` and shares its state: it uses the ledger's
log (``events``, ``marks``, ``live``), its position (``phase``, ``phase_id``, ``cur``, ``op_clock``,
``timer``, ``on_backward``) and its bookkeeping (``_add``, ``_resized``, ``_device_named``, ``_on_free``);
the ledger's free callback uses the recorder state set up here (``_pending``, :meth:`drain`,
:meth:`~LedgerRecording._in_open_backward`).
"""

from __future__ import annotations

import torch

from ..categories import ACTIVATION, BACKWARD, FORWARD, OTHER, OTHER_PHASE, TEMPORARY
from . import forward_grads
from .cuda_blocks import cuda_block_bytes
from .native import device_name as _native_device_name
from .records import FreeRef, ModuleNode, StorageRecord

__all__ = ["LedgerRecording"]

_graph_task_id = torch._C._current_graph_task_id
_UNKNOWN = ((), None)  # a recorded allocation whose size is no gradient's: shape and dtype not recorded
BY_SIZE = "shape by size"  # the label of a recorded allocation given a gradient's shape by its size


class LedgerRecording:
    """The ledger's methods for a backward taken from the allocation recorder (see the module's docstring)."""

    def _init_recording(self) -> None:
        # The recorder, how many of its events were read, and the records of allocations it reported, by
        # pointer, until a tensor claims one.
        self.recorder = None
        self._read = 0
        self.anon: dict[int, StorageRecord] = {}
        self.unfollowed = 0  # bytes born on the recorder that outlived it unclaimed (counted, frees unseen)
        self.entering_backward = False  # set by the tracker while it enters the backward phase
        # What the next drain logs among the recorder's events, each at the recorder's count when it happened:
        # (count, record) for a free of a followed storage, (count, mark) for a deferred mark (defer_mark).
        self._pending: list = []
        self._seg = None  # (phase, phase id, module, op clock) of recorder events not logged yet
        self._switching = False  # a drain is entering the backward phase
        self.closed_task = None  # the graph task whose backward phase the tracker closed last
        self.grad_shapes: dict = {}  # nbytes -> (shape, dtype) of the recorded backward's gradients

    def mark(self, kind: str, node: ModuleNode | None = None) -> None:
        """A module or phase boundary at this point of the log; with the recorder on, what it saw before is
        logged first."""
        if self.recorder is not None:
            if not (self._switching or self.entering_backward):
                self.drain(switch=False)  # marks come from the tracker, which enters backward itself
            # Entering backward, what the recorder saw since the last drain is logged after this mark.
            self._seg = (self.phase, self.phase_id, self.cur, self.op_clock)
        self.marks.append((len(self.events), kind, node, self.timer(), self.phase, self.cur))

    def defer_mark(self, kind: str, node: ModuleNode | None = None) -> None:
        """A mark inside a recorded backward, placed among the recorder's events at the next drain (a
        module's backward boundaries: a drain at each cost more than all else in a recorded backward)."""
        if self.recorder is None or self._switching or self.entering_backward:
            self.mark(kind, node)
            return
        self._pending.append((self.recorder.n.value, (kind, node, self.timer(), self.phase, self.cur,
                                                       self.phase_id, self.op_clock)))

    def start_recording(self, recorder) -> None:
        """Take allocations from ``recorder`` (a started :class:`.native.AllocationRecorder`) instead of ops
        until :meth:`stop_recording` (see :mod:`.recorded`). A record the recorder made is claimed by the first
        tensor found on its memory (:meth:`found`): a parameter's gradient gets its category, name, shape and
        weakref there."""
        self.recorder = recorder
        self._read = recorder.count()
        self._seg = (self.phase, self.phase_id, self.cur, self.op_clock)

    def stop_recording(self) -> None:
        """Stop reading the recorder (the caller stops it). Records it saw born that no tensor claimed stay
        counted, their frees unseen: the tracker notes their bytes (:attr:`unfollowed`)."""
        if self.recorder is None:
            return
        try:
            self.drain(switch=False)
        finally:
            for _, rec in self._pending:  # only if draining failed
                if type(rec) is tuple:
                    self.marks.append((len(self.events), *rec[:5]))
                else:
                    self._add(rec, -rec.nbytes, self.events, freed=True)
            self._pending = []
            self.recorder = None
            self._read = 0
            for rec in self.anon.values():
                self.unfollowed += rec.nbytes
            self.anon.clear()
            self.grad_shapes = {}

    def drain(self, switch: bool = True) -> None:
        """Log the allocations and frees the recorder reported since the last drain. With ``switch``, a
        drain inside a running backward that finds the ledger not yet in its backward phase enters it
        first (unless the tracker is entering it now), as the per-op path does at the first backward op."""
        recorder = self.recorder
        first = self._read
        raw = recorder.raw(first) if recorder.n.value != first else []
        if raw:
            self._read += len(raw) // 3
        if switch and self.phase != BACKWARD and not self.entering_backward and self._in_open_backward():
            self._switching = True
            try:
                self.on_backward()  # events already read are logged below, after its phase mark
            finally:
                self._switching = False
        if not raw and not self._pending:
            return
        pending = self._pending
        if pending:  # frees of followed storages and deferred marks, each at the recorder's count then
            self._pending = []
            self._log_recorded(raw[:3 * max(0, pending[0][0] - first)])
            for i, (at, rec) in enumerate(pending):
                if type(rec) is tuple:
                    self.marks.append((len(self.events), *rec[:5]))
                    self._seg = (rec[3], rec[5], rec[4], rec[6])
                else:
                    self._add(rec, -rec.nbytes, self.events, freed=True)
                upto = pending[i + 1][0] if i + 1 < len(pending) else self._read
                self._log_recorded(raw[3 * max(0, at - first):3 * max(0, upto - first)])
        else:
            self._log_recorded(raw)

    def _log_recorded(self, raw: list) -> None:
        """Log recorder events (flat: pointer, bytes, device code, ...) in the phase and module they
        happened in (:attr:`_seg`). The hot path of a recorded backward (thousands of events a step): one
        device lookup per code."""
        if not raw:
            return
        anon, pop, add, events = self.anon, self.anon.pop, self._add, self.events
        phase, pid, node, clock = self._seg
        cat = ACTIVATION if phase == FORWARD else (OTHER if phase == OTHER_PHASE else TEMPORARY)
        shapes = self.grad_shapes if phase == BACKWARD else {}
        devices: dict = {}
        it = iter(raw)
        for ptr, nb, code in zip(it, it, it):
            if nb > 0:
                dev = devices.get(code)
                if dev is None:
                    dev = devices[code] = self._device_named(_native_device_name(code))
                shape, dtype = shapes.get(nb, _UNKNOWN)
                rec = StorageRecord(nb, cat, node, phase, pid, None, shape, dtype, dev, BY_SIZE if dtype else "")
                rec.t = clock
                anon[ptr] = rec
                add(rec, nb, events)
            elif nb < 0:
                rec = pop(ptr, None)
                if rec is None:  # a followed storage (its weakref logs it) or memory older than the recorder
                    continue
                add(rec, -rec.nbytes, events)

    def _in_open_backward(self) -> bool:
        """Inside a graph task whose backward phase the tracker has not closed yet (its end callback runs
        inside the task: what follows it must not open another)."""
        task = _graph_task_id()
        return task != -1 and task != self.closed_task and not forward_grads.active()

    def undrained(self) -> bool:
        """Whether the recorder has events, or followed storages frees, not logged yet."""
        return self.recorder is not None and (self.recorder.n.value > self._read or bool(self._pending))

    def skip_recorded(self) -> None:
        """Leave the recorder's events so far unlogged (a resize of a followed storage: :meth:`storage_resized`
        logs it)."""
        self._read = self.recorder.count()

    def claim(self, s, shape, dtype, cat, label="", node=None):
        """The record the recorder made for storage ``s``'s memory, now followed as ``s`` (None if none)."""
        if self.recorder is not None:
            self.drain()
        if not self.anon:
            return None
        rec = self.anon.pop(s.data_ptr(), None)
        if rec is None:
            return None
        nb = s.nbytes()
        if rec.device < 0 and nb:
            nb = cuda_block_bytes(nb)
        if nb != rec.nbytes:
            self._resized(rec, nb)
        rec.cat, rec.label, rec.shape, rec.dtype = cat, label, shape, dtype
        if node is not None:
            rec.node = node
        key = id(s)
        ref = rec.ref = FreeRef(s, self._on_free)
        ref.key = key
        self.live[key] = rec
        return rec
