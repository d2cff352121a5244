"""Applying a plan to a model, and taking it off again.

``apply(model, plan)`` changes how the model runs, not what it is:

* checkpointing: (Hugging Face models: ``config.use_cache`` off, as their own gradient checkpointing does)
  each planned unit's ``forward`` is replaced (an instance attribute over the class's method)
  by one that runs the original under non-reentrant ``torch.utils.checkpoint`` — RNG state preserved, so
  dropout recomputes the same masks — with the selective policy of :mod:`memprof.policy.selective` for
  "selective" units. ``state_dict`` keys, parameter objects and an existing optimizer are untouched.
* activation offload ("offload" units): the unit's forward is replaced by one that saves its tensors for
  backward in host memory (:func:`memprof.activation_offload.offloaded`; CUDA tensors only, a no-op
  on the CPU).
* loss-head chunking (``plan.loss_head_chunk_tokens`` > 0): :func:`memprof.policy.loss_head.chunk_loss_head`
  on the model's output head (the full logits and their gradient never exist at once).
* optimizer levers (pass ``optimizer=``): ``plan.bf16_moments`` keeps Adam/AdamW moments in bf16
  (:func:`memprof.policy.state_precision.low_precision_state`), ``plan.optimizer_in_backward`` steps each
  parameter in its post-accumulate-grad hook (:func:`memprof.policy.step_in_backward.step_in_backward`).
* micro-batches (``plan.micro_batches`` > 1) belong to the training loop: ``handle.step`` is the step that runs
  them (:func:`memprof.policy.microbatch.microbatched`, the signature of :func:`memprof.training.default_step`);
  a loop of its own runs them by its own accumulation setting (the plan's explanation says how).
* precision: autocast around the root's forward (bf16/fp16-autocast); for fp16 a ``GradScaler`` that needs
  no change to the training loop (the root outputs' gradients are scaled by a hook, in each output's own
  dtype; ``optimizer.step`` is replaced by one that unscales, skips on inf/nan and updates the scale; pass
  ``optimizer=``); for bf16 parameters, the floating-point parameters and buffers are cast in place and a
  forward pre-hook on the root casts its floating-point inputs to bf16, so a script written for fp32 runs
  unchanged (its outputs stay bf16; PyTorch promotes them where the script mixes them with fp32 tensors).
* sharding: FSDP2 ``fully_shard`` of every unit and the root, with the plan's ``reshard_after_forward`` and
  mixed precision (:func:`memprof.sharding.shard_model`), when a process group of the plan's world size is
  initialised. Create the optimizer after applying a sharded plan (FSDP replaces the parameters).
  With ``offload_optimizer`` FSDP2's ``CPUOffloadPolicy``: the model must be on the CPU when the plan is
  applied; the units compute on the device of the process group's backend (CUDA for NCCL, else the CPU), the
  parameter shards, gradients and optimizer state stay on the host (pinned with CUDA), and the optimizer
  steps there. A plan for world size 1 needs a one-rank process group too (``torchrun --nproc-per-node 1``).

``handle.remove()`` (or leaving ``with memprof.apply(...)``) restores the model: forwards, hooks, the
optimizer's ``step``, dtypes. One plan at a time: applying a plan to a model that shares a module with one a
plan is applied to now raises :class:`ApplyError` (remove that plan first), so removal never depends on the
order of use. Known limits: FSDP sharding cannot be undone (``remove()`` leaves it and says so in
``handle.irreversible``); bf16 parameters are cast back to their dtype on ``remove()`` but keep bf16's
rounding.
"""

from __future__ import annotations

import fnmatch
import functools
import weakref

import torch
import torch.nn as nn

from ..activation_offload import offloaded
from ..errors import MemprofError
from ..plans import Plan
from ..sharding import shard_model
from ..training import autocast, cast_floating
from ..vocab import AUTOCAST_PRECISIONS, CHECKPOINT_MODES, RECOMPUTE_MODES
from .loss_head import chunk_loss_head
from .selective import context_fn as selective_context

