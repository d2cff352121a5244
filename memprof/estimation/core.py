"""Estimation: the tracker run on fake tensors, so nothing real is allocated.

``estimate(build_model, make_batch, ...)`` builds the model and the batch under ``FakeTensorMode``, applies
the precision, optimizer and sharding asked for, and runs ``steps`` training steps under the same
:class:`~memprof.tracking.Tracker` that measures real runs. The result is a :class:`~memprof.Profile` with
``estimated=True`` and its assumptions spelled out. There is one measurement path, not a second set of
formulas.

What makes the estimate match a real run:

* Op-internal scratch memory (invisible to dispatch) is measured on the real CPU kernels: each op
  signature met under fake tensors is run once on real tensors of the same shapes (when its inputs total at
  most ``scratch_limit_bytes``), sharing the tracker's per-signature cache; only where its memory cannot
  depend on the made-up values (:mod:`memprof.estimation.scratch_safety`, which also sizes the CPU LSTM's
  workspace from the real kernel).
* Hugging Face ``transformers`` takes other code paths when it sees fake tensors (``is_tracing()``: an
  explicit causal mask is built where a real run drops an all-ones padding mask, +1.7% on a small Llama);
  the estimator makes it see a real run (:mod:`.hf_paths`). The data-dependent reads a real run then makes
  (``torch.all(mask == 1)``) are answered from *shadows*: small tensors (at most 64 Ki elements) get real
  storage beside their fake one, computed by running each op whose inputs all have shadows for real.
* World size and sharding use FSDP2 on a fake process group (``torch.testing._internal.distributed.fake_pg``)
  in this one process: per-rank memory including all-gather and reduce-scatter buffers.
* CPU offload (``offload=True``) is FSDP2's ``CPUOffloadPolicy`` on those fake tensors; the host's storages
  (sharded parameters, gradients, optimizer state, the optimizer step) are counted on device ``"cpu"``, apart
  from the accelerator's (see :mod:`memprof.estimation.offload`, which also says what the emulation of
  host-device copies on a build without CUDA covers).
* CUDA allocations are rounded as the caching allocator rounds them (512 B).

Time is modelled, not measured: every op advances a clock by a roofline estimate (FLOPs from
``torch.utils.flop_counter`` over the device's peak throughput, bytes moved over its bandwidth), so module
and step times in an estimated profile are predictions.

Known limits: on a PyTorch build without CUDA, CUDA is emulated on the CPU kernels (attention and autocast
follow the CPU kernels' choices; allocator rounding is applied); with CPU offload the optimizer step's
time is not in the modelled step time (the planner prices it from host memory bandwidth); reserved memory and
fragmentation of the caching allocator are not estimated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..hardware import DeviceSpec, device_spec, host_spec, resolve_capacity
from ..profiles import sharding_words
from ..rng import preserved_rng
from ..sharding import build_mesh, check_offload, check_strategy, shard_model
from ..structure import select_units
from ..tracking.scratch import CACHE, SKIP_NAMESPACES, signature
from ..tracking.tracker import Tracker
from ..training import (
    autocast,
    cast_floating,
    check_optimizer,
    check_precision,
    default_step,
    make_optimizer,
    make_scaler,
)
from .activation_offload import HostActivations
from .calls import EstimateError, call_fake, current_fake_mode, fake_process_group
from .factories import factory_notes, unwrap_compiled, user_code
from .fake_dtypes import OutputDtypes
from .hf_paths import RealCodePaths
from .offload import HostSide, emulated_host_copies
from .replay import PRIM_DEVICE, OpReplay
from .scratch_safety import RNN_FORWARD, MadeUpInputs
from .scratch_safety import fake_tensors as _fake_tensors

__all__ = ["estimate", "EstimateError"]


_MATMUL_EFFICIENCY = 0.6  # share of peak FLOP/s that large matmuls reach in practice
_BANDWIDTH_EFFICIENCY = 0.7  # share of peak bandwidth that memory-bound kernels reach


class _VirtualClock:
    """Seconds of modelled device time; the tracker reads it for every mark."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


