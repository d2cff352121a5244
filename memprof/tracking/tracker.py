"""The Tracker: one tracking code path for ``memprof.track``, ``@memprof.profile`` and ``memprof run``.

It combines the storage ledger (:mod:`.ledger`, a dispatch mode) with module and optimizer hooks that tell it
*where* each op runs:

* global module forward pre/post hooks (or only the given model's modules) keep a forward module stack;
* gradient hooks on each module's outputs ("any") and inputs ("all") mark its backward (for one tensor, a
  pre-hook on the node that made it, shared by every module boundary at that tensor; see
  ``Tracker._on_grads``), which unlike ``register_full_backward_hook`` is right for modules whose inputs
  need no grad; modules whose backward never closes (embeddings, the first layer) are closed when the graph
  task ends;
* backward is detected per op from the autograd engine (``_current_graph_task_id``), so a loss computed
  outside any module is attributed correctly;
* on the host, backward runs with the ledger's mode popped and the C++ allocation recorder on
  (``_run_backward``, patching ``torch.autograd._engine_run_backward`` while tracking): no Python per
  backward op, every byte the allocator hands out (op scratch included) logged at module boundaries, the
  gradients claimed by their parameters after the engine returns. Backward is dispatched per op instead on CUDA, with sharded
  parameters (FSDP, DTensor), under torch.profiler or another mode, with a device-memory limit, in the
  estimator, and after a backward whose memory outlived it in tensors the tracker cannot reach (noted);
* global optimizer step pre/post hooks delimit the optimizer phase; a step ends at its optimizer step and
  the next one starts at the next forward;
* a parameter's ``.grad`` (born as a backward temporary) is relabelled ``grad`` after each backward
  (``_label_grads``), or by a ``register_post_accumulate_grad_hook`` where backward runs per op from the
  start; after each optimizer step its state tensors are relabelled ``optimizer``.

Leave no trace: every hook handle, the dispatch mode, the ``UntypedStorage.resize_`` and autograd-engine
patches (each put back exactly as found) and every storage weakref are removed when tracking stops, also
when the tracked block raises (including out of memory) or is interrupted: a signal that arrives while
memprof's own code runs is raised at the next op or hook, at the latest once all of that is undone
(:mod:`.interrupts`). One tracker runs at a time in a process: starting (or resuming) a second while one
runs raises :class:`~memprof.errors.TrackingError` (a paused tracker lets another run). Known limits: modules run by ``torch.compile`` run eagerly under the dispatch mode (noted in the
profile; dynamo is told never to compile the tracker's own frames); non-``nn.Module`` models get no
per-module rows; with ``model=None`` only modules that run forward inside the block are found.
"""

from __future__ import annotations

