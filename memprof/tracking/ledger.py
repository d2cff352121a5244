"""The storage ledger: a ``TorchDispatchMode`` that sees every op's outputs and records each storage once.

This is the hottest code in memprof: it runs on every aten op of the tracked step. It only appends to an
event log and keeps a running total; everything else (peaks, samples, per-module statistics) is computed
from the log once per step by :mod:`memprof.tracking.replay`. The running totals (:attr:`Ledger.total`,
:attr:`Ledger.host`) change in one place, :meth:`Ledger._add`, which also logs the change.

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
      this mode while autograd's engine runs; see :meth:`Ledger.start_recording`): every allocation and
      free the allocator reports, op scratch included, logged at module boundaries, with the storages a
      tensor claims later (gradients) followed from their birth.

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

from . import interrupts as _interrupts
from .categories import ACTIVATION, BACKWARD, FORWARD, OTHER, OTHER_PHASE, TEMPORARY
from .cuda_blocks import cuda_block_bytes
from .native import device_name as _native_device_name

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


def real_tensors(t):
    """The plain tensors that hold ``t``'s memory (wrapper subclasses such as DTensor are flattened)."""
    if type(t) is _Tensor or type(t) is torch.nn.Parameter or not is_traceable_wrapper_subclass(t):
        yield t
        return
    inner, _ = t.__tensor_flatten__()
    for attr in inner:
        x = getattr(t, attr)
        if isinstance(x, _Tensor):  # DTensor also lists its device mesh
            yield from real_tensors(x)


# Op kinds, cached per OpOverload. _LIFT: ``lift_fresh`` (``torch.tensor(...)``): its input is the constant
# being lifted, the same storage as its output in a real run; under fake tensors the output is a new fake
# storage and the real constant is not memory of the step, so the input is not looked at. _ALIAS: a view op
# whose one tensor argument is its first (most views): its outputs alias that argument, so the per-op path
# looks at the output alone (the cheapest case, and over two thirds of a transformer step's ops).
_FRESH, _VIEW, _INPLACE, _LIFT, _ALIAS = 0, 1, 2, 3, 4
_LIFTS = {torch.ops.aten.lift_fresh.default}


class _FreeRef(weakref.ref):
    """A weak reference to a storage that calls the ledger back when it is freed, carrying the storage's key
    (one object per storage, where a plain ref with a ``partial`` callback is two)."""

    __slots__ = ("key",)


class StorageRecord:
    """One storage's life: its size, category, owner module and where it was made."""

    __slots__ = ("nbytes", "cat", "node", "phase", "phase_id", "op", "shape", "dtype", "device", "label",
                 "ref", "t")

    def __init__(self, nbytes, cat, node, phase, phase_id, op, shape, dtype, device, label=""):
        self.nbytes = nbytes
        self.cat = cat
        self.node = node
        self.phase = phase
        self.phase_id = phase_id
        self.op = op
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.label = label
        self.ref = None
        self.t = 0.0  # forward op time elapsed when it was made (Ledger.op_clock)


class ModuleNode:
    """A tracked module: its name in the tree and the statistics the replay accumulates for it."""

    __slots__ = ("name", "type", "parent", "structure", "op_ms", "op_bytes", "stats", "module", "output_bytes",
                 "clock_in", "clock_out", "recompute_fraction", "output_ids")

    def __init__(self, name: str, type_name: str, parent: ModuleNode | None, structure: str = "", module=None):
        self.module = weakref.ref(module) if module is not None else None
        self.name = name
        self.type = type_name
        self.parent = parent
        self.structure = structure
        self.op_ms: dict[str, float] = {}  # forward op time in the current step (exclusive of children)
        self.op_bytes: dict[str, int] = {}  # bytes forward ops made in the current step (exclusive), freed or not
        self.stats = None  # filled by replay.NodeStats
        self.output_bytes = 0  # bytes of the outputs its forward made (max over calls)
        self.clock_in = self.clock_out = 0.0  # Ledger.op_clock at its last forward's entry and exit
        self.recompute_fraction = 1.0  # share of its forward op time up to its last tensor backward keeps
        self.output_ids: frozenset = frozenset()  # records its last forward returned