__all__ = ["apply", "ApplyHandle", "ApplyError", "resolve_units"]


class ApplyError(MemprofError):
    """The plan does not fit the model or the environment it is applied in."""


# module -> a weak reference to the handle of the plan applied to it now (weak both ways: neither the model nor a
# handle the user dropped is kept alive by this registry)
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _owner(mod):
    ref = _APPLIED.get(mod)
    return ref() if ref is not None else None


def resolve_units(model: nn.Module, plan) -> dict[str, str]:
    """Module FQN -> checkpoint mode for every plan entry (FQN or glob/class pattern); missing ones raise."""
    names = {fqn: m for fqn, m in model.named_modules()}
    out: dict[str, str] = {}
    missing = []
    for choice in plan.checkpoint:
        if choice.unit in names:
            out[choice.unit] = choice.mode
            continue
        matched = [n for n, m in names.items() if n and (fnmatch.fnmatchcase(n, choice.unit)
                                                         or type(m).__name__ == choice.unit)]
        if not matched:
            missing.append(choice.unit)
        for n in matched:
            out[n] = choice.mode
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ApplyError(f"the plan names modules this model does not have: {shown}")
    return out


class ApplyHandle:
    """What ``apply`` did, and how to undo it (``remove()``; also a context manager)."""

    def __init__(self, model: nn.Module, plan):
        self.model = model
        self.plan = plan
        self.units: dict[str, str] = {}
        self.irreversible: list[str] = []
        self.step = None  # the training step that runs the plan's loop-side levers (micro-batches)
        self.loss_head = None  # the LossHeadHandle when the plan chunks the loss head (its .materialised count)
        self._undo: list = []
        self._removed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        errors = []
        while self._undo:
            undo = self._undo[-1]
            try:
                undo()
            except BaseException as e:  # keep undoing the rest (an interrupt too), then raise the first
                errors.append(e)
            finally:
                self._undo.pop()
        for mod in [m for m, ref in list(_APPLIED.items()) if ref() is self]:
            del _APPLIED[mod]
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        modes = {m: sum(1 for v in self.units.values() if v == m) for m in CHECKPOINT_MODES if m != "keep"}
        return (f"ApplyHandle(precision={self.plan.precision!r}, sharding={self.plan.sharding.strategy!r}, "
                f"checkpoint={modes}, removed={self._removed})")


def _swap_forward(handle: ApplyHandle, module: nn.Module, make_forward) -> None:
    """Replace ``module.forward`` by ``make_forward(original)``; the undo restores exactly what was there."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    original = module.forward
    module.forward = make_forward(original)

    def undo():
        if had_own:
            module.forward = previous
        else:
            module.__dict__.pop("forward", None)

    handle._undo.append(undo)


def _checkpointed(original, mode: str):
    from torch.utils.checkpoint import checkpoint

    kwargs = {"use_reentrant": False, "preserve_rng_state": True}
    if mode == "selective":
        kwargs["context_fn"] = selective_context

    @functools.wraps(original)
    def forward(*args, **kw):
        if not torch.is_grad_enabled():
            return original(*args, **kw)
        return checkpoint(_uncached(original), *args, **kwargs, **kw)

    return forward


def _uncached(original):
    """``original`` run with autocast's cast cache off (in forward and in its recomputation). The cache keeps
    each parameter's low-precision copy until the outermost autocast region exits: in a checkpointed unit,
    whose saved tensors are dropped, those copies would stay live to the end of the forward (a unit's
    weights in bf16 above the chain model's peak); uncached, each is freed after its op, and recomputation
    casts again."""

    @functools.wraps(original)
    def run(*args, **kw):
        if not torch.is_autocast_cache_enabled():
            return original(*args, **kw)
        torch.set_autocast_cache_enabled(False)
        try:
            return original(*args, **kw)
        finally:
            torch.set_autocast_cache_enabled(True)

    return run


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


def _offload_device_type() -> str:
    """Where an offloaded model computes: CUDA when the process group talks NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend()) if dist.is_initialized() else ""
    return "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"