_aten = torch.ops.aten
_DATA_DEPENDENT = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default}
_SHADOW_NUMEL = 1 << 16
_ASSUME_FINITE = {_aten._amp_foreach_non_finite_check_and_unscale_.default}


class _FakeOpModel:
    """The estimator's per-op hook: runs the fake op, prices its time, finds its real scratch memory, and
    keeps real shadows of small tensors so that data-dependent reads can be answered."""

    all_ops = True  # the ledger calls this hook for views too (shadows must follow views)

    def __init__(self, spec: DeviceSpec, clock: _VirtualClock, scratch: bool, scratch_limit_bytes: int,
                 device: str = "cpu"):
        from torch.utils.flop_counter import flop_registry

        self._shadows: dict[int, tuple] = {}  # id(fake storage) -> (weakref to it, real UntypedStorage)
        self.spec = spec
        self.clock = clock
        self.scratch = scratch
        self.limit = scratch_limit_bytes
        self.flops = flop_registry
        self._priced: dict = {}  # op signature -> modelled seconds
        self.measured = 0
        self.skipped_large = 0
        self.safety = MadeUpInputs(scratch_limit_bytes)  # which real kernels may run on made-up inputs
        self._cpu = torch.device("cpu")
        self.device = torch.device(device)  # where the step's tensors are (fake)
        self.dtypes = OutputDtypes()  # outputs whose real CPU kernel has another dtype than the fake one
        self.replay = OpReplay()

    def call(self, func, args, kwargs):
        if func is PRIM_DEVICE:  # C++ asking a fake tensor its device: answered as FakeTensorMode answers it
            t = args[0]
            out = t.fake_device if type(t) is FakeTensor and not t.fake_mode.in_kernel_invocation else func(*args)
            self.clock.now += self._seconds(func, args, kwargs, out)
            return out, 0, None
        real = self._real_args(args, kwargs)
        if func in _DATA_DEPENDENT:
            if real is None:  # the fake mode answers for constants; otherwise it raises (reported by estimate)
                return func(*args, **kwargs), 0, None
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return func(*real[0], **real[1]), 0, None
        rkey = self.replay.key(func, args, kwargs)
        out = func(*args, **kwargs) if rkey is None else self.replay.run(func, args, kwargs, rkey)
        if func is RNN_FORWARD:  # its fake kernel leaves the workspace kept for backward empty
            out = self.safety.rnn_workspace(signature(func, args, kwargs), args, kwargs, out, self._shadow_of)
        if real is None or not self._shadow_outputs(func, real, out):
            if func._schema.is_mutable:
                self._drop_written(func, args, kwargs)
        if func in _ASSUME_FINITE:
            self._assume_finite(args)
        self.clock.now += self._seconds(func, args, kwargs, out)
        if not self.scratch or func.namespace in SKIP_NAMESPACES:
            return out, 0, None
        try:
            key = signature(func, args, kwargs)
            hit = CACHE.get(key)
        except TypeError:
            return out, 0, None
        if hit is not None:
            return self.dtypes.fix(key, out), hit[0], hit[1]
        excess = self._measure(func, args, kwargs, key, out)
        if excess is None:
            return out, 0, None
        CACHE[key] = (excess, self._cpu)
        return self.dtypes.fix(key, out), excess, self._cpu

    # -- shadows ---------------------------------------------------------------------------------------
    def fake_batch(self, batch):
        """Real tensors in ``batch`` become fake tensors; small ones keep their data as shadows."""
        import weakref

        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._pytree import tree_map


        mode = current_fake_mode()

        def conv(x):
            if not isinstance(x, torch.Tensor):
                return x
            if not isinstance(x, FakeTensor):
                real, x = x, mode.from_tensor(x)
                if real.numel() <= _SHADOW_NUMEL:
                    s = x.untyped_storage()
                    self._shadows[id(s)] = (weakref.ref(s), real.untyped_storage())
            if x.device.type != self.device.type:
                # a host batch for a CUDA estimate: the step gets it on the device, as a real loop moves it
                # there (the copy is an op of the tracked block; the host tensor is freed right after)
                x = x.to(self.device)
            return x

        return tree_map(conv, batch)

    def _real_of(self, t):
        s = t.untyped_storage()
        entry = self._shadows.get(id(s))
        if entry is None or entry[0]() is not s:
            return None
        return torch.empty(0, dtype=t.dtype, device=entry[1].device).set_(entry[1], t.storage_offset(), t.shape,
                                                                          t.stride())

    def _real_args(self, args, kwargs):
        """Real counterparts of all tensor arguments, or None when one has no shadow."""
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        shadows = self._shadows
        for a in (args, kwargs.values()) if kwargs else (args,):  # most ops have an unshadowed input: say so fast
            for x in a:
                if type(x) is FakeTensor or isinstance(x, FakeTensor):
                    s = x.untyped_storage()
                    entry = shadows.get(id(s))
                    if entry is None or entry[0]() is not s:
                        return None
        missing = False

        def conv(x):
            nonlocal missing
            if isinstance(x, FakeTensor):
                r = self._real_of(x)
                if r is None:
                    missing = True
                return r
            if isinstance(x, torch.Tensor):
                return x  # a real constant being lifted into the fake mode (torch.tensor(...))
            if isinstance(x, (list, tuple)):
                return type(x)(conv(y) for y in x)
            return x

        with unset_fake_temporarily():
            r_args = tuple(conv(a) for a in args)
            r_kwargs = {k: conv(v) for k, v in kwargs.items()}
        return None if missing else (r_args, r_kwargs)

    def _shadow_outputs(self, func, real, out) -> bool:
        """Run ``func`` on the shadows too (its inputs all have one); False when it cannot."""
        import weakref

        from torch._subclasses.fake_tensor import unset_fake_temporarily

        fakes = list(_fake_tensors(out if isinstance(out, (list, tuple)) else (out,)))
        if any(t.numel() > _SHADOW_NUMEL for t in fakes) or func.namespace in SKIP_NAMESPACES:
            return False
        with unset_fake_temporarily():
            try:
                r_out = func(*real[0], **real[1])  # in-place ops update the shadows they write
            except Exception:
                return False
        r_list = list(r_out) if isinstance(r_out, (list, tuple)) else [r_out]
        f_list = list(out) if isinstance(out, (list, tuple)) else [out]
        for f, r in zip(f_list, r_list):
            if isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor) and f.shape == r.shape:
                s = f.untyped_storage()
                if id(s) not in self._shadows or self._shadows[id(s)][0]() is not s:
                    self._shadows[id(s)] = (weakref.ref(s), r.untyped_storage())
        return True

    def _assume_finite(self, args) -> None:
        """GradScaler's inf check on (unshadowed) gradients: answer "all finite", as a healthy run would."""
        import weakref

        from torch._subclasses.fake_tensor import unset_fake_temporarily

        found_inf = args[1]
        s = found_inf.untyped_storage()
        with unset_fake_temporarily():
            zero = torch.zeros(s.nbytes() // found_inf.element_size(), dtype=found_inf.dtype)
        self._shadows[id(s)] = (weakref.ref(s), zero.untyped_storage())

    def _drop_written(self, func, args, kwargs) -> None:
        """An in-place op ran without shadows: the written tensors' shadows are stale now."""
        for arg, value in zip(func._schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                   func._schema.arguments[len(args):]]):
            if arg.alias_info is not None and arg.alias_info.is_write:
                for t in _fake_tensors(value if isinstance(value, (list, tuple)) else (value,)):
                    self._shadows.pop(id(t.untyped_storage()), None)

    # -- time and scratch --------------------------------------------------------------------------------
    def _seconds(self, func, args, kwargs, out) -> float:
        """The op's roofline time; the same op on the same shapes (a repeated block's) is priced once."""
        try:
            key = signature(func, args, kwargs)
            hit = self._priced.get(key)
        except TypeError:
            key = hit = None
        if hit is not None:
            return hit
        seconds = self._roofline(func, args, kwargs, out)
        if key is not None:
            self._priced[key] = seconds
        return seconds

    def _roofline(self, func, args, kwargs, out) -> float:
        moved = 0
        for t in _fake_tensors((args, tuple(kwargs.values()), out)):
            moved += t.numel() * t.element_size()
        fn = self.flops.get(func.overloadpacket)
        flops = 0
        if fn is not None:
            try:
                flops = fn(*args, **kwargs, out_val=out)
            except Exception:
                flops = 0
        low = any(t.dtype in (torch.bfloat16, torch.float16) for t in _fake_tensors(args))
        peak = (self.spec.bf16_tflops if low else self.spec.fp32_tflops) * 1e12 * _MATMUL_EFFICIENCY
        return max(flops / peak, moved / (self.spec.bandwidth_gbs * 1e9 * _BANDWIDTH_EFFICIENCY))

    def _measure(self, func, args, kwargs, key=None, out=None) -> int | None:
        """Run ``func`` once on real CPU tensors shaped like the fake ones, where
        :mod:`~memprof.estimation.scratch_safety` allows it; None when it cannot or may not. The real
        outputs' dtypes are compared with the fake ``out``'s (see :mod:`.fake_dtypes`)."""
        fakes = list(_fake_tensors((args, tuple(kwargs.values()))))
        if not fakes or any(t.device.type != "cpu" or t.layout != torch.strided for t in fakes):
            return None
        if not self.safety.may_run(func, lambda: self._real_args(args, kwargs) is not None):
            return None
        if sum(t.untyped_storage().nbytes() for t in fakes) > self.limit:
            self.skipped_large += 1
            return None
        seen = (lambda r_out: self.dtypes.learn(key, out, r_out)) if key is not None else None
        excess = self.safety.measure(func, args, kwargs, self._shadow_of, seen)
        if excess is not None:
            self.measured += 1
        return excess

    def _shadow_of(self, storage):
        """The real storage shadowing a fake one, or None."""
        entry = self._shadows.get(id(storage))
        return None if entry is None or entry[0]() is not storage else entry[1]