class PatternRun:
    """A placeholder in the event log for a replayed optimizer step's events (:meth:`Ledger.replay_pattern`)."""

    __slots__ = ("pattern", "phase", "phase_id", "devices")

    def __init__(self, pattern, phase, phase_id, devices) -> None:
        self.pattern = pattern
        self.phase = phase
        self.phase_id = phase_id
        self.devices = devices  # device name -> the ledger's device index

    def events(self) -> list:
        phase, pid, devices = self.phase, self.phase_id, self.devices
        recs = [StorageRecord(nb, TEMPORARY, None, phase, pid, op, shape, dtype, devices[dev], label)
                for nb, op, shape, dtype, dev, label in self.pattern.templates]
        return [(recs[i], delta) for i, delta in self.pattern.events]


def expand_pattern_runs(events: list, marks: list) -> tuple[list, list]:
    """A step's log with each :class:`PatternRun` replaced by its events, and the marks' event positions
    moved to match (a mark made after a placeholder points past it)."""
    where = [i for i, (rec, _) in enumerate(events) if type(rec) is PatternRun]
    if not where:
        return events, marks
    out: list = []
    shifts = []  # (position in the old log after which marks move, by how much in all)
    start = 0
    for i in where:
        out.extend(events[start:i])
        run = events[i][0].events()
        out.extend(run)
        shifts.append((i, len(out) - (i + 1)))
        start = i + 1
    out.extend(events[start:])
    moved = []
    for m in marks:
        pos = m[0]
        shift = 0
        for i, by in shifts:
            if pos > i:
                shift = by
        moved.append((pos + shift, *m[1:]) if shift else m)
    return out, moved