def apply(model: nn.Module, plan, *, optimizer=None) -> ApplyHandle:
    """Apply ``plan`` to ``model`` (and, for fp16, ``optimizer``); returns a handle that can remove it."""

    if not isinstance(model, nn.Module):
        raise ApplyError(f"apply() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise ApplyError(f"apply() needs a memprof Plan (memprof.load('plan.toml')), got {type(plan).__name__}")
    taken = next((owner for mod in model.modules() if (owner := _owner(mod)) is not None), None)
    if taken is not None:
        raise ApplyError(f"a plan is already applied to this model (or a module it shares with one): {taken!r}; "
                         "remove it first (handle.remove()), then apply the new plan")
    units = resolve_units(model, plan)
    strategy = plan.sharding.strategy
    offload = plan.sharding.offload_optimizer
    if offload:
        on_device = sorted({str(p.device) for p in model.parameters() if p.device.type != "cpu"})
        if on_device:
            raise ApplyError(f"the plan offloads to the CPU (FSDP2 CPUOffloadPolicy), but the model's parameters "
                             f"are on {', '.join(on_device)}: apply it to the model on the CPU (build it there, or "
                             "on 'meta' and to_empty(device='cpu')); FSDP moves one unit at a time to the device")
    if strategy != "none":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            one = ", with --nproc-per-node 1 for this one-rank plan" if plan.world_size == 1 else ""
            raise ApplyError(f"the plan shards with FSDP ({strategy}) over {plan.world_size} rank(s), but no "
                             f"torch.distributed process group is initialised (launch with torchrun{one})")
        if dist.get_world_size() != plan.world_size:
            raise ApplyError(f"the plan is for world size {plan.world_size}, this job has {dist.get_world_size()}")
    needs = [w for w, on in (("the optimizer step in backward", plan.optimizer_in_backward),
                             ("bf16 optimizer moments", plan.bf16_moments)) if on]
    if needs and optimizer is None:
        raise ApplyError(f"the plan uses {' and '.join(needs)}, which change the optimizer: "
                         "apply(model, plan, optimizer=opt)")
    if plan.optimizer_in_backward and (strategy != "none" or plan.precision == "fp16-autocast"):
        raise ApplyError("the optimizer step in backward does not combine with FSDP sharding or fp16's gradient "
                         "scaler; this plan asks for both")
    if plan.precision == "fp16-autocast" and optimizer is None:
        raise ApplyError("an fp16-autocast plan needs the optimizer for loss scaling: apply(model, plan, optimizer=opt)")

    handle = ApplyHandle(model, plan)
    device_type = _offload_device_type() if offload else _device_type(model)
    for mod in model.modules():
        _APPLIED[mod] = weakref.ref(handle)
    try:
        # Order as in torchtitan: activation checkpointing, then precision, then FSDP.
        if any(m in RECOMPUTE_MODES for m in units.values()):
            _no_kv_cache(handle, model)
        for fqn, mode in units.items():
            if mode in RECOMPUTE_MODES:
                _swap_forward(handle, model.get_submodule(fqn), lambda f, m=mode: _checkpointed(f, m))
                handle.units[fqn] = mode
            elif mode == "offload":
                _swap_forward(handle, model.get_submodule(fqn), lambda f: offloaded(f, model))
                handle.units[fqn] = mode
        if plan.loss_head_chunk_tokens:
            handle.loss_head = chunk_loss_head(model, chunk_tokens=plan.loss_head_chunk_tokens)
            handle._undo.append(handle.loss_head.remove)
        _apply_precision(handle, model, plan.precision, device_type, optimizer)
        if plan.bf16_moments:
            from .state_precision import low_precision_state

            handle._undo.append(low_precision_state(optimizer).remove)
        if plan.optimizer_in_backward:
            from .step_in_backward import step_in_backward

            handle._undo.append(step_in_backward(model, optimizer).remove)
        if plan.micro_batches > 1:
            from .microbatch import microbatched

            handle.step = microbatched(plan.micro_batches)
        else:
            from ..training import default_step

            handle.step = default_step
        if strategy != "none":
            shard_model(model, strategy, [u for u in units], precision=plan.precision, device_type=device_type,
                        shard_group_size=plan.sharding.shard_group_size if strategy == "hybrid" else None,
                        offload=offload)
            handle.irreversible.append(f"FSDP2 {strategy} sharding" + (" with CPU offload" if offload else ""))
    except BaseException:
        handle.remove()
        raise
    return handle


def _no_kv_cache(handle: ApplyHandle, model: nn.Module) -> None:
    """Hugging Face models cache keys/values in forward (``config.use_cache``): a recomputed layer would
    append to that cache again and take another code path. Off while checkpointing, as HF does itself."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is True:
        config.use_cache = False

        def undo():
            config.use_cache = True
        handle._undo.append(undo)


def _apply_precision(handle: ApplyHandle, model: nn.Module, precision: str, device_type: str, optimizer) -> None:
    if precision == "bf16":
        dtypes = {id(t): t.dtype for t in model.parameters()}
        # cast_floating replaces buffers by new tensors: remember each by its module and name
        buffer_dtypes = {(id(mod), name): b.dtype for mod in model.modules()
                         for name, b in mod._buffers.items() if b is not None}
        cast_floating(model, torch.bfloat16)
        hook = model.register_forward_pre_hook(_inputs_to(torch.bfloat16), with_kwargs=True)

        def undo():
            hook.remove()
            for mod in model.modules():
                for p in mod._parameters.values():
                    if p is not None and id(p) in dtypes and p.dtype != dtypes[id(p)]:
                        p.data = p.data.to(dtypes[id(p)])
                for name, b in mod._buffers.items():
                    was = buffer_dtypes.get((id(mod), name))
                    if b is not None and was is not None and b.dtype != was:
                        mod._buffers[name] = b.to(was)
        handle._undo.append(undo)
        return
    if precision not in AUTOCAST_PRECISIONS:
        return
    scaler = None
    if precision == "fp16-autocast":
        scaler = torch.amp.GradScaler(device_type)
        _scale_optimizer_step(handle, optimizer, scaler)

    def make(original):
        @functools.wraps(original)
        def forward(*args, **kwargs):
            with autocast(precision, device_type):
                out = original(*args, **kwargs)
            if scaler is not None and torch.is_grad_enabled():
                _scale_gradients(out, scaler)
            return out
        return forward

    _swap_forward(handle, model, make)


def _inputs_to(dtype):
    """A root forward pre-hook casting floating-point tensors among the inputs to ``dtype``."""
    from torch.utils._pytree import tree_map

    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype else x

    def hook(_module, args, kwargs):
        return tree_map(cast, args), tree_map(cast, kwargs)

    return hook


def _scale_gradients(out, scaler) -> None:
    from torch.utils._pytree import tree_leaves

    def scale(grad):  # scale() also creates the scale tensor on first use
        # An fp16 scalar times the fp32 scale is fp32, and autograd refuses a hook that changes the dtype.
        return scaler.scale(grad).to(grad.dtype)

    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point():
            t.register_hook(scale)


def _scale_optimizer_step(handle: ApplyHandle, optimizer, scaler) -> None:
    had_own = "step" in optimizer.__dict__
    previous = optimizer.__dict__.get("step")
    original = optimizer.step

    def step(*args, **kwargs):
        optimizer.step = original  # GradScaler.step calls optimizer.step itself
        try:
            result = scaler.step(optimizer, *args, **kwargs)
            scaler.update()
        finally:
            optimizer.step = step
        return result

    optimizer.step = step

    def undo():
        if had_own:
            optimizer.step = previous
        else:
            optimizer.__dict__.pop("step", None)

    handle._undo.append(undo)
