"""Act once at the first root-level forward: the hook ``memprof run --policy/--budget`` and ``@memprof.auto``
use to apply a plan to a model they were not handed.

:class:`FirstRootForward` installs global module hooks that call ``callback(module, args, kwargs)`` once,
when a module runs forward while no other module is running (the root model). Installed before the
tracker's hooks, it runs before the tracker sees that forward, so what the callback changes is what gets
measured. The root's own ``forward`` was already looked up when its hooks run: a callback that needs the
first call to run differently (a plan's autocast) returns a context manager, entered for that call and left
by the matching post-hook; forward pre-hooks the callback adds to the root (a bf16 plan's input cast) are
run for that call here, as torch took its list of hooks before the callback ran. The hooks are removed at the next module call after it (or by ``remove()``).
With ``grad_only=True`` root forwards run while gradients are off (``torch.no_grad``, ``inference_mode``:
an evaluation before training, as nanoGPT's ``estimate_loss`` at iteration 0) are passed over, so the
callback sees the first forward of a training step.

Known limits: the first call's keyword arguments are read from ``torch.nn.Module._call_impl``'s frame
(global pre-hooks get positional arguments only); wrappers (DDP, ``torch.compile``) are passed as they are;
"root" is the first module that runs forward.
"""

from __future__ import annotations

import sys

import torch
from torch.nn.modules import module as _nn_module

__all__ = ["FirstRootForward"]


def _caller_kwargs() -> dict:
    """Keyword arguments of the module call whose pre-hooks are running (see the module docstring)."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            break
        kwargs = frame.f_locals.get("kwargs")
        if isinstance(kwargs, dict) and "forward_call" in frame.f_locals:
            return kwargs
        frame = frame.f_back
    return {}


class FirstRootForward:
    """Calls ``callback(module, args, kwargs)`` once, at the first root-level module forward.

    The callback may return a context manager, entered for that forward and exited after it.
    """

    def __init__(self, callback, grad_only: bool = False) -> None:
        self.callback = callback
        self.grad_only = grad_only
        self.done = False
        self._finished = False
        self.error: BaseException | None = None
        self._depth = 0
        self._ctx = None
        self._handles: list = []

    def install(self) -> FirstRootForward:
        self._handles = [
            _nn_module.register_module_forward_pre_hook(self._pre),
            _nn_module.register_module_forward_hook(self._post, always_call=True),
        ]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, mod, args):
        if self._finished:  # safe here: torch iterates a snapshot of the pre-hooks (not of post-hooks on errors)
            self.remove()
            return
        self._depth += 1
        if self.done or self._depth != 1:
            return
        if self.grad_only and not torch.is_grad_enabled():
            return  # an evaluation forward: wait for one that builds a graph
        self.done = True
        kwargs = _caller_kwargs()
        hooks_before = set(mod._forward_pre_hooks)
        try:
            ctx = self.callback(mod, args, kwargs)
            args = self._run_added_hooks(mod, hooks_before, args, kwargs)
        except BaseException as e:
            self.error = e
            raise
        if ctx is not None:
            ctx.__enter__()
            self._ctx = (mod, ctx)
        return args

    @staticmethod
    def _run_added_hooks(mod, before: set, args, kwargs):
        """Run the root's forward pre-hooks added since ``before`` for the call under way: the new arguments
        (keyword arguments are changed in the call's own dict)."""
        for hook_id, hook in list(mod._forward_pre_hooks.items()):
            if hook_id in before:
                continue
            if hook_id in mod._forward_pre_hooks_with_kwargs:
                result = hook(mod, args, kwargs)
                if result is not None:
                    args, new_kwargs = result
                    if new_kwargs is not kwargs:
                        kwargs.clear()
                        kwargs.update(new_kwargs)
            else:
                result = hook(mod, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        return args

    def _post(self, mod, args, output):
        if self._finished:
            return
        self._depth -= 1
        if self._depth == 0 and self.done:
            if self._ctx is not None and self._ctx[0] is mod:
                self._ctx[1].__exit__(None, None, None)
                self._ctx = None
            self._finished = True  # removed at the next forward, or by remove()