import datetime
import threading
import weakref
from functools import partial

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.nn.modules import module as _nn_module
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import (
    _get_current_dispatch_mode,
    _get_current_dispatch_mode_stack,
    _pop_mode,
    _push_mode,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_leaves

from ..errors import DeviceMemoryExceeded, MemprofError, TrackingError
from ..structure import structure_hashes
from ..units import format_bytes
from . import interrupts, native, optpattern
from .categories import (
    ACTIVATION,
    BACKWARD,
    BUFFER,
    FORWARD,
    GRAD,
    INPUT,
    OPT_PHASE,
    OPTIMIZER,
    OTHER,
    OTHER_PHASE,
    PARAM,
    PHASES,
    TEMPORARY,
)
from .clock import Timer
from .devices import CudaPeakFolder, cuda_available, cuda_device_facts
from .exitguard import guard_distributed_exit
from .ledger import Ledger, ModuleNode, expand_pattern_runs, real_tensors
from .profile_builder import build_profile
from .replay import Replay
from .scratch import ScratchCalibrator

__all__ = ["Tracker", "track"]

_graph_task_id = torch._C._current_graph_task_id
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_IDLE, _RUNNING, _PAUSED, _STOPPED = range(4)
_BACKLOG_EVENTS = 200_000  # finished steps kept unreplayed up to this many ledger events (~100-200 bytes each)
_installed: list = []  # the tracker whose hooks, patches and mode are installed now (trackers do not nest)
_NO_ATTR = object()


def _refuse_nesting(tracker, doing: str) -> None:
    if _installed and _installed[0] is not tracker:
        raise TrackingError(
            f"cannot {doing} this tracker: another memprof tracker is running in this process, and trackers do "
            "not nest (both would patch the same global hooks). Stop the other one first, or track both "
            "parts of the code with one tracker")


@interrupts.pass_through
def _user_backward(engine, args, kwargs):
    """Autograd's engine, run by the tracker: the user's backward (hooks, autograd Functions, recomputed
    forwards) runs under this frame, and a signal there is raised at once (:mod:`.interrupts`)."""
    return engine(*args, **kwargs)


def _frozen(modules) -> bool:
    """Whether a model (its ``named_modules()``) has parameters and none of them requires a gradient."""
    params = [p for _, m in modules for p in m._parameters.values() if p is not None]
    return bool(params) and not any(p.requires_grad for p in params)


def _free_name(mod, frozen: bool, others) -> str:
    taken = {n.name for _, n in others}
    base = ("frozen-" if frozen else "") + type(mod).__name__
    name, k = base, 2
    while name in taken:
        name, k = f"{base}#{k}", k + 1
    return name


def _as_list(obj, kind, what):
    if obj is None:
        return []
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    for x in items:
        if not isinstance(x, kind):
            raise TrackingError(
                f"{what} must be a {kind.__name__} (or a list of them), got {type(x).__module__}.{type(x).__name__}"
            )
    return items


class Tracker:
    """Tracks memory of training steps by module, category and phase; ``profile`` holds the result.

    Args:
        model: the module(s) to attribute memory to; ``None`` tracks every module run inside the block.
        optimizer: the optimizer(s) whose steps delimit steps; ``None`` uses every optimizer stepped inside.
        steps: stop tracking by itself after this many optimizer steps (``None``: until ``stop()``).
        device_memory: rehearse a device of this many bytes: raise :class:`DeviceMemoryExceeded` (with the
            partial profile) when tracked memory would go over it: the CUDA device's bytes alone where CUDA
            is available or once a CUDA storage is seen (host storages do not count), else all.
        top_tensors: how many of the largest live tensors to keep at the peak.
        max_samples: bound on the timeline's length (long runs are downsampled; the peak is always kept).
        calibrate: measure op-internal scratch memory on the real allocator (see :mod:`.scratch`); or an
            object with the calibrator's ``call(func, args, kwargs)`` (the estimator passes its own).
        device_as: count storages of one device as another's (the estimator emulates CUDA on CPU kernels).
        clock: a function returning seconds, used instead of the wall clock for all times.
        on_stop: called with the tracker once tracking has stopped and ``profile`` is built.
        optimizer_replay: replay a steady optimizer step's allocations from the last tracked step of the same
            optimizer and signature instead of dispatching its ops (see :mod:`.optpattern`); the same bytes,
            a fraction of the cost.
    """

    def __init__(self, model=None, optimizer=None, *, steps: int | None = None, device_memory: int | None = None,
                 top_tensors: int = 20, max_samples: int = 2000, calibrate: bool = True, on_stop=None,
                 assumptions: dict | None = None, estimated: bool = False, environment: dict | None = None,
                 device_as: dict[str, str] | None = None, clock=None, optimizer_replay: bool = True):
        self._models = _as_list(model, torch.nn.Module, "model")
        self._optimizers = _as_list(optimizer, torch.optim.Optimizer, "optimizer")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise TrackingError(f"steps must be a positive integer, got {steps!r}")
        if device_memory is not None and (not isinstance(device_memory, int) or device_memory <= 0):
            raise TrackingError(f"device_memory must be a positive number of bytes, got {device_memory!r}")
        self._steps_limit = steps
        self._device_memory = device_memory
        self._top_k = top_tensors
        self._max_samples = max_samples
        self._calibrate = calibrate
        self._on_stop = on_stop
        self._assumptions = dict(assumptions or {})
        self._estimated = estimated
        self._environment = dict(environment or {})
        self._device_as = device_as
        self._clock = clock
        # Patterns are shared between trackers of the same kind only (scratch spikes, device mapping).
        self._replay_context = (calibrate is True, tuple(sorted((device_as or {}).items())))
        self._optimizer_replay = (optimizer_replay and isinstance(calibrate, bool) and device_memory is None
                                  and not estimated)
        self._state = _IDLE
        self._profile = None
        self._pending = None  # what stop() kept for building the profile on first read
        self._cuda_facts: dict = {}  # CUDA device name -> facts read at stop (see _read_cuda_facts)
        self._backlog: list = []  # finished steps not replayed yet (see _replay_backlog)
        self._backlog_events = 0
        self._dist_env: dict = {}  # world size and rank when tracking stopped under torch.distributed
        self._error: BaseException | None = None
        self._limit_exc: DeviceMemoryExceeded | None = None
        self._guarded = False  # holds the signal-handler wrappers of .interrupts (from start to stop)

    # ------------------------------------------------------------------------------------- lifecycle --
    @property
    def profile(self):
        """The :class:`memprof.Profile`, available once tracking has stopped (built on first read)."""
        if self._profile is None and self._pending is not None:
            self._build_pending()
        if self._profile is None:
            if self._state == _STOPPED and self._error is not None:
                raise TrackingError(f"building the profile failed: {self._error!r}") from self._error
            raise TrackingError("the profile is ready only after tracking stops (leave the `with` block)")
        return self._profile

    @property
    def active(self) -> bool:
        return self._state == _RUNNING

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        return False

    def start(self) -> Tracker:
        if self._state != _IDLE:
            raise TrackingError("a Tracker can be started only once; make a new one")
        _refuse_nesting(self, "start")
        cuda = self._clock is None and cuda_available() and torch.cuda.is_initialized()
        self._timer = Timer(cuda, self._clock)
        self._cuda_folder = CudaPeakFolder() if cuda else None
        if self._cuda_folder is not None:
            for i in range(torch.cuda.device_count()):
                self._cuda_folder.start(i)
        if self._calibrate is True:
            calibrator = ScratchCalibrator(self._cuda_folder)
        else:
            calibrator = self._calibrate or None
        self.ledger = Ledger(calibrator=calibrator, limit_bytes=self._device_memory, on_limit=self._over_limit,
                             on_backward=self._enter_backward, timer=self._timer, device_as=self._device_as,
                             on_new_device=self._new_device)
        self._timer.ledger = self.ledger
        # On a machine with a GPU the rehearsed device is the GPU, also before the block's first CUDA tensor
        # (a model built on the host and moved): host storages never count against the limit there.
        self.ledger.accel = self._clock is None and not self._estimated and cuda_available()
        # Backward on the allocation recorder (see _run_backward): the host's allocator only, and only where
        # the ledger would measure op scratch anyway (the recorder sees it) and rehearses no device limit.
        self._backward_on_recorder = (self._calibrate is True and self._device_memory is None
                                      and not self._estimated and not self._device_as and not self.ledger.accel
                                      and native.available())
        own = self.ledger.own_time
        self._hook_fw_pre, self._hook_fw_post = own(self._fw_pre), own(self._fw_post)
        self._hook_opt_pre, self._hook_opt_post = own(self._opt_pre), own(self._opt_post)
        self._hook_grad = own(self._grad_accumulated)
        self._hook_bw_pre, self._hook_bw_post = own(self._bw_pre), own(self._bw_post)
        self._nodes: dict = {}  # module -> ModuleNode
        self._roots: list = []  # (module, node)
        self._owner: dict = {}  # parameter -> (node, name)
        self._known_optimizers: list = []
        self._handles: list = []  # per-run hook handles (grad-accumulate, multi-grad)
        self._unhooked: list = []  # parameters whose gradients _run_backward labels (no accumulate hook)
        self._grad_hooks: dict = {}  # id(tensor) -> _GradHooks, for the forward running now
        self._fstack: list = []
        self._bstack: list = []
        self._after_opt = False
        self._opt_in_step: list = []
        self._opt_order: list | None = None
        self._stop_at_next = False
        self._in_opt_post = False
        self._skipping = None  # the optimizer whose step runs without the ledger (replayed pattern)
        self._replayed = 0
        self._opt_active = None  # (optimizer, has a closure) while its step runs
        self._opt_nested = 0  # optimizer steps running inside it
        self._recording = None  # (optimizer, signature, events index, phase id, prelude/marks lengths)
        self._step_index = 0
        self._notes: set[str] = set()
        self._t0 = self._timer()
        self._step_t0 = self._t0
        self.replay = Replay(self._t0, self._timer.bind(self._t0), self._top_k)
        self._created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        guard_distributed_exit()
        self._guarded = interrupts.acquire()
        try:
            self._install()
            for m in self._models:
                self._add_root(m)
            for opt in self._optimizers:
                self._add_optimizer(opt)
        except BaseException:
            self.stop()
            raise
        return self

    def pause(self) -> None:
        """Stop observing ops and hooks (frees are still seen) until :meth:`resume`."""
        if self._state == _RUNNING:
            self._uninstall()
            self._state = _PAUSED

    def resume(self) -> None:
        if self._state == _PAUSED:
            _refuse_nesting(self, "resume")
            self._install()

    def stop(self) -> None:
        """Stop tracking (idempotent): remove every hook and the mode.

        The profile is built when ``profile`` is first read, as torch.profiler processes its events lazily:
        what stop() keeps for it is plain records of the run (no tensors, modules or hooks), with each CUDA
        device's allocator peaks and NVML figures read at stop. It is built at once when something needs it
        then (``on_stop``, a rehearsed device's limit).
        """
        if self._state in (_IDLE, _STOPPED):
            self._state = _STOPPED
            self._release_guard()
            return
        try:
            self._stop()
        finally:
            self._release_guard()  # raises an interrupt recorded while tracking, now that nothing is left

    def _release_guard(self) -> None:
        if self._guarded:
            self._guarded = False
            interrupts.release()

    def _stop(self) -> None:
        try:
            if self._state == _RUNNING:
                self._uninstall()
        finally:
            self._state = _STOPPED
            try:
                self._finish()
            except Exception as e:  # never leave weakrefs or handles behind because of a bug here
                self._error = e
            finally:
                for h in self._handles:
                    h.remove()
                self._handles.clear()
                self.ledger.detach_all()
                self._nodes.clear()
                self._owner.clear()
                self._unhooked.clear()
                self._grad_hooks.clear()
                self._roots.clear()
                self._known_optimizers.clear()
                self._models, self._optimizers = [], []  # a finished tracker keeps none of the user's objects
                self._break_cycles()
        if self._limit_exc is not None:
            self._limit_exc.profile = self._profile
        if self._on_stop is not None and self._profile is not None:
            self._on_stop(self)

    def _break_cycles(self) -> None:
        """Drop the references that tie the finished tracker into cycles (its hooks are its bound methods,
        the ledger calls back into it and its timer), so that it and the records of the run are freed as
        soon as the caller lets go of it, not at the next full garbage collection (thousands of objects
        a step, which would make that collection, whenever it comes, the tracker's cost)."""
        self._hook_fw_pre = self._hook_fw_post = self._hook_opt_pre = self._hook_opt_post = None
        self._hook_grad = self._hook_bw_pre = self._hook_bw_post = None
        led = self.ledger
        led.on_limit = led.on_backward = led.on_new_device = None
        led.timer = None
        self._timer.ledger = None

    # ------------------------------------------------------------------------------ install/uninstall --
    def _install(self) -> None:
        _refuse_nesting(self, "start")
        _installed.append(self)
        self._global = [
            _nn_module.register_module_forward_pre_hook(self._hook_fw_pre),
            _nn_module.register_module_forward_hook(self._hook_fw_post, with_kwargs=True, always_call=True),
            register_optimizer_step_pre_hook(self._hook_opt_pre),
            register_optimizer_step_post_hook(self._hook_opt_post),
        ]
        ledger = self.ledger
        orig = torch.UntypedStorage.resize_

        def resize_(storage, size):
            if ledger.recorder is not None:  # in a backward run on the allocation recorder
                ledger.drain()
                out = orig(storage, size)
                if id(storage) in ledger.live:
                    # A storage the ledger follows: its record is resized, and the allocation and free the
                    # resize made are not logged again.
                    ledger.skip_recorded()
                    ledger.storage_resized(storage)
                elif storage.nbytes():  # the memory it was given is followed from now on, as the storage
                    ledger.claim(storage, (storage.nbytes(),), torch.uint8, ledger.new_category())
                return out
            out = orig(storage, size)
            if ledger is _get_current_dispatch_mode():
                ledger.storage_resized(storage)
            return out

        resize_.__wrapped__ = orig
        self._resize = (resize_, torch.UntypedStorage.__dict__.get("resize_", _NO_ATTR))
        torch.UntypedStorage.resize_ = resize_
        self._engine = None
        if self._backward_on_recorder:
            engine = torch.autograd._engine_run_backward

            def run_backward(*args, **kwargs):
                result = self._run_backward(engine, args, kwargs)
                if interrupts.pending:  # a signal recorded in memprof's code during this backward
                    interrupts.deliver()
                return result

            run_backward.__wrapped__ = engine
            torch.autograd._engine_run_backward = run_backward
            self._engine = (run_backward, engine)
        ledger.__enter__()
        self._state = _RUNNING

    def _uninstall(self) -> None:
        if _installed and _installed[-1] is self:
            _installed.pop()
        opt_post = self._global[-1]
        for h in self._global:
            _remove_hook(h, iterating=self._in_opt_post and h is opt_post)
            # torch's handle forgets the with_kwargs flag of global forward hooks: remove it ourselves.
            _nn_module._global_forward_hooks_with_kwargs.pop(h.id, None)
        self._global = []
        ours, before = self._resize
        if torch.UntypedStorage.__dict__.get("resize_") is ours:  # else patched over since: left to its owner
            if before is _NO_ATTR:
                del torch.UntypedStorage.resize_
            else:
                torch.UntypedStorage.resize_ = before
        if self._engine is not None:
            if torch.autograd._engine_run_backward is self._engine[0]:
                torch.autograd._engine_run_backward = self._engine[1]
            self._engine = None
        top = _get_current_dispatch_mode()
        if top is self.ledger:
            self.ledger.__exit__(None, None, None)
        else:
            # Another mode was pushed above ours inside the block and not popped: remove ours from below it.
            stack = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
            if self.ledger in stack:
                saved = []
                while _get_current_dispatch_mode() is not self.ledger:
                    saved.append(torch.utils._python_dispatch._pop_mode())
                self.ledger.__exit__(None, None, None)
                for m in reversed(saved):
                    torch.utils._python_dispatch._push_mode(m)

    def _run_backward(self, engine, args, kwargs):
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
        if led.recorder is not None or self._state != _RUNNING:  # nested in a recorded backward, or paused
            return _user_backward(engine, args, kwargs)
        rec = None
        if self._backward_on_recorder and _get_current_dispatch_mode() is led \
                and len(_get_current_dispatch_mode_stack()) == 1:
            try:
                rec = native.AllocationRecorder().start()
            except MemprofError:
                pass
        if rec is None:  # per op
            result = _user_backward(engine, args, kwargs)
            if self._state == _RUNNING:
                self._label_grads(self._unhooked)
            return result
        result = None
        phase_id = led.phase_id
        led.start_recording(rec)
        try:
            mode = _pop_mode()
            try:
                with native.quiet_allocator_log():
                    result = _user_backward(engine, args, kwargs)
            finally:
                _push_mode(mode)
                if self._state != _RUNNING and _get_current_dispatch_mode() is mode:
                    # Tracking stopped or paused inside backward (an optimizer step run from a gradient
                    # hook), when the mode was not on the stack to be removed: remove it now.
                    mode.__exit__(None, None, None)
        finally:
            try:
                if self._state == _RUNNING and led.recorder is not None:
                    closing = led.phase_id == phase_id and led.undrained()
                    if closing:  # nothing in this backward drained: no module, no followed storage freed
                        self._enter_backward(queue=False)
                    led.drain(switch=False)
                    self._claim_survivors(result)
                    if closing:
                        self._end_backward()
            finally:
                before = led.unfollowed
                led.stop_recording()
                rec.stop()
                if led.unfollowed > before:
                    self._backward_on_recorder = False
                    self._notes.add(
                        f"{format_bytes(led.unfollowed - before)} allocated in a backward outlived it in tensors "
                        "memprof does not follow (not a parameter's gradient nor a torch.autograd.grad result): "
                        "counted until tracking stopped (their frees unseen); later backwards were tracked per op")
        return result

    def _label_grads(self, params) -> None:
        """Label the gradients of ``params`` after a backward: in a recorded one this claims the record the
        recorder made for each."""
        live, owner = self.ledger.live, self._owner
        for p in params:
            g = p.grad
            if g is None:
                continue
            if type(g) is _Tensor:
                rec = live.get(id(g.untyped_storage()))
                if rec is not None and rec.cat == GRAD:
                    continue
            node, name = owner.get(p, (None, ""))
            self._relabel(g, GRAD, f"{name}.grad", node)

    def _claim_survivors(self, result) -> None:
        """Give the recorder's records still live after backward to the tensors holding them: parameters'
        gradients (every parameter's: none has an accumulate hook in a recorded backward), the optimizers'
        state (made there when a gradient hook steps the optimizer) and what ``torch.autograd.grad``
        returned."""
        led = self.ledger
        self._label_grads(self._owner)
        if led.anon:  # optimizer state made in backward (an optimizer stepped from a gradient hook)
            for opt in {id(o): o for o in (*self._optimizers, *self._known_optimizers)}.values():
                self._label_state(opt)
        if led.anon and isinstance(result, tuple):
            for t in result:
                if isinstance(t, torch.Tensor):
                    for rt in real_tensors(t):
                        s = rt.untyped_storage()
                        if id(s) not in led.live:
                            led.claim(s, rt.shape, rt.dtype, TEMPORARY)

    # ----------------------------------------------------------------------------------------- modules --
    def _add_root(self, mod) -> ModuleNode:
        """Name a model met in the step and walk it. The first is the root (""); another is named by its
        class, "frozen-" first when none of its parameters trains (DPO's reference beside the policy), and a
        frozen model that ran first gives the root's place to the first trained one."""
        modules = list(mod.named_modules())  # one walk of the tree, shared by what follows
        contained = {id(m) for _, m in modules}
        others = [(m, n) for m, n in self._roots if id(m) not in contained]
        frozen = _frozen(modules)
        first = next(((m, n) for m, n in others if n.name == ""), None)
        if first is not None and not frozen and _frozen(list(first[0].named_modules())):
            others.remove(first)  # the frozen model that ran first: renamed, the trained one is the root
            self._roots = others
            others.append((first[0], self._place(first[0], list(first[0].named_modules()),
                                                 _free_name(first[0], True, others))))
        name = _free_name(mod, frozen, others) if any(n.name == "" for _, n in others) else ""
        root = self._place(mod, modules, name)
        self._roots = others + [(mod, root)]
        return root

    def _place(self, mod, modules, name: str) -> ModuleNode:
        structure = structure_hashes(mod)
        walk: dict[str, ModuleNode] = {}
        for fqn, sub in modules:
            full = fqn if not name else (f"{name}.{fqn}" if fqn else name)
            parent = walk.get(fqn.rpartition(".")[0]) if fqn else None
            node = self._nodes.get(sub)
            if node is None:
                node = ModuleNode(full, type(sub).__name__, parent, structure[id(sub)], sub)
                self._nodes[sub] = node
            else:
                node.name, node.parent = full, parent
            walk[fqn] = node
        if any(type(m).__name__ == "OptimizedModule" for _, m in modules):
            self._notes.add("torch.compile: compiled modules ran eagerly under the tracker (memory of the eager "
                            "program, which can differ from the compiled one)")
        self._add_params(modules, name, walk)
        return walk[""]

    def _add_params(self, modules, prefix, walk) -> None:
        led = self.ledger
        seen_storage = set()
        grads = []  # parameters that get gradients
        for pname, p in _members(modules, "_parameters"):
            owner = walk.get(pname.rpartition(".")[0]) or walk[""]
            full = f"{prefix}.{pname}" if prefix else pname
            self._owner[p] = (owner, full)
            for t in real_tensors(p):
                s = t.untyped_storage()
                if id(s) in seen_storage:
                    continue
                seen_storage.add(id(s))
                rec = led.live.get(id(s))
                if rec is None:
                    led.found(s, t, PARAM, label=full, node=owner)
                else:
                    rec.cat, rec.label, rec.node = PARAM, full, owner
            if p.grad is not None:
                self._label_grad(p)
            if p.requires_grad:
                grads.append(p)
            if type(p) is not _Parameter and (type(p).__name__ == "FlatParameter" or is_traceable_wrapper_subclass(p)):
                # FSDP and DTensor keep collective buffers made in backward past it, which no tensor the
                # tracker can reach holds: backward is tracked per op (see _run_backward).
                self._backward_on_recorder = False
        for bname, b in _members(modules, "_buffers"):
            owner = walk.get(bname.rpartition(".")[0]) or walk[""]
            full = f"{prefix}.{bname}" if prefix else bname
            for t in real_tensors(b):
                s = t.untyped_storage()
                if id(s) in seen_storage:
                    continue
                seen_storage.add(id(s))
                rec = led.live.get(id(s))
                if rec is None:
                    led.found(s, t, BUFFER, label=full, node=owner)
                elif rec.cat != PARAM:
                    rec.cat, rec.label, rec.node = BUFFER, full, owner
        if self._backward_on_recorder:
            # Gradients are labelled after each backward (_run_backward), not by a hook per parameter: in a
            # recorded backward the hooks were a third of memprof's cost (a claim and a drain each).
            self._unhooked.extend(grads)
        else:
            self._handles.extend(p.register_post_accumulate_grad_hook(self._hook_grad) for p in grads)

    def _relabel(self, t, cat, label, node, only_from=None) -> None:
        led = self.ledger
        for rt in real_tensors(t):
            s = rt.untyped_storage()
            rec = led.live.get(id(s))
            if rec is None:
                led.found(s, rt, cat, label=label, node=node)
            elif only_from is None or rec.cat in only_from:
                rec.cat, rec.label = cat, label
                if node is not None:
                    rec.node = node

    def _label_grad(self, p) -> None:
        owner, name = self._owner.get(p, (None, ""))
        self._relabel(p.grad, GRAD, f"{name}.grad", owner)

    def _grad_accumulated(self, p) -> None:
        if self._state == _RUNNING and p.grad is not None:
            self._label_grad(p)

    def _cur(self):
        if self._fstack:
            return self._fstack[-1]
        if self._bstack:
            return self._bstack[-1]
        return None

    def _check_params(self, mod, node) -> None:
        """Label the module's own parameters as it runs: FSDP swaps in unsharded ones (grown by resize_)."""
        live = self.ledger.live
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            for t in ((p,) if type(p) is _Parameter else real_tensors(p)):  # plain ones without a generator
                rec = live.get(id(t.untyped_storage()))
                if rec is None or rec.cat != PARAM:
                    self._relabel(t, PARAM, f"{node.name}.{pname}" if node.name else pname, node)

    def _fw_pre(self, mod, args):
        if self._opt_active is not None and not self._opt_active[1]:
            self._abandon_opt_step()
        node = self._nodes.get(mod)
        if node is None:
            if self._models or self._state != _RUNNING:
                return
            node = self._add_root(mod)
        if mod._parameters:
            self._check_params(mod, node)
        led = self.ledger
        if _graph_task_id() != -1:  # recomputation inside backward (activation checkpointing)
            self._fstack.append(node)
            led.cur = node
            led.mark("R+", node)
            return
        if led.phase != FORWARD:
            self._begin_forward()
            if self._state != _RUNNING:
                return
        self._fstack.append(node)
        led.cur = node
        node.clock_in = led.op_clock
        led.mark("F+", node)

    def _fw_post(self, mod, args, *rest):
        # (kwargs, output) normally; torch calls always_call hooks with (output) only when forward raised.
        kwargs, output = rest if len(rest) == 2 else ({}, None)
        node = self._nodes.get(mod)
        if node is None or self._state != _RUNNING or not _pop(self._fstack, node):
            return
        led = self.ledger
        led.cur = self._cur()
        if _graph_task_id() != -1:
            led.mark("R-", node)
            return
        led.mark("F-", node)
        node.clock_out = led.op_clock
        inputs = None
        if node.parent is None:
            inputs = _tensors((args, kwargs))
            for t in inputs:
                self._relabel(t, INPUT, "input", None, only_from=(OTHER,))
        if output is None:
            return
        leaves = [output] if isinstance(output, torch.Tensor) else _tensors(output)
        self._note_output_bytes(node, leaves)
        if not torch.is_grad_enabled():
            return
        outs = [t for t in leaves if t.requires_grad]
        if outs:
            self._on_grads(outs, partial(self._hook_bw_pre, node), "any")
            ins = [t for t in (inputs if inputs is not None else _tensors((args, kwargs))) if t.requires_grad]
            if ins:
                self._on_grads(ins, partial(self._hook_bw_post, node), "all")

    def _on_grads(self, tensors, call, mode: str) -> None:
        """Call ``call`` when the gradient of one of ``tensors`` (mode "any") or of all of them ("all") is
        computed. One tensor's calls share one hook (:class:`_GradHooks`): one module's output is usually
        the next one's input, and a module's input its first child's."""
        if len(tensors) != 1:
            self._handles.append(_on_grads(tensors, call, mode))
            return
        t = tensors[0]
        hooks = self._grad_hooks.get(id(t))
        if hooks is None or hooks.ref() is not t or hooks.version != t._version:
            hooks = self._grad_hooks[id(t)] = _GradHooks(t)
            node = t.grad_fn
            self._handles.append(t.register_hook(hooks) if node is None else node.register_prehook(hooks))
        hooks.calls.append(call)

    def _note_output_bytes(self, node, tensors) -> None:
        """Bytes of the outputs this forward made (what a checkpoint of the module keeps)."""
        live, pid = self.ledger.live, self.ledger.phase_id
        seen, total = set(), 0
        for t in tensors:
            for rt in ((t,) if type(t) is _Tensor else real_tensors(t)):
                rec = live.get(id(rt.untyped_storage()))
                if rec is None or id(rec) in seen or rec.phase_id != pid:
                    continue
                made_by = rec.node
                while made_by is not None and made_by is not node:
                    made_by = made_by.parent
                if made_by is node:
                    seen.add(id(rec))
                    total += rec.nbytes
        node.output_ids = frozenset(seen)
        if total > node.output_bytes:
            node.output_bytes = total

    def _bw_pre(self, node, _grad):
        if self._state != _RUNNING:
            return
        led = self.ledger
        if led.recorder is None:  # a recorded backward has no FSDP-swapped parameters (see _add_params)
            mod = node.module() if node.module is not None else None
            if mod is not None and mod._parameters:
                self._check_params(mod, node)
        if led.phase != BACKWARD:
            self._enter_backward()
        self._bstack.append(node)
        led.cur = self._cur()
        led.defer_mark("B+", node)

    def _bw_post(self, node, _grads):
        if self._state != _RUNNING or not _pop(self._bstack, node):
            return
        led = self.ledger
        led.cur = self._cur()
        led.defer_mark("B-", node)

    # ------------------------------------------------------------------------------------------ phases --
    def _set_phase(self, phase, payload=None) -> None:
        led = self.ledger
        led.phase_id += 1
        led.phase = phase
        led.mark("P", payload)

    def _begin_forward(self) -> None:
        if self._after_opt:
            if self._step_limit_reached():
                self.stop()
                return
            self._end_step()
        self._grad_hooks.clear()
        self._set_phase(FORWARD)

    def _enter_backward(self, queue: bool = True) -> None:
        led = self.ledger
        led.entering_backward = True
        try:
            self._enter_backward_phase(queue)
        finally:
            led.entering_backward = False

    def _enter_backward_phase(self, queue: bool) -> None:
        led = self.ledger
        if self._after_opt:  # backward with no forward since the optimizer step (stops wait for a forward)
            self._end_step()
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
        self._set_phase(BACKWARD, fwd_id)
        if queue:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

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

    def _end_backward(self) -> None:
        if self._state != _RUNNING:
            return
        led = self.ledger
        while self._bstack:
            node = self._bstack.pop()
            led.cur = self._cur()
            led.mark("B-", node)
        led.cur = self._cur()
        led.closed_task = _graph_task_id()
        self._set_phase(OTHER_PHASE)

    def _add_optimizer(self, opt) -> None:
        if any(o is opt for o in self._known_optimizers):
            return
        self._known_optimizers.append(opt)
        self._label_state(opt)

    def _label_state(self, opt) -> None:
        for p, state in opt.state.items():
            owner, name = self._owner.get(p, (None, ""))
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    self._relabel(v, OPTIMIZER, f"{name}:{k}" if name else k, owner)

    def _tracked_optimizer(self, opt) -> bool:
        return not self._optimizers or any(o is opt for o in self._optimizers)

    def _opt_pre(self, opt, args, kwargs):
        if self._opt_active is not None:
            # A step inside a step: a subclass's step() calling super().step() (both are hooked once torch
            # has patched the base class), or an optimizer wrapping another. The outer one is the phase.
            self._opt_nested += 1
            return
        if self._state != _RUNNING or not self._tracked_optimizer(opt):
            return
        # args[0] is the optimizer itself; anything else is a closure (which runs forward and backward).
        closure = any(a is not None for a in args[1:]) or any(v is not None for v in kwargs.values())
        self._opt_active = (opt, closure)
        self._add_optimizer(opt)
        led = self.ledger
        led.cur = None
        self._set_phase(OPT_PHASE)
        if not self._optimizer_replay or closure:
            return
        sig = optpattern.signature(opt)
        pattern = optpattern.lookup(opt, self._replay_context, sig)
        if pattern is not None and _get_current_dispatch_mode() is led:
            led.replay_pattern(pattern)
            led.__exit__(None, None, None)
            self._replayed += 1
            self._skipping = opt
            self._recording = (opt, sig)
        else:
            self._recording = (opt, sig, len(led.events), led.phase_id, len(led.prelude), len(led.marks))

    def _opt_post(self, opt, args, kwargs):
        if self._opt_nested:
            self._opt_nested -= 1
            return
        if self._state != _RUNNING or not self._tracked_optimizer(opt):
            return
        self._opt_active = None
        if self._skipping is opt:
            # A replayed step that ended as recorded made no storage that outlives it: the state is the
            # tensors labelled before (or the pattern is dropped and they are labelled again).
            if not self._resume_after_skip(opt, failed=False):
                self._label_state(opt)
        else:
            if self._recording is not None and self._recording[0] is opt:
                self._record_pattern(opt)
            self._label_state(opt)
        self.ledger.cur = self._cur()
        self._set_phase(OTHER_PHASE)
        self._after_opt = True
        self._opt_in_step.append(opt)
        if self._steps_limit is not None and self._step_index + 1 >= self._steps_limit:
            # The last tracked step: stop now if this is its last optimizer step, as far as we can know.
            if self._opt_order is not None:
                done = opt is self._opt_order[-1] and self._opt_in_step.count(opt) >= self._opt_order.count(opt)
            else:
                done = len(self._known_optimizers) == 1
            if done:
                self._in_opt_post = True
                try:
                    self.stop()
                finally:
                    self._in_opt_post = False
            else:
                self._stop_at_next = True

    def _abandon_opt_step(self) -> None:
        """An optimizer step raised (its post hook never ran) and the block went on: forget that step."""
        if self._skipping is not None:
            self._resume_after_skip(self._skipping, failed=True)
        self._opt_active = None
        self._opt_nested = 0
        self._recording = None

    def _resume_after_skip(self, opt, failed: bool) -> bool:
        """Put the ledger back after a replayed optimizer step; drop the pattern if it no longer holds.
        Returns whether the step ended as recorded."""
        self._skipping = None
        led = self.ledger
        led.__enter__()
        _, sig = self._recording
        self._recording = None
        if failed or optpattern.signature(opt) != sig:
            optpattern.forget(opt)
            self._notes.add("an optimizer step replayed from its recorded pattern did not end as recorded "
                            "(it raised or changed the optimizer's state): that step's temporaries may be off")
            return False
        return True

    def _record_pattern(self, opt) -> None:
        _, sig, start, pid, n_prelude, n_marks = self._recording
        self._recording = None
        led = self.ledger
        if len(led.prelude) != n_prelude or len(led.marks) != n_marks or led.phase_id != pid:
            return
        if optpattern.signature(opt) != sig:
            return  # the step made state (the first step): not steady yet
        pattern = optpattern.extract(led.events[start:], pid, led.device_names)
        if pattern is not None:
            optpattern.store(opt, self._replay_context, sig, pattern)

    def _step_limit_reached(self) -> bool:
        return self._stop_at_next or (self._steps_limit is not None and self._step_index + 1 >= self._steps_limit)

    def _end_step(self) -> None:
        led = self.ledger
        t = self._timer()
        self._timer.sync()
        if self._opt_order is None and self._opt_in_step:
            self._opt_order = list(self._opt_in_step)
        self._opt_in_step = []
        op_stats = {}
        for node in self._nodes.values():  # this step's per-op figures; the nodes start afresh for the next
            if node.op_ms or node.op_bytes:
                op_stats[node] = (node.op_ms, node.op_bytes)
                node.op_ms, node.op_bytes = {}, {}
        self._backlog.append((self._step_index, led.prelude, led.events, led.marks, self._step_t0, t, op_stats))
        self._backlog_events += len(led.events)
        if self._estimated or self._backlog_events > _BACKLOG_EVENTS:
            self._replay_backlog()
        led.prelude, led.events, led.marks = [], [], []
        self._step_index += 1
        self._step_t0 = t
        self._after_opt = False

    def _new_device(self, name: str) -> None:
        """A CUDA storage seen while CUDA was not initialised at start (a script that initialises it inside
        the block, as under ``memprof run``): read the caching allocator's peaks, and measure CUDA ops'
        workspaces, from now on. Module times stay host wall-clock times."""
        if (not name.startswith("cuda") or self._cuda_folder is not None or self._clock is not None
                or self._estimated or not cuda_available()):
            return
        self._cuda_folder = CudaPeakFolder()
        for i in range(torch.cuda.device_count()):
            self._cuda_folder.start(i)
        if isinstance(self.ledger.calibrator, ScratchCalibrator):
            self.ledger.calibrator.use_cuda(self._cuda_folder)
        self._notes.add("CUDA was initialised inside the tracked block: the allocator's peaks count from its "
                        "first tensor, and module times are host wall-clock times, not CUDA events")

    def _replay_backlog(self) -> None:
        """Replay the finished steps kept so far. Steps are kept rather than replayed as each ends, so that a
        step's end costs no replay and, on a GPU, no wait for the device (its module times are CUDA events);
        the estimator replays each step at once (its offload emulation moves records between devices)."""
        if not self._backlog:
            return
        self._timer.sync()
        self._host_apart()
        backlog, self._backlog, self._backlog_events = self._backlog, [], 0
        for index, prelude, events, marks, *rest in backlog:
            self.replay.replay_step(index, prelude, *expand_pattern_runs(events, marks), *rest)

    def _host_apart(self) -> None:
        """With an accelerator in use, its memory is what runs out: host storages (a CPU batch, step counters,
        offloaded state) are counted on their device in ``devices`` but not in the totals and peaks."""
        names = self.ledger.device_names
        if any(n.startswith("cuda") for n in names):
            self.replay.apart = frozenset(i for i, n in enumerate(names) if not n.startswith("cuda"))
            self._notes.add("totals and peaks are the CUDA device's; host memory is given per device only "
                            "(devices)")

    def _over_limit(self, func) -> None:
        led = self.ledger
        led.limit_bytes = None  # raise once: unwinding the step runs more ops while memory is still over
        cur = led.cur.name if led.cur is not None else ""
        where = f"module {cur!r}" if cur else "outside any module"
        self._limit_exc = DeviceMemoryExceeded(
            f"tracked memory would reach {format_bytes(led.limited_total())}, over the device memory of "
            f"{format_bytes(self._device_memory)}, at {func} in {where}, {PHASES[led.phase]} phase of step "
            f"{self._step_index}"
        )
        raise self._limit_exc

    # ------------------------------------------------------------------------------------------ result --
    def _finish(self) -> None:
        led = self.ledger
        t = self._timer()
        self._timer.sync()
        has_work = led.events or led.prelude or led.marks or not (self.replay.steps or self._backlog)
        if has_work:
            self._host_apart()
        last = (led.prelude, led.events, led.marks) if has_work else None
        led.prelude, led.events, led.marks = [], [], []
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._dist_env = dict(world_size=torch.distributed.get_world_size(),
                              rank=torch.distributed.get_rank()) if dist else {}
        self._pending = (last, self._step_index, self._step_t0, t)
        self._cuda_facts = self._read_cuda_facts()
        if self._on_stop is not None or self._limit_exc is not None:
            self._build_pending()

    def _read_cuda_facts(self) -> dict:
        """What a profile built later must take as of now: each CUDA device's name and capacity, NVML's view,
        and the caching allocator's peaks over the tracked block."""
        facts = {}
        if not cuda_available():
            return facts
        for name in self.ledger.devices:
            if name.startswith("cuda"):
                index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
                f = cuda_device_facts(index)
                if self._cuda_folder is not None and not self._estimated:
                    f["allocator"] = self._cuda_folder.summary(index)
                facts[name] = f
        return facts

    def _build_pending(self) -> None:
        """Replay the last step's log and build the profile (once; an error is kept for ``profile``)."""
        pending, self._pending = self._pending, None
        last, index, t_start, t_end = pending
        try:
            self._replay_backlog()
            if last is not None:
                prelude, events, marks = last
                self.replay.replay_step(index, prelude, *expand_pattern_runs(events, marks), t_start, t_end)
            self.replay.close_all(t_end)
            self._profile = self._build_profile()
        except Exception as e:
            self._error = e

    def _build_profile(self):
        return build_profile(
            self.replay, self.ledger.devices, self._cuda_facts, created=self._created, dist_env=self._dist_env,
            environment=self._environment, notes=self._notes, replayed_steps=self._replayed,
            device_memory=self._device_memory, estimated=self._estimated, assumptions=self._assumptions,
            max_samples=self._max_samples)


def _pop(stack: list, node) -> bool:
    """Remove the most recent ``node`` from a module stack (not always the top in backward)."""
    for j in range(len(stack) - 1, -1, -1):
        if stack[j] is node:
            del stack[j]
            return True
    return False


def _tensors(tree) -> list:
    """The tensors in a module's arguments or outputs (fast for the usual tuple of tensors)."""
    if type(tree) is tuple and len(tree) == 2 and type(tree[0]) is tuple and not tree[1]:
        if all(isinstance(a, torch.Tensor) for a in tree[0]):
            return list(tree[0])
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _members(modules, attr: str):
    """``(fqn, tensor)`` for the parameters (``attr="_parameters"``) or buffers of ``modules``, a module's
    ``named_modules()``, each tensor once: what ``named_parameters()``/``named_buffers()`` give, without
    walking the tree again."""
    seen = set()
    for prefix, m in modules:
        for n, t in getattr(m, attr).items():
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield (f"{prefix}.{n}" if prefix else n), t


def _on_grads(tensors, fn, mode: str):
    """Call ``fn`` when the gradient of one tensor (mode "any") or of all of them ("all") is computed.

    One tensor: a pre-hook on the node that made it (``fn(grad_outputs)``), or a tensor hook on a leaf; the
    engine runs both just before that node runs, once its gradients are all in. The node's pre-hook is the
    cheaper of the two to add (a tensor hook gives the tensor a hook dictionary and a Python handle), and
    much cheaper than ``register_multi_grad_hook``. Several with "all": :func:`_on_all_grads`, which
    counts instead of keeping the gradients."""
    if len(tensors) == 1:
        t = tensors[0]
        node = t.grad_fn
        return t.register_hook(fn) if node is None else node.register_prehook(fn)
    if mode == "all":
        return _on_all_grads(tensors, fn)
    return register_multi_grad_hook(tensors, fn, mode=mode)


class _GradHooks:
    """The tracker's calls for one tensor's gradient, run in the order they were added by one hook: on the
    node that made the tensor (a pre-hook), or on the tensor if it is a leaf. The engine calls Python once
    for it instead of once per module boundary at that tensor."""

    __slots__ = ("calls", "ref", "version")

    def __init__(self, t) -> None:
        self.calls: list = []
        self.ref = weakref.ref(t)  # the tensor it is for; a later tensor with the same id gets its own
        self.version = t._version  # an in-place op since gives the tensor another node

    def __call__(self, _grad):
        for call in self.calls:
            call(_grad)


class _Handles:
    """Removes several hook handles at once."""

    __slots__ = ("handles",)

    def __init__(self, handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _on_all_grads(tensors, fn):
    """``fn(None)`` once the gradients of all ``tensors`` that this backward computes have been computed.

    ``register_multi_grad_hook(mode="all")`` gives the same signal but keeps every gradient alive until the
    last one arrives, which would put memory into the tracked step that the untracked step frees earlier.
    This only counts, per backward run, against the number of the tensors' nodes the engine will execute.
    """
    from torch.autograd.graph import _get_grad_fn_or_grad_acc

    nodes = [_get_grad_fn_or_grad_acc(t) for t in tensors]
    pending: dict[int, int] = {}  # graph task id -> gradients still to come
    lock = threading.Lock()

    def hook(_grad):
        task = _graph_task_id()
        with lock:
            left = pending.get(task)
            if left is None:
                left = sum(map(torch._C._will_engine_execute_node, nodes))
            left -= 1
            if left > 0:
                pending[task] = left
                return
            pending.pop(task, None)
        fn(None)

    return _Handles([t.register_hook(hook) for t in tensors])


def _remove_hook(handle, iterating: bool) -> None:
    """Remove a hook, also from inside ``Optimizer.step``'s loop over its post-hooks (``iterating``).

    That loop iterates the global post-hook ``OrderedDict``; deleting from it mid-iteration raises, except
    for the entry the iterator has just returned when it is the last one (the iterator has then already
    finished). Our post-hook is normally last; when a later one was added inside the tracked block, ours is
    made inert and removed at the next optimizer step by :func:`_sweep_later`.
    """
    hooks = handle.hooks_dict_ref()
    if hooks is None or handle.id not in hooks:
        return
    if not iterating or next(reversed(hooks)) == handle.id:
        handle.remove()
        return
    hooks[handle.id] = _inert
    _sweep_later(handle, into_pre=True)


def _inert(*_args, **_kwargs) -> None:
    """What a hook that could not be removed yet is replaced by."""


def _sweep_later(handle, into_pre: bool) -> None:
    """Remove ``handle`` (an inert entry of the global optimizer hook dict being iterated now) from a one-shot
    hook in the other global dict (pre-hooks with ``into_pre``), which runs at the next optimizer step while
    ``handle``'s dict is not iterated. The sweeper removes itself the same way: at once when it is the last
    entry of its dict, else from the other dict at its next run."""
    register = register_optimizer_step_pre_hook if into_pre else register_optimizer_step_post_hook
    own: list = []

    def sweep(*_args, **_kwargs):
        handle.remove()
        mine = own[0]
        d = mine.hooks_dict_ref()
        if d is None or mine.id not in d:
            return
        if next(reversed(d)) == mine.id:
            mine.remove()
        else:
            d[mine.id] = _inert
            _sweep_later(mine, into_pre=not into_pre)

    own.append(register(sweep))


def track(model=None, optimizer=None, **kwargs) -> Tracker:
    """Track the memory of the training steps run inside a ``with`` block::

        with memprof.track() as tracker:
            train_step()
        prof = tracker.profile
    """
    return Tracker(model, optimizer, **kwargs)
