"""The tracker's changes to torch's global state, installed and undone as one unit (:class:`GlobalPatches`).

While a tracker runs (not paused), it has:

* global module forward pre/post hooks and global optimizer step pre/post hooks (the module boundaries' and
  the optimizer steps' hooks);
* ``torch.UntypedStorage.resize_`` wrapped, so the ledger follows storages resized in place (FSDP);
* ``torch.autograd._engine_run_backward`` wrapped, where backward runs on the allocation recorder
  (:mod:`.recorded_backward`);
* the ledger (a dispatch mode) on the dispatch-mode stack.

:meth:`GlobalPatches.uninstall` puts each back exactly as found: a patch that something else replaced since
is left to its owner, and the ledger is taken from below a mode pushed above it inside the tracked block and
not popped. A global optimizer post-hook can be removed from inside ``Optimizer.step``'s loop over those hooks
(a tracker that stops at its last optimizer step, :func:`remove_hook`).

Limits: one tracker's patches at a time (the tracker refuses to nest); a part that fails to install leaves
the parts installed before it in place.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _nn_module
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import interrupts

__all__ = ["GlobalPatches", "remove_hook"]

_NO_ATTR = object()


class GlobalPatches:
    """The hooks, patches and mode of one tracker. ``bounds`` gives ``hook_fw_pre``/``hook_fw_post``,
    ``steps`` ``hook_pre``/``hook_post``; ``backward`` (or None) its ``run(engine, args, kwargs)``, used
    while its ``enabled`` holds at install."""

    def __init__(self, ledger, bounds, steps, backward=None) -> None:
        self.ledger = ledger
        self.bounds = bounds
        self.steps = steps
        self.backward = backward
        self.hooks: list = []
        self.resize = None  # (our resize_, what UntypedStorage's own dict held before: _NO_ATTR if nothing)
        self.engine = None  # (our engine entry, the one it wraps)

    def install(self) -> None:
        bounds, steps = self.bounds, self.steps
        self.hooks = [
            _nn_module.register_module_forward_pre_hook(bounds.hook_fw_pre),
            _nn_module.register_module_forward_hook(bounds.hook_fw_post, with_kwargs=True, always_call=True),
            register_optimizer_step_pre_hook(steps.hook_pre),
            register_optimizer_step_post_hook(steps.hook_post),
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
        self.resize = (resize_, torch.UntypedStorage.__dict__.get("resize_", _NO_ATTR))
        torch.UntypedStorage.resize_ = resize_
        self.engine = None
        backward = self.backward
        if backward is not None and backward.enabled:
            engine = torch.autograd._engine_run_backward
            run = backward.run

            def run_backward(*args, **kwargs):
                result = run(engine, args, kwargs)
                if interrupts.pending:  # a signal recorded in memprof's code during this backward
                    interrupts.deliver()
                return result

            run_backward.__wrapped__ = engine
            torch.autograd._engine_run_backward = run_backward
            self.engine = (run_backward, engine)
        ledger.__enter__()

    def uninstall(self, in_opt_post: bool) -> None:
        """Undo :meth:`install`. ``in_opt_post``: called from the tracker's own optimizer post-hook."""
        opt_post = self.hooks[-1]
        for h in self.hooks:
            remove_hook(h, iterating=in_opt_post and h is opt_post)
            # torch's handle forgets the with_kwargs flag of global forward hooks: remove it ourselves.
            _nn_module._global_forward_hooks_with_kwargs.pop(h.id, None)
        self.hooks = []
        ours, before = self.resize
        if torch.UntypedStorage.__dict__.get("resize_") is ours:  # else patched over since: left to its owner
            if before is _NO_ATTR:
                del torch.UntypedStorage.resize_
            else:
                torch.UntypedStorage.resize_ = before
        if self.engine is not None:
            if torch.autograd._engine_run_backward is self.engine[0]:
                torch.autograd._engine_run_backward = self.engine[1]
            self.engine = None
        ledger = self.ledger
        top = _get_current_dispatch_mode()
        if top is ledger:
            ledger.__exit__(None, None, None)
        else:
            # Another mode was pushed above ours inside the block and not popped: remove ours from below it.
            stack = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
            if ledger in stack:
                saved = []
                while _get_current_dispatch_mode() is not ledger:
                    saved.append(torch.utils._python_dispatch._pop_mode())
                ledger.__exit__(None, None, None)
                for m in reversed(saved):
                    torch.utils._python_dispatch._push_mode(m)


def remove_hook(handle, iterating: bool) -> None:
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
