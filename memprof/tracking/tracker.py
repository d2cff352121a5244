"""The Tracker: one tracking code path for ``memprof.track``, ``@memprof.profile`` and ``memprof run``.

It combines the storage ledger (:mod:`.ledger`, a dispatch mode) with parts that tell it *where* each op
runs, and wires them; each part's module says what it does and its limits:

* :mod:`.hierarchy`: the models met in the block as module trees, each parameter's owner, storage labels
  (parameters, buffers, gradients, optimizer state);
* :mod:`.boundaries`: global module forward pre/post hooks and gradient hooks on each module's outputs and
  inputs keep the forward and backward module stacks;
* :mod:`.phases`: the forward/backward/optimizer/other phases and the steps, and the finished steps' logs
  kept for replay; backward is detected per op from the autograd engine, so a loss computed outside any
  module is attributed correctly;
* :mod:`.optimizer_steps`: global optimizer step hooks delimit the optimizer phase and steps; steady steps
  are replayed from a recorded allocation pattern;
* :mod:`.recorded_backward`: on the host, backward runs with the ledger's mode popped and the C++
  allocation recorder on (no Python per backward op);
* :mod:`.device_watch` and :mod:`.clock`: the CUDA allocator's counters, the rehearsed device limit, the
  facts read at stop, and the clock of every mark;
* :mod:`.patches`: the global hooks, the ``UntypedStorage.resize_`` and autograd-engine patches and the
  mode, installed and undone as one unit;
* :mod:`.profile_builder`: the profile, built from the replayed records on its first read.

Leave no trace: every hook handle, the dispatch mode, the patches (each put back exactly as found) and every
storage weakref are removed when tracking stops, also when the tracked block raises (including out of
memory) or is interrupted: a signal that arrives while memprof's own code runs is raised at the next op or
hook, at the latest once all of that is undone (:mod:`.interrupts`). One tracker runs at a time in a
process: starting (or resuming) a second while one runs raises :class:`~memprof.errors.TrackingError` (a
paused tracker lets another run). Known limits: modules run by ``torch.compile`` run eagerly under the
dispatch mode (noted in the profile; dynamo is told never to compile the ledger's frames); non-``nn.Module``
models get no per-module rows; with ``model=None`` only modules that run forward inside the block are found.
"""

from __future__ import annotations

import datetime

import torch

from ..errors import TrackingError
from . import interrupts, native
from .boundaries import Boundaries
from .clock import Timer
from .device_watch import DeviceWatch, cuda_in_use, start_peak_counters
from .exitguard import guard_distributed_exit
from .hierarchy import ModuleTree
from .ledger import Ledger
from .optimizer_steps import OptimizerSteps
from .patches import GlobalPatches
from .phases import Phases, StepBacklog
from .profile_builder import build_profile
from .recorded_backward import RecordedBackward
from .replay import Replay
from .scratch import ScratchCalibrator

__all__ = ["Tracker", "track"]

_IDLE, _RUNNING, _PAUSED, _STOPPED = range(4)
_installed: list = []  # the tracker whose hooks, patches and mode are installed now (trackers do not nest)


