"""Optimizer step in backward: each parameter stepped as soon as its gradient is complete, its gradient
freed at once, so the gradients of the whole model never exist together.

``step_in_backward(model, optimizer)`` registers a post-accumulate-grad hook on every trainable parameter
(``Tensor.register_post_accumulate_grad_hook``, the mechanism torchtune's ``optimizer_in_bwd`` uses). The
hook steps the parameter with a one-parameter optimizer of the user's optimizer's class whose state *is*
the user's optimizer's ``state`` (so ``optimizer.state_dict()`` stays complete and a checkpoint saved
meanwhile holds every moment), and whose hyperparameters are read from the parameter's group at each step
(so an LR scheduler driving the user's optimizer keeps working). The user's ``optimizer.step()`` becomes a
no-op that counts steps; ``zero_grad()`` finds no gradients left.

Not applicable (the plan must not choose it, and the handle refuses where it can see it): gradient
accumulation over several backwards per optimizer step (the second backward before ``step()`` raises
:class:`StepInBackwardError`), gradient clipping or a ``GradScaler`` in the loop (the loop sees no
gradients: clipping does nothing), closures passed to ``step()``. Numerics: per-parameter steps equal the
optimizer's own single-tensor (``foreach=False``) step; against a foreach/fused step they agree within
float rounding.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn as nn

from ..errors import MemprofError
from . import overrides

__all__ = ["step_in_backward", "StepInBackwardHandle", "StepInBackwardError"]


class StepInBackwardError(MemprofError):
    """The optimizer or the training loop cannot have its step moved into backward."""


class StepInBackwardHandle(overrides.Undoable):
    """What :func:`step_in_backward` changed; ``remove()`` (or leaving ``with``) undoes it.

    ``steps`` counts the loop's ``optimizer.step()`` calls while applied; ``stepped`` the parameter steps
    the hooks made."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.steps = 0
        self.stepped = 0
        self._hooks: list = []
        self.subs: list[torch.optim.Optimizer] = []  # the one-parameter optimizers the hooks step
        self._pending: set[int] = set()
        self._removed = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        overrides.pop(self.optimizer, "step", self)
        if getattr(self.optimizer, "_memprof_step_in_backward", None) is self:
            del self.optimizer._memprof_step_in_backward

    def __repr__(self) -> str:
        return f"StepInBackwardHandle(steps={self.steps}, stepped={self.stepped})"


_SKIP = ("params",)


def step_in_backward(model: nn.Module, optimizer: torch.optim.Optimizer) -> StepInBackwardHandle:
    """Step each of ``optimizer``'s parameters in backward, as its gradient is complete (module docstring)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise StepInBackwardError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "_memprof_step_in_backward", None) is not None:
        raise StepInBackwardError("the optimizer steps in backward already: remove the first handle first")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = trainable - owned
    if missing:
        raise StepInBackwardError(f"{len(missing)} trainable parameter(s) of the model are not in the optimizer: "
                                  "their gradients would never be applied nor freed")
    handle = StepInBackwardHandle(model, optimizer)
    cls = type(optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k in accepted}
        for p in group["params"]:
            if not p.requires_grad:
                continue
            try:
                sub = cls([p], **hyper)
            except (TypeError, ValueError) as e:
                handle.remove()
                raise StepInBackwardError(f"{cls.__name__} cannot be built for one parameter from its group's "
                                          f"settings: {e}") from e
            sub.state = optimizer.state  # one state: the user's optimizer's
            handle.subs.append(sub)
            handle._hooks.append(p.register_post_accumulate_grad_hook(_stepper(handle, group, sub)))

    def step(self, closure=None):
        if closure is not None:
            raise StepInBackwardError("optimizer.step(closure) cannot run with the step moved into backward")
        handle.steps += 1
        handle._pending.clear()
        optimizer._opt_called = True  # what an LR scheduler's wrapper of step() records

    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        step._wrapped_by_lr_sched = True  # the scheduler wrapped step() before: it need not warn
    overrides.push(optimizer, "step", handle, types.MethodType(step, optimizer))  # bound, as LR schedulers expect
    optimizer._memprof_step_in_backward = handle
    low = getattr(optimizer, "_memprof_state_precision", None)
    if low is not None:  # moments kept in a lower precision (memprof.policy.state_precision): the subs too
        from .state_precision import adam_step

        for sub in handle.subs:
            low._patch(sub, adam_step(low.dtype))
    return handle


def _stepper(handle: StepInBackwardHandle, group: dict, sub: torch.optim.Optimizer):
    mine = sub.param_groups[0]

    def hook(p: torch.Tensor) -> None:
        if id(p) in handle._pending:
            raise StepInBackwardError(
                "a second backward reached a parameter before optimizer.step(): gradient accumulation cannot "
                "run with the optimizer step in backward (remove the lever or accumulate without it)")
        handle._pending.add(id(p))
        for k, v in group.items():
            if k not in _SKIP:
                mine[k] = v
        sub.step()
        p.grad = None
        handle.stepped += 1

    return hook
