"""CPU offload in the estimator: what FSDP2's ``CPUOffloadPolicy`` keeps on the host, counted apart from the device.

With offload, a real run keeps each rank's shards of the parameters, its sharded gradients and the optimizer's
state on the host, and runs the optimizer step there. The estimator runs the real ``CPUOffloadPolicy`` on fake
tensors and counts these host storages on device ``"cpu"``, apart from the accelerator's total (the profile's
peak and levels stay the device's, which is what a budget is about):

* before each optimizer step: the parameters' local shards, their gradients and the existing optimizer state
  are set aside (:meth:`memprof.tracking.ledger.Ledger.set_aside`) — for the whole step, so host gradients
  made in backward never count on the device;
* after it: everything the step made (new state, its temporaries) is set aside too: the step ran on the CPU.
  The modelled device clock does not advance meanwhile (the planner prices the CPU step from host memory
  bandwidth, :func:`memprof.policy.costs.cpu_optimizer_ms`).

Host bytes per rank: ``resident_bytes`` (shards, gradients and state when the optimizer step starts) and
``peak_bytes`` (the highest point inside the step, with its temporaries).

On a PyTorch build with CUDA the fake run uses fake ``cuda`` tensors and FSDP itself makes the transfers:
the host-to-device copy of each shard before its all-gather and the reduce-scatter output that lives on the
device until its device-to-host copy are real device storages. Without CUDA the accelerator is *emulated*
on CPU tensors, where FSDP's copies between "host" and "device" are no-ops; :class:`HostSide` makes them
real copies so that the device sees the same transients:

* ``FSDPParam.all_gather_inputs`` is patched (for the estimate only) to clone the host shard, as the
  ``.to(device)`` copy of a real run does, before the cast to the compute dtype;
* a gradient hook replaces each new sharded gradient (a view of the reduce-scatter output) by a copy, as the
  ``.to("cpu")`` copy of a real run does; the reduce-scatter output is then freed as in a real run.

Known limits: pinned host memory is not rounded up as the CUDA host allocator rounds it (powers of two); host
memory outside the optimizer step is not given as a timeline (its highest point is at the optimizer step);
the emulation's host temporaries are rounded like CUDA's (at most 511 bytes each); a user ``step`` that
clips or unscales gradients outside ``optimizer.step()`` runs those ops on the device in the emulation; a step
that never calls ``optimizer.step()`` leaves its host gradients counted on the device.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from ..tracking.ledger import real_tensors

__all__ = ["HostSide", "emulated_host_copies"]


@contextlib.contextmanager
def emulated_host_copies():
    """Make FSDP2's host-to-device copy of an offloaded shard a real copy on the emulated device."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import _to_dtype_if_needed
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ShardedState

    original = FSDPParam.__dict__["all_gather_inputs"]

    def all_gather_inputs(self):
        # The offload branch of FSDPParam.all_gather_inputs, with ``.to(self.device)`` (a no-op when the
        # emulated device is the CPU) made a copy.
        if (self.offload_to_cpu and self.sharded_state == ShardedState.SHARDED
                and not hasattr(self._sharded_local_tensor, "fsdp_pre_all_gather")):
            return [_to_dtype_if_needed(self._sharded_param_data.clone(), self.param_dtype)]
        return original.fget(self)

    FSDPParam.all_gather_inputs = property(all_gather_inputs)
    try:
        yield
    finally:
        FSDPParam.all_gather_inputs = original


def _storages(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for rt in real_tensors(t):
                yield rt.untyped_storage()


class HostSide:
    """Sets the offloaded storages aside from the device's count and sums them up as the host's.

    ``install()`` before the tracker starts (its gradient hooks must run before the tracker's), ``bind()``
    once it runs, ``remove()`` at the end.
    """

    def __init__(self, model: torch.nn.Module, optimizer, op_model, emulated: bool) -> None:
        self.model = model
        self.optimizer = optimizer
        self.op_model = op_model
        self.emulated = emulated
        self.resident_bytes = 0  # host bytes when the optimizer step starts (max over steps)
        self.resident_by_category = {"param": 0, "grad": 0, "optimizer": 0}
        self.peak_bytes = 0  # host bytes at their highest, inside the optimizer step
        self._ledger = None
        self._aside: dict[int, object] = {}  # id(record) -> record, for records set aside and still alive
        self._copies: dict[int, weakref.ref] = {}  # id(storage) -> storage, for gradients copied to the host
        self._handles: list = []
        self._window = None  # (events index, ids of live records, device clock) while the step runs

    def install(self) -> None:
        if self.emulated:
            for p in self.model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_to_host))
        self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))

    def bind(self, tracker) -> None:
        self._ledger = tracker.ledger

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._ledger = None
        self._aside.clear()
        self._copies.clear()

    # -- hooks ---------------------------------------------------------------------------------------------
    def _grad_to_host(self, p) -> None:
        """Emulation: the new sharded gradient, a view of the reduce-scatter output, becomes a copy of its own
        (the device-to-host copy of a real run); a gradient already copied (accumulation) stays."""
        g = p.grad
        if g is None:
            return
        s = next(_storages([g]))
        ref = self._copies.get(id(s))
        if ref is not None and ref() is s:
            return
        with torch.no_grad():
            copy = g.clone()
        p.grad = copy
        s = next(_storages([copy]))
        self._copies[id(s)] = weakref.ref(s)

    def _before_step(self, opt, args, kwargs) -> None:
        # Runs after the tracker's (global) pre-hook and before the step's ops: the window of events from here
        # to _after_step is the step's. (Estimates never replay optimizer steps from a recorded pattern, which
        # would append the step's events before this hook.)
        led = self._ledger
        if led is None:
            return
        self._aside = {k: r for k, r in self._aside.items() if r.ref is not None}
        self._copies = {k: r for k, r in self._copies.items() if r() is not None}
        params = [p for g in opt.param_groups for p in g["params"]]
        groups = {
            "param": _storages(params),
            "grad": _storages(p.grad for p in params),
            "optimizer": _storages(v for st in opt.state.values() for v in st.values()),
        }
        seen: set[int] = set()
        by_cat = dict.fromkeys(groups, 0)
        new = []
        for cat, storages in groups.items():
            for s in storages:
                rec = led.live.get(id(s))
                if rec is None or id(s) in seen:
                    continue
                seen.add(id(s))
                if id(rec) not in self._aside:
                    new.append(rec)
                    self._aside[id(rec)] = rec
                by_cat[cat] += s.nbytes()
        led.set_aside(new)
        resident = sum(by_cat.values())
        if resident >= self.resident_bytes:
            self.resident_bytes, self.resident_by_category = resident, by_cat
        self.peak_bytes = max(self.peak_bytes, resident)
        self._window = (len(led.events), {id(r) for r in led.live.values()}, self.op_model.clock, resident)
        self.op_model.clock = type(self.op_model.clock)()  # the device waits: the host's time is priced apart

    def _after_step(self, opt, args, kwargs) -> None:
        led = self._ledger
        if led is None or self._window is None:
            return
        start, before, clock, resident = self._window
        self._window = None
        self.op_model.clock = clock
        born = {}
        for rec, d in led.events[start:]:
            if d and id(rec) not in before and id(rec) not in born:
                born[id(rec)] = rec
        run = top = 0
        for _, d in led.set_aside(born.values()):
            run += d
            top = max(top, run)
        for rec in born.values():
            if rec.ref is not None:
                self._aside[id(rec)] = rec
        self.peak_bytes = max(self.peak_bytes, resident + top)
