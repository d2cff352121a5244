"""Lower-precision optimizer state: Adam/AdamW moments kept in bf16, the update computed in the
parameter's precision.

``low_precision_state(optimizer)`` replaces the optimizer's ``step`` (an instance attribute over the
class's method) by one that keeps ``exp_avg`` and ``exp_avg_sq`` in ``dtype`` (bf16 by default: half the
state's bytes for fp32 parameters), casts existing moments down, and for each parameter upcasts its
moments, applies torch's single-tensor Adam/AdamW update (same formula, same order of operations) and
stores them back; the upcast pair is the step's only extra memory, one parameter at a time.
``remove()`` casts the moments back to the parameters' dtype (they keep bf16's rounding) and restores
``step``.

With ``dtype`` equal to the parameters' dtype the update equals torch's ``foreach=False`` step exactly
(a test checks it); with bf16 moments the parameters drift from the fp32 run by bf16's rounding of the
moments (about 3 significant digits). Not supported (refused): ``amsgrad``, ``capturable``,
``differentiable``, optimizers other than ``torch.optim.Adam``/``AdamW``, complex parameters. 8-bit states
(torchao's low-bit optimizers) are not built in: on this CPU their first step compiles for about a minute.
"""

from __future__ import annotations

import math
import types

import torch

from ..errors import MemprofError
from . import overrides

__all__ = ["low_precision_state", "StatePrecisionHandle", "StatePrecisionError"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


class StatePrecisionError(MemprofError):
    """The optimizer's state cannot be kept in a lower precision by this lever."""


class StatePrecisionHandle(overrides.Undoable):
    """What :func:`low_precision_state` changed; ``remove()`` (or leaving ``with``) undoes it."""

    def __init__(self, optimizer: torch.optim.Optimizer, dtype: torch.dtype):
        self.optimizer, self.dtype = optimizer, dtype
        self._patched: list[torch.optim.Optimizer] = []
        self._removed = False

    def _patch(self, target: torch.optim.Optimizer, step) -> None:
        self._patched.append(target)
        overrides.push(target, "step", self, types.MethodType(step, target))  # bound, as LR schedulers expect

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        opt = self.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p)
                for name in _MOMENTS:
                    if st and isinstance(st.get(name), torch.Tensor) and st[name].dtype != p.dtype:
                        st[name] = st[name].to(p.dtype)
        for target in self._patched:
            overrides.pop(target, "step", self)
        del opt._memprof_state_precision

    def __repr__(self) -> str:
        return f"StatePrecisionHandle(dtype={self.dtype})"


def _check(optimizer) -> None:
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        raise StatePrecisionError(f"lower-precision state is built for torch.optim.Adam/AdamW, not "
                                  f"{type(optimizer).__name__}")
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "capturable", "differentiable"):
            if group.get(flag):
                raise StatePrecisionError(f"lower-precision state does not support {flag}=True")
        for p in group["params"]:
            if p.is_complex():
                raise StatePrecisionError("lower-precision state does not support complex parameters")


def low_precision_state(optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.bfloat16
                        ) -> StatePrecisionHandle:
    """Keep the Adam/AdamW optimizer's moments in ``dtype`` (see the module docstring)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise StatePrecisionError(f"the state's dtype must be a floating-point torch.dtype, got {dtype!r}")
    _check(optimizer)
    if getattr(optimizer, "_memprof_state_precision", None) is not None:
        raise StatePrecisionError("the optimizer's state is in a lower precision already: remove the first handle")
    handle = StatePrecisionHandle(optimizer, dtype)
    for st in optimizer.state.values():
        for name in _MOMENTS:
            if isinstance(st.get(name), torch.Tensor):
                st[name] = st[name].to(dtype)

    # torch's own wrapper around the step: the step hooks fire (the tracker's optimizer phase, LR schedulers)
    step = torch.optim.Optimizer.profile_hook_step(adam_step(dtype))

    # With the step moved into backward (memprof.policy.step_in_backward) the parameters are stepped by
    # its one-parameter optimizers, which share this optimizer's state: the update goes there.
    moved = getattr(optimizer, "_memprof_step_in_backward", None)
    for target in (moved.subs if moved is not None else [optimizer]):
        handle._patch(target, step)
    optimizer._memprof_state_precision = handle
    return handle


def adam_step(dtype: torch.dtype):
    """An optimizer ``step`` method that updates every parameter with a gradient, moments in ``dtype``."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _update(p, self.state[p], group, dtype)
        return loss

    return step


def _update(param: torch.Tensor, state: dict, group: dict, dtype: torch.dtype) -> None:
    """torch's ``_single_tensor_adam`` for one parameter, with moments stored in ``dtype``."""
    grad = param.grad if not group.get("maximize") else -param.grad
    if grad.is_sparse:
        raise StatePrecisionError("lower-precision state does not support sparse gradients")
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    step_t = state["step"]
    step_t += 1
    if weight_decay != 0:
        if group.get("decoupled_weight_decay", False):  # AdamW's groups say True
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg = state["exp_avg"].to(param.dtype)
    exp_avg_sq = state["exp_avg_sq"].to(param.dtype)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    state["exp_avg"].copy_(exp_avg)
    state["exp_avg_sq"].copy_(exp_avg_sq)
