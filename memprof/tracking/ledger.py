"""The storage ledger: a ``TorchDispatchMode`` that sees every op's outputs and records each storage once.

This is the hottest code in memprof: it runs on every aten op of the tracked step. It only appends to an
event log and keeps a running total; everything else (peaks, samples, per-module statistics) is computed
from the log once per step by :mod:`memprof.tracking.replay`. The running totals (:attr:`Ledger.total`,
:attr:`Ledger.host`) change in one place, :meth:`Ledger._add`, which also logs the change. The records are
:mod:`.records`' classes; ops are classified by :mod:`.op_kinds`.

How bytes are counted
    * A storage is keyed by its Python ``UntypedStorage`` object (``id``), which PyTorch keeps unique per
      storage for the storage's whole life; ``data_ptr`` is not used (fake storages report 0, real pointers
      are reused). Views, tied weights and weights saved by autograd share a storage and count once.
    * A ``weakref`` callback on the storage records its free at the moment the allocator frees it.
    * In-place resizes (FSDP's ``UntypedStorage.resize_``, ``aten.resize_``) are followed: the tracker patches
      ``UntypedStorage.resize_`` while it runs and in-place ops' outputs are re-measured.
    * CUDA storages are counted as the caching allocator rounds them (:mod:`.cuda_blocks`).
    * Memory an op allocates and frees inside itself (oneDNN scratch, matmul packing buffers) is invisible
      to dispatch; :mod:`memprof.tracking.scratch` measures it from the allocator and the ledger records it as
      a momentary ``temporary`` spike at that op.
    * Backward on the host can be taken from the C++ allocation recorder instead of ops (the tracker pops
      this mode while autograd's engine runs): see :mod:`.recorded`.

Memory found already live is counted too: parameters, buffers, optimizer state and root-module inputs
(found by the tracker's hooks) from the start of the step; storages an op reads or aliases that the ledger
has not seen (a loss target, ``torch.tensor(...)`` constants, ``torch.from_numpy`` data) from that op on.
Known limit: live memory that no tracked op or module touches is not seen.
"""

from __future__ import annotations

import weakref
from functools import partial
from time import perf_counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from ..categories import ACTIVATION, BACKWARD, FORWARD, OTHER, OTHER_PHASE, TEMPORARY
from . import forward_grads as _forward_grads
from . import interrupts as _interrupts
from .cuda_blocks import cuda_block_bytes
from .ledger_recording import LedgerRecording
from .op_kinds import ALIAS, FRESH, INPLACE, LIFT, VIEW, classify, real_tensors
from .records import FreeRef, ModuleNode, PatternRun, StorageRecord, expand_pattern_runs

__all__ = ["StorageRecord", "ModuleNode", "PatternRun", "Ledger", "expand_pattern_runs", "real_tensors"]

_Tensor = torch.Tensor
_graph_task_id = torch._C._current_graph_task_id


def _dynamo_skipper():
    """A function that marks a code object so ``torch.compile`` never traces it or what it calls, at no cost
    per call (a flag on the code object that dynamo's frame evaluator reads); None where this torch has none.

    ``TorchDispatchMode`` subclasses get the same protection by default from a Python wrapper around
    ``__torch_dispatch__`` that costs about 1 us per op (two extra frames and eval-frame swaps: a view op
    under an empty mode took 4.7 us with it and 3.6 us without, on this project's CPU machine; a GPT-2-small
    forward and backward is about 1,200 ops). Without either, a ``torch.compile``d function called inside
    the tracked block would have dynamo compile the ledger's own frames.
    """
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # older torch: keep TorchDispatchMode's wrapper
        return None
    skip = _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP)
    return lambda code: set_code_exec_strategy(code, skip)


_skip_code = _dynamo_skipper()


