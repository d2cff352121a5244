"""Module boundaries: which module runs now, in forward and in backward (:class:`Boundaries`).

* Global module forward pre/post hooks (installed by :mod:`.patches`) keep a forward module stack and mark
  each module's forward in the ledger ("F+"/"F-"; "R+"/"R-" for a forward recomputed inside backward, as
  activation checkpointing does); a model met for the first time is added to the :mod:`.hierarchy` tree.
* Gradient hooks on each module's outputs ("any") and inputs ("all") mark its backward ("B+"/"B-"), which
  unlike ``register_full_backward_hook`` is right for modules whose inputs need no grad. For one tensor the
  hook is a pre-hook on the node that made it, shared by every module boundary at that tensor
  (:meth:`Boundaries.on_grads`); modules whose backward never closes (embeddings, the first layer) are closed
  when the graph task ends (:meth:`.phases.Phases.end_backward`).
* Each forward's outputs are measured (what a checkpoint of the module keeps), the root's inputs labelled
  ``input``, and a module's own parameters labelled as it runs (FSDP swaps in unsharded ones).

Phase changes are not decided here: a forward outside the forward phase calls ``begin_forward``, a module's
first backward hook outside the backward phase ``enter_backward`` (both of :class:`~.phases.Phases`).

Limits: hooks see modules called through ``nn.Module.__call__`` only (a ``forward()`` called directly is
part of its caller); a module's backward hooks fire on gradients of tensors that require grad, so a module
whose outputs need none has no backward boundary; with ``model`` given, other modules run inside the block
are not tracked.
"""

from __future__ import annotations

import threading
import weakref
from functools import partial

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_leaves

from ..categories import BACKWARD, FORWARD, INPUT, OTHER, PARAM
from .ledger import real_tensors
from .marks import BACKWARD_IN, BACKWARD_OUT, FORWARD_IN, FORWARD_OUT, RECOMPUTE_IN, RECOMPUTE_OUT

__all__ = ["Boundaries", "on_grads", "on_all_grads"]

_graph_task_id = torch._C._current_graph_task_id
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