class Ledger(TorchDispatchMode):
    """Records storages made by ops (and found already live) into an append-only event log.

    ``events`` holds ``(record, delta_bytes)``; ``prelude`` holds storages found already live during the
    current step (counted from the step's start); ``marks`` hold module/phase boundaries at event positions.
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
        self._kind: dict = {}  # op -> (kind, callable): see _classify
        self._opname: dict = {}
        self._on_free = self._free  # one bound method for every storage's weakref (dropped by detach_all)
        # Backward on the allocation recorder (see start_recording): the recorder, how many of its events
        # were read, and the records of allocations it reported, by pointer, until a tensor claims one.
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

    # ------------------------------------------------------------------------------------------ per op --
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _interrupts.pending:  # a signal recorded in memprof's code: raise it here, before the op
            _interrupts.deliver()
        t_in = perf_counter()
        if kwargs is None:
            kwargs = {}
        if self.phase != BACKWARD and _graph_task_id() != -1:
            self.on_backward()
        entry = self._kind.get(func)
        if entry is None:
            entry = self._classify(func)
        kind, run = entry
        live = self.live
        excess = 0
        if kind == _ALIAS and not self._cal_views:
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
        else:
            if kind == _LIFT:
                kind = _FRESH
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
            if cal is not None and (kind != _VIEW or self._cal_views):
                out, excess, excess_device = cal.call(func, args, kwargs)
            else:
                out = run(*args, **kwargs)
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

    def _classify(self, func) -> tuple:
        """``(kind, callable)`` for an op: the callable is the C++ overload an ``OpOverload`` calls (one Python
        frame fewer per op)."""
        if func in _LIFTS:
            kind = _LIFT
        elif func.is_view:
            arguments = func._schema.arguments
            tensors = [a for a in arguments if "Tensor" in str(a.type)]
            kind = _ALIAS if len(tensors) == 1 and tensors[0] is arguments[0] and not arguments[0].kwarg_only \
                and str(arguments[0].type) == "Tensor" else _VIEW
        else:
            kind = _FRESH
            for ret in func._schema.returns:
                info = ret.alias_info
                if info is not None:
                    kind = _INPLACE if info.is_write else max(kind, _VIEW)
        run = func._op if type(func) is torch._ops.OpOverload and callable(getattr(func, "_op", None)) else func
        entry = self._kind[func] = (kind, run)
        return entry

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
            if kind != _FRESH:
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
            ref = rec.ref = _FreeRef(s, self._on_free)
            ref.key = key
            live[key] = rec
            self._add(rec, nb, self.events)
            if phase == FORWARD and node is not None:
                name = self._opname.get(func) or self._name_op(func)
                node.op_bytes[name] = node.op_bytes.get(name, 0) + nb
        elif kind == _INPLACE:
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
        # Encode "rounds to 512" in the sign so the per-op path needs one attribute: -(idx+1) rounds.
        return -(idx + 1) if name.startswith("cuda") else idx

    def _new_record(self, s, device, shape, dtype, cat, op, label, log):
        """A record for storage ``s``, followed from now and counted in ``log``."""
        dev = self._device(device)
        nb = s.nbytes()
        if dev < 0 and nb:
            nb = cuda_block_bytes(nb)
        rec = StorageRecord(nb, cat, self.cur, self.phase, self.phase_id, op, shape, dtype, dev, label)
        key = id(s)
        ref = rec.ref = _FreeRef(s, self._on_free)
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

    def mark(self, kind: str, node: ModuleNode | None = None) -> None:
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

    def own_time(self, method):
        """Wrap a hook so the time it takes counts as memprof's overhead (left out of recorded times)."""
        def timed(*args, **kwargs):
            if _interrupts.pending:  # a signal recorded in memprof's code: raise it before the hook runs
                _interrupts.deliver()
            t_in = perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.overhead += perf_counter() - t_in
        return timed

    def set_aside(self, records, device: str = "cpu") -> list:
        """Stop counting ``records`` in the tracked total: memory that lives on another device (cold path).

        For the estimator's CPU-offload emulation, which runs the host's storages (FSDP's sharded
        parameters and gradients, the optimizer's state and its step's temporaries) on the same fake device
        as the accelerator's. Called before the step is replayed: their events of this step become zero-byte
        ones (which the replay skips), their frees are no longer logged, and they are counted on ``device``
        from now on (sizes no longer rounded like CUDA's). Returns the events taken out, in log order.
        Known limit: a set-aside storage that is resized later is counted again from that resize.
        """
        records = list(records)
        ids = {id(r) for r in records}
        moved = []
        for log in (self.prelude, self.events):
            for i, (rec, d) in enumerate(log):
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

    # ------------------------------------------------------------------- backward on the recorder --
    def start_recording(self, recorder) -> None:
        """Take allocations from ``recorder`` (a started :class:`.native.AllocationRecorder`) instead of ops
        until :meth:`stop_recording`: the tracker does this while autograd's engine runs with this mode
        popped, where the per-op path would cost more than everything else (results/floors.json).

        Each allocation the recorder reports becomes a record of the phase and module it happened in, with
        no shape or op, logged when the recorder is drained: at phase marks, when a storage is claimed and
        when backward ends. Module boundaries inside backward (:meth:`defer_mark`) and frees of storages
        the ledger follows (their weakrefs) wait for the drain, each placed at the recorder's count when it
        happened, so the log keeps the allocator's order. A record is claimed by the first tensor found on its memory (:meth:`found`): a
        parameter's gradient gets its category, name, shape and weakref there. Frees the recorder reports
        for memory it did not see born are the ledger's followed storages (their weakrefs log them) or
        older memory, and are skipped.
        """
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
        devices: dict = {}
        it = iter(raw)
        for ptr, nb, code in zip(it, it, it):
            if nb > 0:
                dev = devices.get(code)
                if dev is None:
                    dev = devices[code] = self._device_named(_native_device_name(code))
                rec = StorageRecord(nb, cat, node, phase, pid, None, (), None, dev, "")
                rec.t = clock
                anon[ptr] = rec
                add(rec, nb, events)
            elif nb < 0:
                rec = pop(ptr, None)
                if rec is None:  # a followed storage (its weakref logs it) or memory older than the recorder
                    continue
                add(rec, -rec.nbytes, events)

    def new_category(self) -> str:
        """The category of a storage made now: an activation in forward, else a temporary (other outside
        the step's phases)."""
        phase = self.phase
        return ACTIVATION if phase == FORWARD else (OTHER if phase == OTHER_PHASE else TEMPORARY)

    def _in_open_backward(self) -> bool:
        """Inside a graph task whose backward phase the tracker has not closed yet (its end callback runs
        inside the task: what follows it must not open another)."""
        task = _graph_task_id()
        return task != -1 and task != self.closed_task

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
        ref = rec.ref = _FreeRef(s, self._on_free)
        ref.key = key
        self.live[key] = rec
        return rec


if _skip_code is not None:
    _skip_code(Ledger.__torch_dispatch__.__code__)