def _cuda_built() -> bool:
    return torch.backends.cuda.is_built() and torch.cuda.is_available()


@preserved_rng()
def estimate(build_model: Callable[[], torch.nn.Module], make_batch: Callable[[], object], *, step=None,
             optimizer: str = "adamw", precision: str = "fp32", device: str = "cuda", world_size: int = 1,
             sharding: str | None = None, steps: int = 2, device_memory=None, units: list[str] | None = None,
             shard_group_size: int | None = None, scratch_limit_bytes: int = 64 * 1024**2,
             hf_real_paths: bool = True, description: str = "", source: str = "", offload: bool = False):
    """Predict a training step's memory without allocating it; returns an estimated :class:`Profile`.

    Args:
        build_model: returns the model (called under fake tensors: build from a config, do not load weights;
            it may move, cast, freeze, wrap or compile the model: :mod:`memprof.estimation.factories`).
        make_batch: returns the batch: a tensor, a tuple (positional arguments) or a dict (keyword arguments).
        step: ``step(model, batch, optimizer)``, one training step, run under the precision's autocast (with
            fp16-autocast, loss scaling is then the step's business); default: forward under autocast, the
            model's own loss else ``output.sum()`` (:func:`~memprof.training.find_loss`; assumption ``loss``),
            backward (through a GradScaler for fp16), optimizer step, ``zero_grad``.
        optimizer: one of :data:`memprof.vocab.OPTIMIZERS`.
        precision: one of :data:`memprof.training.PRECISIONS`.
        device: ``"cuda"`` (the caching allocator's view) or ``"cpu"``.
        world_size, sharding: per-rank memory of FSDP2 ``"full"``, ``"shard-grad-op"``, ``"hybrid"`` (with
            ``shard_group_size``) or ``"none"`` at this world size, without starting that many processes.
        device_memory: a device name from :data:`memprof.hardware.DEVICES` or a size, to say
            whether it fits (it also picks the throughput used for modelled times).
        units: FSDP units (class names or FQN globs); default: the model's repeated blocks.
        offload: FSDP2 CPU offload of the sharded parameters, gradients and optimizer state (needs a sharding
            strategy; at world size 1, ``"full"`` shards over a one-rank mesh). With ``device="cuda"`` the
            profile's peak is the device's and the host's bytes per rank are given apart (device ``"cpu"``
            in ``devices``, ``assumptions["host_bytes"]``); with ``device="cpu"`` host and device are one.
    """
    check_precision(precision)
    check_optimizer(optimizer)
    strategy = check_strategy(sharding)
    check_offload(strategy, offload)
    if device not in ("cuda", "cpu"):
        raise EstimateError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise EstimateError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(steps, int) or steps < 1:
        raise EstimateError(f"steps must be a positive integer, got {steps!r}")
    if strategy != "none" and world_size == 1 and not offload:
        raise EstimateError(f"sharding {strategy!r} needs world_size > 1 (or offload=True: FSDP on one rank "
                            "keeps parameters, gradients and optimizer state on the host)")
    device_name, capacity = resolve_capacity(device_memory)

    emulate = device == "cuda" and not _cuda_built()
    fake_device = "cuda" if device == "cuda" and not emulate else "cpu"
    spec = host_spec() if device == "cpu" else device_spec(device_name)
    clock = _VirtualClock()
    op_model = _FakeOpModel(spec, clock, scratch=device == "cpu", scratch_limit_bytes=scratch_limit_bytes,
                            device=fake_device)
    assumptions = {
        "device": ("cuda, emulated on CPU kernels (this PyTorch build has no CUDA): attention and autocast "
                   "follow the CPU kernels' choices" if emulate else device),
        "precision": precision,
        "optimizer": optimizer,
        "world_size": str(world_size),
        "sharding": sharding_words(strategy, shard_group_size, offload),
        "steps": f"{steps} (the first creates optimizer state; later ones are steady)",
        "time": (f"modelled: roofline at {spec.bf16_tflops:g} (bf16) / {spec.fp32_tflops:g} (fp32) TFLOP/s x "
                 f"{_MATMUL_EFFICIENCY} and {spec.bandwidth_gbs:g} GB/s x {_BANDWIDTH_EFFICIENCY} ({spec.name})"),
    }
    if description:
        assumptions["model"] = description
    if source:
        assumptions["source"] = source  # lets the planner re-estimate other configurations of this model
    if offload:
        assumptions["offload"] = (
            "FSDP2 CPUOffloadPolicy: each rank's parameter shards, gradients and optimizer state on the host, "
            "copied to the device for each all-gather; the optimizer step runs on the CPU (not in the modelled "
            "step time)" + ("; host memory counted apart from the device's" if device == "cuda" else
                            "; host and device are the same memory here"))
        if emulate:
            assumptions["offload"] += ("; host-device copies emulated as copies on the CPU kernels (pinned host "
                                       "memory's rounding not modelled)")
    if device == "cuda":
        assumptions["allocator"] = ("sizes rounded up to 512 B as the CUDA caching allocator does; the peak is "
                                    "its allocated/active bytes; reserved memory and fragmentation not estimated")
        assumptions["scratch"] = "op-internal workspaces (cuBLAS, cuDNN) not estimated"
    env = {"device": "cuda:0" if device == "cuda" else "cpu", "device_name": device_name or
           ("cuda (emulated)" if emulate else device), "device_capacity_bytes": capacity,
           "world_size": world_size, "rank": 0}

    from torch._subclasses.fake_tensor import FakeTensorMode

    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_process_group(world_size, needed=strategy != "none"))
        if offload and emulate:
            stack.enter_context(emulated_host_copies())
        activations = HostActivations.installed(stack, emulate) if device == "cuda" else None
        mesh = build_mesh(fake_device, world_size, strategy, shard_group_size) if strategy != "none" else None
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
        stack.enter_context(torch.device(fake_device))
        real_paths = stack.enter_context(RealCodePaths()) if hf_real_paths else None
        cuda_to_cpu = fake_device == "cpu"  # the user's .cuda() stays on the estimate's device
        with user_code(cuda_to_cpu) as moves:
            model = call_fake("build_model", build_model)
        model, compiled = unwrap_compiled(model)
        if not isinstance(model, torch.nn.Module):
            raise EstimateError(f"build_model must return an nn.Module, got {type(model).__name__}")
        model.train()
        if precision == "bf16":
            cast_floating(model, torch.bfloat16)
        if strategy != "none":
            unit_names = select_units(model, units)
            assumptions["fsdp_units"] = f"{len(unit_names)} units ({', '.join(unit_names[:3])}{', ...' if len(unit_names) > 3 else ''}) and the root"
            shard_model(model, strategy, unit_names, precision=precision, mesh=mesh, offload=offload,
                        pin_memory=False)
        opt = make_optimizer(optimizer, model.parameters())
        host = HostSide(model, opt, op_model, emulated=emulate) if offload and device == "cuda" else None
        if host is not None:
            host.install()  # before the tracker: its gradient hook must run before the tracker's
            stack.callback(host.remove)
        scaler = make_scaler(precision, fake_device)
        tracker = Tracker(model, opt, calibrate=op_model, estimated=True, assumptions=assumptions,
                          environment=env, device_as={"cpu": "cuda:0"} if emulate else None, clock=clock)
        with tracker:
            if host is not None:
                host.bind(tracker)
            if activations is not None:
                activations.bind(tracker)
                stack.callback(activations.unbind)
            # The batch is made under the tracker so that its small tensors (masks, ids) get shadows; real
            # tensors it returns (a live batch) become fake ones with their data as shadows.
            with user_code(cuda_to_cpu) as batch_moves:
                batch = op_model.fake_batch(call_fake("make_batch", make_batch))
            if real_paths is not None:
                real_paths.refresh()  # transformers may have been imported by the factories
            for _ in range(steps):
                if step is None:
                    loss = call_fake("the training step", default_step, model, batch, opt, precision, scaler,
                                 fake_device)
                else:
                    with autocast(precision, fake_device), user_code(cuda_to_cpu) as step_moves:
                        call_fake("step", step, model, batch, opt)
    prof = tracker.profile
    extra = {"estimate_seconds": f"{time.perf_counter() - t_start:.2f}",
             "loss": loss if step is None else getattr(step, "loss_said", "the given step's own (step=)")}
    if device == "cpu":
        extra["scratch"] = (f"op-internal scratch measured on the real CPU kernels for {op_model.measured} op "
                            f"signatures; {op_model.skipped_large} with inputs over {scratch_limit_bytes} bytes "
                            "assumed to need none")
        if len(op_model.dtypes):
            extra["fake_dtypes"] = (f"{len(op_model.dtypes)} op signatures given the real CPU kernel's output "
                                    "dtypes, where the fake kernel's differ")
    extra.update(op_model.safety.assumptions())
    if activations is not None:
        prof = activations.noted(prof, extra, steps, host_counted=host is not None)
    if host is not None:
        extra["host_bytes"] = str(host.resident_bytes)
        extra["host_peak_bytes"] = str(host.peak_bytes)
        cats = host.resident_by_category
        extra["host"] = (f"per rank on the host: {cats['param']} bytes of parameter shards, {cats['grad']} of "
                         f"gradients, {cats['optimizer']} of optimizer state when the optimizer step starts; "
                         f"{host.peak_bytes} at the highest, inside the step")
        prof = dataclasses.replace(prof, devices=tuple(
            dataclasses.replace(d, peak_bytes=host.peak_bytes) if d.device == "cpu" else d for d in prof.devices))
    extra.update(factory_notes(compiled, moves, batch_moves, step_moves if step is not None else None,
                               device=fake_device))
    if real_paths:
        extra["transformers"] = "fake-tensor code paths disabled: attention and masks as in a real run"

    return dataclasses.replace(prof, assumptions={**prof.assumptions, **extra})