def _refuse_nesting(tracker, doing: str) -> None:
    if _installed and _installed[0] is not tracker:
        raise TrackingError(
            f"cannot {doing} this tracker: another memprof tracker is running in this process, and trackers do "
            "not nest (both would patch the same global hooks). Stop the other one first, or track both "
            "parts of the code with one tracker")


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
        self._parts: tuple = ()  # the parts whose hooks check ``running`` (set in start)
        self._profile = None
        self._pending = None  # what stop() kept for building the profile on first read
        self._cuda_facts: dict = {}  # CUDA device name -> facts read at stop (see DeviceWatch.read_cuda_facts)
        self._dist_env: dict = {}  # world size and rank when tracking stopped under torch.distributed
        self._error: BaseException | None = None
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
        cuda = cuda_in_use(self._clock)
        timer = self._timer = Timer(cuda, self._clock)
        cuda_folder = start_peak_counters() if cuda else None
        if self._calibrate is True:
            calibrator = ScratchCalibrator(cuda_folder)
        else:
            calibrator = self._calibrate or None
        led = self.ledger = Ledger(calibrator=calibrator, limit_bytes=self._device_memory, timer=timer,
                                   device_as=self._device_as)
        timer.ledger = led
        notes = self._notes = set()
        handles = self._handles = []  # per-run hook handles (grad-accumulate, gradient boundaries)
        t0 = timer()
        self.replay = Replay(t0, timer.bind(t0), self._top_k)
        self._backlog = StepBacklog(self.replay, timer, led, notes, each=self._estimated)
        phases = self._phases = Phases(led, timer, self._backlog, steps_limit=self._steps_limit, t0=t0)
        devices = self._devices = DeviceWatch(led, notes, phases, cuda_folder=cuda_folder,
                                              device_memory=self._device_memory, clock=self._clock,
                                              estimated=self._estimated)
        # Backward on the allocation recorder (see RecordedBackward): the host's allocator only, and only where
        # the ledger would measure op scratch anyway (the recorder sees it) and rehearses no device limit.
        on_recorder = (self._calibrate is True and self._device_memory is None and not self._estimated
                       and not self._device_as and not led.accel and native.available())
        backward = self._backward = RecordedBackward(led, notes, on_recorder)
        tree = self._tree = ModuleTree(led, notes, handles, backward)
        bounds = self._bounds = Boundaries(led, tree, handles, self._models)
        steps = self._steps = OptimizerSteps(led, notes, self._optimizers, replay=self._optimizer_replay,
                                             context=self._replay_context)
        phases.connect(bounds, tree.nodes, self.stop)
        bounds.connect(phases, steps)
        steps.connect(bounds, tree, phases, self.stop)
        backward.connect(tree, phases, steps)
        led.on_limit, led.on_backward, led.on_new_device = devices.over_limit, phases.enter_backward, devices.new_device
        self._parts = (tree, bounds, phases, steps, backward)
        self._patches = GlobalPatches(led, bounds, steps, backward)
        self._created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        guard_distributed_exit()
        self._guarded = interrupts.acquire()
        try:
            self._install()
            for m in self._models:
                tree.add_root(m)
            for opt in self._optimizers:
                steps.add(opt)
        except BaseException:
            self.stop()
            raise
        return self

    def pause(self) -> None:
        """Stop observing ops and hooks (frees are still seen) until :meth:`resume`."""
        if self._state == _RUNNING:
            self._uninstall()
            self._set_state(_PAUSED)

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

    def _set_state(self, state: int) -> None:
        """Set the state, and tell the parts whose hooks run only while tracking runs (read per hook)."""
        self._state = state
        running = state == _RUNNING
        for part in self._parts:
            part.running = running

    def _release_guard(self) -> None:
        if self._guarded:
            self._guarded = False
            interrupts.release()

    def _stop(self) -> None:
        try:
            if self._state == _RUNNING:
                self._uninstall()
        finally:
            self._set_state(_STOPPED)
            try:
                self._finish()
            except Exception as e:  # never leave weakrefs or handles behind because of a bug here
                self._error = e
            finally:
                for h in self._handles:
                    h.remove()
                self._handles.clear()
                self.ledger.detach_all()
                self._tree.clear()
                self._bounds.grad_hooks.clear()
                self._steps.known.clear()
                # a finished tracker keeps none of the user's objects (the parts share these lists)
                self._models.clear()
                self._optimizers.clear()
                self._break_cycles()
        limit_exc = self._devices.limit_exc
        if limit_exc is not None:
            limit_exc.profile = self._profile
        if self._on_stop is not None and self._profile is not None:
            self._on_stop(self)

    def _break_cycles(self) -> None:
        """Drop the references that tie the finished tracker into cycles (its parts call each other, their
        hooks are their bound methods, the ledger calls back into them and its timer), so that it and the
        records of the run are freed as soon as the caller lets go of it, not at the next full garbage
        collection (thousands of objects a step, which would make that collection, whenever it comes, the
        tracker's cost)."""
        for part in (*self._parts, self._devices):
            part.disconnect()
        led = self.ledger
        led.on_limit = led.on_backward = led.on_new_device = None
        led.timer = None
        self._timer.ledger = None

    def _install(self) -> None:
        _refuse_nesting(self, "start")
        _installed.append(self)
        self._patches.install()
        self._set_state(_RUNNING)

    def _uninstall(self) -> None:
        if _installed and _installed[-1] is self:
            _installed.pop()
        self._patches.uninstall(in_opt_post=self._steps.in_post)

    # ------------------------------------------------------------------------------------------ result --
    def _finish(self) -> None:
        led = self.ledger
        t = self._timer()
        self._timer.sync()
        has_work = led.events or led.prelude or led.marks or not (self.replay.steps or self._backlog.steps)
        if has_work:
            self._backlog.host_apart()
        last = (led.prelude, led.events, led.marks) if has_work else None
        led.prelude, led.events, led.marks = [], [], []
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._dist_env = dict(world_size=torch.distributed.get_world_size(),
                              rank=torch.distributed.get_rank()) if dist else {}
        self._pending = (last, self._phases.step_index, self._phases.step_t0, t)
        self._cuda_facts = self._devices.read_cuda_facts()
        if self._on_stop is not None or self._devices.limit_exc is not None:
            self._build_pending()

    def _build_pending(self) -> None:
        """Replay the last step's log and build the profile (once; an error is kept for ``profile``)."""
        pending, self._pending = self._pending, None
        last, index, t_start, t_end = pending
        try:
            self._backlog.finish(last, index, t_start, t_end)
            self._profile = self._build_profile()
        except Exception as e:
            self._error = e

    def _build_profile(self):
        return build_profile(
            self.replay, self.ledger.devices, self._cuda_facts, created=self._created, dist_env=self._dist_env,
            environment=self._environment, notes=self._notes, replayed_steps=self._steps.replayed,
            device_memory=self._device_memory, estimated=self._estimated, assumptions=self._assumptions,
            max_samples=self._max_samples)


def track(model=None, optimizer=None, **kwargs) -> Tracker:
    """Track the memory of the training steps run inside a ``with`` block::

        with memprof.track() as tracker:
            train_step()
        prof = tracker.profile
    """
    return Tracker(model, optimizer, **kwargs)