class Boundaries:
    """The forward and backward module stacks of one tracker and the hooks that keep them.

    ``models``: the models given to the tracker (empty: every module run inside the block is found).
    ``open_step`` is the optimizer step running now, ``(optimizer, has a closure)``, set by
    :class:`~.optimizer_steps.OptimizerSteps`; it is kept here because every module forward reads it: a
    forward while a step without a closure runs means that step raised and the block went on.
    """

    def __init__(self, ledger, tree, handles: list, models: list) -> None:
        self.ledger = ledger
        self.nodes = tree.nodes  # module -> ModuleNode
        self.add_root = tree.add_root
        self.relabel = tree.relabel
        self.handles = handles
        self.models = models
        self.fstack: list = []
        self.bstack: list = []
        self.grad_hooks: dict = {}  # id(tensor) -> _GradHooks, for the forward running now
        self.open_step = None
        self.running = False  # set by the tracker: hooks do nothing while paused or stopped
        # connected by the tracker (see connect)
        self.begin_forward = self.enter_backward = self.abandon_step = None
        own = ledger.own_time
        self.hook_fw_pre, self.hook_fw_post = own(self.fw_pre), own(self.fw_post)
        self.hook_bw_pre, self.hook_bw_post = own(self.bw_pre), own(self.bw_post)

    def connect(self, phases, steps) -> None:
        self.begin_forward = phases.begin_forward
        self.enter_backward = phases.enter_backward
        self.abandon_step = steps.abandon

    def disconnect(self) -> None:
        """Drop the references that tie a finished tracker's parts into cycles."""
        self.add_root = self.relabel = self.begin_forward = self.enter_backward = self.abandon_step = None
        self.hook_fw_pre = self.hook_fw_post = self.hook_bw_pre = self.hook_bw_post = None

    def current(self):
        if self.fstack:
            return self.fstack[-1]
        if self.bstack:
            return self.bstack[-1]
        return None

    def check_params(self, mod, node) -> None:
        """Label the module's own parameters as it runs: FSDP swaps in unsharded ones (grown by resize_)."""
        live = self.ledger.live
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            for t in ((p,) if type(p) is _Parameter else real_tensors(p)):  # plain ones without a generator
                rec = live.get(id(t.untyped_storage()))
                if rec is None or rec.cat != PARAM:
                    self.relabel(t, PARAM, f"{node.name}.{pname}" if node.name else pname, node)

    # ------------------------------------------------------------------------------------------ forward --
    def fw_pre(self, mod, args):
        if self.open_step is not None and not self.open_step[1]:
            self.abandon_step()
        node = self.nodes.get(mod)
        if node is None:
            if self.models or not self.running:
                return
            node = self.add_root(mod)
        if mod._parameters:
            self.check_params(mod, node)
        led = self.ledger
        if _graph_task_id() != -1:  # recomputation inside backward (activation checkpointing)
            self.fstack.append(node)
            led.cur = node
            led.mark(RECOMPUTE_IN, node)
            return
        if led.phase != FORWARD:
            self.begin_forward()
            if not self.running:
                return
        self.fstack.append(node)
        led.cur = node
        node.clock_in = led.op_clock
        led.mark(FORWARD_IN, node)

    def fw_post(self, mod, args, *rest):
        # (kwargs, output) normally; torch calls always_call hooks with (output) only when forward raised.
        kwargs, output = rest if len(rest) == 2 else ({}, None)
        node = self.nodes.get(mod)
        if node is None or not self.running or not _pop(self.fstack, node):
            return
        led = self.ledger
        led.cur = self.current()
        if _graph_task_id() != -1:
            led.mark(RECOMPUTE_OUT, node)
            return
        led.mark(FORWARD_OUT, node)
        node.clock_out = led.op_clock
        inputs = None
        if node.parent is None:
            inputs = _tensors((args, kwargs))
            for t in inputs:
                self.relabel(t, INPUT, "input", None, only_from=(OTHER,))
        if output is None:
            return
        leaves = [output] if isinstance(output, torch.Tensor) else _tensors(output)
        self.note_output_bytes(node, leaves)
        if not torch.is_grad_enabled():
            return
        outs = [t for t in leaves if t.requires_grad]
        if outs:
            self.on_grads(outs, partial(self.hook_bw_pre, node), "any")
            ins = [t for t in (inputs if inputs is not None else _tensors((args, kwargs))) if t.requires_grad]
            if ins:
                self.on_grads(ins, partial(self.hook_bw_post, node), "all")

    def on_grads(self, tensors, call, mode: str) -> None:
        """Call ``call`` when the gradient of one of ``tensors`` (mode "any") or of all of them ("all") is
        computed. One tensor's calls share one hook (:class:`_GradHooks`): one module's output is usually
        the next one's input, and a module's input its first child's."""
        if len(tensors) != 1:
            self.handles.append(on_grads(tensors, call, mode))
            return
        t = tensors[0]
        hooks = self.grad_hooks.get(id(t))
        if hooks is None or hooks.ref() is not t or hooks.version != t._version:
            hooks = self.grad_hooks[id(t)] = _GradHooks(t)
            node = t.grad_fn
            self.handles.append(t.register_hook(hooks) if node is None else node.register_prehook(hooks))
        hooks.calls.append(call)

    def note_output_bytes(self, node, tensors) -> None:
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

    # ----------------------------------------------------------------------------------------- backward --
    def bw_pre(self, node, _grad):
        if not self.running:
            return
        led = self.ledger
        if led.recorder is None:  # a recorded backward has no FSDP-swapped parameters (see ModuleTree)
            mod = node.module() if node.module is not None else None
            if mod is not None and mod._parameters:
                self.check_params(mod, node)
        if led.phase != BACKWARD:
            self.enter_backward()
        self.bstack.append(node)
        led.cur = self.current()
        led.defer_mark(BACKWARD_IN, node)

    def bw_post(self, node, _grads):
        if not self.running or not _pop(self.bstack, node):
            return
        led = self.ledger
        led.cur = self.current()
        led.defer_mark(BACKWARD_OUT, node)


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


def on_grads(tensors, fn, mode: str):
    """Call ``fn`` when the gradient of one tensor (mode "any") or of all of them ("all") is computed.

    One tensor: a pre-hook on the node that made it (``fn(grad_outputs)``), or a tensor hook on a leaf; the
    engine runs both just before that node runs, once its gradients are all in. The node's pre-hook is the
    cheaper of the two to add (a tensor hook gives the tensor a hook dictionary and a Python handle), and
    much cheaper than ``register_multi_grad_hook``. Several with "all": :func:`on_all_grads`, which
    counts instead of keeping the gradients."""
    if len(tensors) == 1:
        t = tensors[0]
        node = t.grad_fn
        return t.register_hook(fn) if node is None else node.register_prehook(fn)
    if mode == "all":
        return on_all_grads(tensors, fn)
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


def on_all_grads(tensors, fn):
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