class Ledger(LedgerRecording, TorchDispatchMode):
    """Records storages made by ops (and found already live) into an append-only event log.

    ``events`` holds ``(record, delta_bytes)``; ``prelude`` holds storages found already live during the
    current step (counted from the step's start); ``marks`` hold module/phase boundaries at event positions.
    Backward on the allocation recorder is :class:`.ledger_recording.LedgerRecording`'s part.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # read once, when the class is made (see _dynamo_skipper)
        return _skip_code is None

    def __init__(self, *, calibrator=None, limit_bytes: int | None = None, on_limit=None, on_backward=None,
                 timer=perf_counter, device_as: dict[str, str] | None = None, on_new_device=None):
        super().__init__()
        self.on_new_device = on_new_device  # called with a device's name the first time one of its storages is seen
        self.device_as = dict(device_as or {})  # count one device's storages as another's ("cpu" -> "cuda:0")
        self.live: dict[int, StorageRecord] = {}
        self.events: list = []
        self.prelude: list = []
        self.marks: list = []
        self.total = 0  # bytes counted now (changed by _add alone)
        self.host = 0  # bytes of self.total on devices the CUDA allocator does not hold (the host's)
        self.accel = False  # a CUDA device is in use: the device-memory limit counts its bytes alone
        self.op_clock = 0.0  # seconds of op time spent in forward phases so far
        self.overhead = 0.0  # seconds spent in memprof's own code (subtracted from recorded times)
        self.phase = OTHER_PHASE
        self.phase_id = 0
        self.cur: ModuleNode | None = None
        self.calibrator = calibrator
        self._cal_views = getattr(calibrator, "all_ops", False)  # the estimator wants views too
        self.limit_bytes = limit_bytes
        self.on_limit = on_limit
        self.on_backward = on_backward
        self.timer = timer
        self.devices: dict[str, int] = {}  # device string -> index into device_names
        self.device_names: list[str] = []
        self._dev_cache: dict = {}  # torch.device -> device index (negative where sizes round: _device_named)
        self._kind: dict = {}  # op -> (kind, callable): see op_kinds.classify
        self._opname: dict = {}
        self._on_free = self._free  # one bound method for every storage's weakref (dropped by detach_all)
        self._init_recording()  # backward on the allocation recorder (see start_recording)

    # ------------------------------------------------------------------------------------------ per op --
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _interrupts.pending:  # a signal recorded in memprof's code: raise it here, before the op
            _interrupts.deliver()
        t_in = perf_counter()
        if kwargs is None:
            kwargs = {}
        if self.phase != BACKWARD and _graph_task_id() != -1 and not _forward_grads.active():
            self.on_backward()
        entry = self._kind.get(func)
        if entry is None:
            entry = self._kind[func] = classify(func)
        kind, run = entry
        live = self.live
        if kind == ALIAS and not self._cal_views:
            t0 = perf_counter()
            out = run(*args, **kwargs)
            dt = perf_counter() - t0
            if type(out) is _Tensor:
                if id(out.untyped_storage()) not in live:  # its argument's storage, never seen: live before
                    self._found_input(args[0], func)
                    if id(out.untyped_storage()) not in live:
                        self._see(out, func, kind)
                    if self.limit_bytes is not None and self.limited_total() > self.limit_bytes:
                        self.on_limit(func)
                if self.phase == FORWARD:
                    self.op_clock += dt
                    node = self.cur
                    if node is not None:
                        name = self._opname.get(func) or self._name_op(func)
                        node.op_ms[name] = node.op_ms.get(name, 0.0) + dt * 1e3
                self.overhead += perf_counter() - t_in - dt
                return out
            self._found_input(args[0], func)  # a tuple of views (split) or a tensor subclass
            excess = 0
        else:
            if kind == LIFT:
                kind = FRESH
            else:
                for a in args:  # inputs never seen before were live before the step (a loss target, a cache)
                    if isinstance(a, _Tensor):
                        if id(a.untyped_storage()) not in live:
                            self._found_input(a, func)
                    elif type(a) is list or type(a) is tuple:
                        for x in a:
                            if isinstance(x, _Tensor) and id(x.untyped_storage()) not in live:
                                self._found_input(x, func)
            cal = self.calibrator
            t0 = perf_counter()
            if cal is not None and (kind != VIEW or self._cal_views):
                out, excess, excess_device = cal.call(func, args, kwargs)
            else:
                out = run(*args, **kwargs)
                excess = 0
            dt = perf_counter() - t0
        # After the op ran (here rather than in a method: one Python call fewer per op): its outputs, scratch,
        # op time and the device-memory limit.
        forward = self.phase == FORWARD
        if forward:
            self.op_clock += dt
        if type(out) is _Tensor:
            self._see(out, func, kind)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, _Tensor):
                    self._see(o, func, kind)
                elif isinstance(o, (tuple, list)):
                    for oo in o:
                        if isinstance(oo, _Tensor):
                            self._see(oo, func, kind)
        elif isinstance(out, _Tensor):
            self._see(out, func, kind)
        if excess:
            self._spike(excess, func, excess_device)
        node = self.cur
        if forward and node is not None:
            name = self._opname.get(func) or self._name_op(func)
            node.op_ms[name] = node.op_ms.get(name, 0.0) + dt * 1e3
        if self.limit_bytes is not None and self.limited_total() > self.limit_bytes:
            self.on_limit(func)
        self.overhead += perf_counter() - t_in - dt
        return out

    def _found_input(self, t, func) -> None:
        for rt in real_tensors(t):
            s = rt.untyped_storage()
            if id(s) not in self.live:
                self.found(s, rt, OTHER, op=None, label="found live", now=True)

    def _name_op(self, func) -> str:
        name = func.overloadpacket.__name__
        self._opname[func] = name
        return name

    def _see(self, t, func, kind) -> None:
        if type(t) is not _Tensor and is_traceable_wrapper_subclass(t):
            for rt in real_tensors(t):
                self._see(rt, func, kind)
            return
        s = t.untyped_storage()
        key = id(s)
        live = self.live
        rec = live.get(key)
        if rec is None:
            if kind != FRESH:
                self.found(s, t, OTHER, op=func, now=True)
                return
            # A storage made now, by this op (the per-op path: kept inline).
            phase = self.phase
            dev = self._dev_cache.get(t.device)
            if dev is None:
                dev = self._device(t.device)
            nb = s.nbytes()
            if dev < 0 and nb:
                nb = cuda_block_bytes(nb)
            node = self.cur
            rec = StorageRecord(nb, ACTIVATION if phase == FORWARD else (OTHER if phase == OTHER_PHASE else TEMPORARY),
                                node, phase, self.phase_id, func, t.shape, t.dtype, dev, "")
            rec.t = self.op_clock
            ref = rec.ref = FreeRef(s, self._on_free)
            ref.key = key
            live[key] = rec
            self._add(rec, nb, self.events)
            if phase == FORWARD and node is not None:
                name = self._opname.get(func) or self._name_op(func)
                node.op_bytes[name] = node.op_bytes.get(name, 0) + nb
        elif kind == INPLACE:
            nb = s.nbytes()
            if rec.device < 0 and nb:  # device index stored negative when rounding applies
                nb = cuda_block_bytes(nb)
            if nb != rec.nbytes:
                self._resized(rec, nb)

    # ------------------------------------------------------------------------------------ bookkeeping --
    def _add(self, rec, delta, log, freed=False) -> None:
        """The one place the running totals change: by ``delta`` bytes of ``rec`` (made, freed, resized, set
        aside), logged as ``(rec, delta)`` in ``log`` (the step's ``events`` or ``prelude``; None: not logged).
        ``freed``: its storage was freed (nothing is logged for no bytes), and a record freed in the phase it
        was made in becomes a temporary. Runs for every new storage and every free: kept to arithmetic."""
        if freed:
            if rec.phase_id == self.phase_id and (rec.cat == ACTIVATION or rec.cat == OTHER):
                rec.cat = TEMPORARY
            if not delta:
                return
        self.total += delta
        if rec.device >= 0:
            self.host += delta
        if log is not None:
            log.append((rec, delta))

    def _device(self, d: torch.device) -> int:
        entry = self._dev_cache.get(d)
        if entry is None:
            name = str(d)
            entry = self._dev_cache[d] = self._device_named(self.device_as.get(name, self.device_as.get(d.type, name)))
        return entry

    def limited_total(self) -> int:
        """The bytes the device-memory limit is checked against: with a CUDA device in use, its bytes alone
        (the host's are listed apart in the profile too), else all."""
        return self.total - self.host if self.accel else self.total

    def _device_named(self, name: str) -> int:
        if name not in self.devices:
            self.devices[name] = len(self.device_names)
            self.device_names.append(name)
            if name.startswith("cuda"):
                self.accel = True
            if self.on_new_device is not None:
                self.on_new_device(name)
        idx = self.devices[name]
        # Encode "rounds to CUDA blocks" in the sign so the per-op path needs one attribute: -(idx+1) rounds.
        return -(idx + 1) if name.startswith("cuda") else idx

    def _new_record(self, s, device, shape, dtype, cat, op, label, log):
        """A record for storage ``s``, followed from now and counted in ``log``."""
        dev = self._device(device)
        nb = s.nbytes()
        if dev < 0 and nb:
            nb = cuda_block_bytes(nb)
        rec = StorageRecord(nb, cat, self.cur, self.phase, self.phase_id, op, shape, dtype, dev, label)
        key = id(s)
        ref = rec.ref = FreeRef(s, self._on_free)
        ref.key = key
        self.live[key] = rec
        self._add(rec, nb, log)
        return rec

    def found(self, s, t, cat, op=None, label="", node=None, now=False) -> StorageRecord:
        """A storage seen for the first time that no op made: counted from the step's start, or from now.

        Parameters, buffers, optimizer state and a root module's inputs are found by hooks and were live
        before the step. Storages first met as an op's input are counted from that op (``now``): they are as
        often made outside the dispatcher just then (``torch.tensor(...)``) as they are old. A storage the
        allocation recorder saw born (a gradient made in backward) is claimed instead: its record, counted
        from its birth, gets the storage's category, name, shape and free.
        """
        if self.recorder is not None:
            rec = self.claim(s, t.shape, t.dtype, cat, label, node)
            if rec is not None:
                return rec
        rec = self._new_record(s, t.device, t.shape, t.dtype, cat, op, label, self.events if now else self.prelude)
        rec.phase = OTHER_PHASE
        rec.phase_id = -1
        if node is not None:
            rec.node = node
        return rec

    def _resized(self, rec, nb) -> None:
        delta = nb - rec.nbytes
        rec.nbytes = nb
        self._add(rec, delta, self.events)

    def storage_resized(self, s) -> None:
        """Called after ``UntypedStorage.resize_`` (patched while tracking)."""
        rec = self.live.get(id(s))
        nb = s.nbytes()
        if rec is None:
            if nb:
                self._new_record(s, s.device, (nb,), torch.uint8, self.new_category(), None, "", self.events)
            return
        if rec.device < 0 and nb:
            nb = cuda_block_bytes(nb)
        if nb != rec.nbytes:
            self._resized(rec, nb)

    def _free(self, ref) -> None:
        """The weakref callback of every followed storage. Python drops exceptions raised in it: a
        ``KeyboardInterrupt``/``SystemExit`` (from a signal handler memprof did not wrap) is kept and raised
        at the next safe point (:mod:`.interrupts`)."""
        try:
            t_in = perf_counter()
            recorder = self.recorder
            if recorder is not None:
                if self.phase != BACKWARD and not self.entering_backward and self._in_open_backward():
                    self.drain()  # the first free in a backward enters its phase, with this storage still live
                rec = self.live.pop(ref.key, None)
                if rec is not None:  # logged at the next drain, after what the recorder saw before it
                    rec.ref = None
                    self._pending.append((recorder.n.value, rec))
                self.overhead += perf_counter() - t_in
                return
            rec = self.live.pop(ref.key, None)
            if rec is None:
                return
            rec.ref = None
            self._add(rec, -rec.nbytes, self.events, True)  # freed (positional: the cheaper call)
            self.overhead += perf_counter() - t_in
        except (KeyboardInterrupt, SystemExit) as e:
            _interrupts.defer_exception(e)

    def _spike(self, excess, func, device) -> None:
        """Memory an op used inside itself: up and down again at this op, checked against the device-memory
        limit while up."""
        dev = self._device(device)
        rec = StorageRecord(excess, TEMPORARY, self.cur, self.phase, self.phase_id, func, (), None, dev, "workspace")
        events = self.events
        self._add(rec, excess, events)
        try:
            if self.limit_bytes is not None and self.limited_total() > self.limit_bytes:
                self.on_limit(func)
        finally:
            self._add(rec, -excess, events)

    def replay_pattern(self, pattern) -> None:
        """Log a recorded optimizer step's births and frees (see :mod:`.optpattern`) as if its ops ran.

        One placeholder event stands for them during the step (a steady AdamW step of GPT-2 small is about
        1,300 events); :func:`expand_pattern_runs` puts them in its place before the step is replayed. The
        running totals do not follow them (the limit is not rehearsed with a replayed step)."""
        devices = {name: self._device_named(name) for name in pattern.device_names}
        self.events.append((PatternRun(pattern, self.phase, self.phase_id, devices), 0))

    def own_time(self, method):
        """Wrap a hook so the time it takes counts as memprof's overhead (left out of recorded times)."""
        def timed(*args, **kwargs):
            if _interrupts.pending:  # a signal recorded in memprof's code: raise it before the hook runs
                _interrupts.deliver()
            t_in, before = perf_counter(), self.overhead
            try:
                return method(*args, **kwargs)
            finally:  # the hook's whole time, once: what ops or hooks inside it added is part of it
                self.overhead = before + (perf_counter() - t_in)
        return timed

    def set_aside(self, records, device: str = "cpu", since: int | None = None) -> list:
        """Stop counting ``records`` in the tracked total: memory that lives on another device (cold path).

        For the estimator's CPU-offload emulation, which runs the host's storages (FSDP's sharded
        parameters and gradients, the optimizer's state and its step's temporaries) on the same fake device
        as the accelerator's. Called before the step is replayed: their events of this step become zero-byte
        ones (which the replay skips), their frees are no longer logged, and they are counted on ``device``
        from now on (sizes no longer rounded like CUDA's). Returns the events taken out, in log order.
        ``since``: the records were all born at or after that index of ``events`` (only those are searched:
        the activation-offload emulation sets each host copy aside as it is made).
        Known limit: a set-aside storage that is resized later is counted again from that resize.
        """
        records = list(records)
        ids = {id(r) for r in records}
        moved = []
        logs = ((self.prelude, 0), (self.events, 0)) if since is None else ((self.events, since),)
        for log, start in logs:
            for i in range(start, len(log)):
                rec, d = log[i]
                if d and id(rec) in ids:
                    log[i] = (rec, 0)
                    moved.append((rec, d))
                    self._add(rec, -d, None)
        index = self._device_named(device)
        for rec in records:
            rec.device = index
            s = rec.ref() if rec.ref is not None else None
            if s is not None:
                rec.nbytes = s.nbytes()
                rec.ref = weakref.ref(s, partial(self._forget, id(s)))
        return moved

    def _forget(self, key, _ref) -> None:
        rec = self.live.pop(key, None)
        if rec is not None:
            rec.ref = None

    def detach_all(self) -> None:
        """Drop every weakref callback (the tracker is finished: no callbacks may outlive it)."""
        for rec in self.live.values():
            rec.ref = None
        self.live.clear()
        self.anon.clear()
        self._on_free = None

    def new_category(self) -> str:
        """The category of a storage made now: an activation in forward, else a temporary (other outside
        the step's phases)."""
        phase = self.phase
        return ACTIVATION if phase == FORWARD else (OTHER if phase == OTHER_PHASE else TEMPORARY)


if _skip_code is not None:
    _skip_code(Ledger.__torch_dispatch__.__code__)
