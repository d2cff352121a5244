"""The models met in a tracked block as trees of :class:`~.ledger.ModuleNode`, and what each module owns.

:class:`ModuleTree` names each model (the first is the root, ""; another one by its class, "frozen-" first
when none of its parameters trains), walks it once into nodes (module -> node), records each parameter's owner
and full name, and labels storages in the ledger: parameters and buffers when a model is met, a parameter's
``.grad`` as ``grad`` (after each recorded backward, :meth:`ModuleTree.label_grads`, or by a post-accumulate
hook per parameter where backward runs per op), an optimizer's state as ``optimizer``.

It knows nothing of phases or steps: the module boundaries (:mod:`.boundaries`) add models met in forward,
the optimizer steps and the recorded backward ask it for labels.

Limits: a module shared by two models keeps the name of the model walked last; tied weights are labelled
once, by storage; a model that is not an ``nn.Module`` has no tree (no per-module rows).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..categories import BUFFER, GRAD, OPTIMIZER, PARAM
from ..structure import structure_hashes
from .ledger import ModuleNode, real_tensors

__all__ = ["ModuleTree"]

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


class ModuleTree:
    """Module nodes, parameter owners and storage labels of one tracker.

    ``handles`` is the tracker's list of per-run hook handles (removed when it stops); ``backward`` the
    :class:`~.recorded_backward.RecordedBackward`, whose ``enabled`` says whether gradients are labelled
    after each backward instead of by a hook per parameter (a sharded parameter turns it off).
    """

    def __init__(self, ledger, notes: set, handles: list, backward) -> None:
        self.ledger = ledger
        self.notes = notes
        self.handles = handles
        self.backward = backward
        self.nodes: dict = {}  # module -> ModuleNode
        self.roots: list = []  # (module, node)
        self.owner: dict = {}  # parameter -> (node, name)
        self.unhooked: list = []  # parameters whose gradients a recorded backward labels (no accumulate hook)
        self.running = False  # set by the tracker: hooks do nothing while paused or stopped
        self.hook_grad = ledger.own_time(self.grad_accumulated)

    def disconnect(self) -> None:
        """Drop the references that tie a finished tracker's parts into cycles."""
        self.backward = self.hook_grad = None

    def clear(self) -> None:
        """Forget every module and parameter (a finished tracker keeps none of the user's objects)."""
        self.nodes.clear()
        self.owner.clear()
        self.unhooked.clear()
        self.roots.clear()

    # ------------------------------------------------------------------------------------------- models --
    def add_root(self, mod) -> ModuleNode:
        """Name a model met in the step and walk it. The first is the root (""); another is named by its
        class, "frozen-" first when none of its parameters trains (DPO's reference beside the policy), and a
        frozen model that ran first gives the root's place to the first trained one."""
        modules = list(mod.named_modules())  # one walk of the tree, shared by what follows
        contained = {id(m) for _, m in modules}
        others = [(m, n) for m, n in self.roots if id(m) not in contained]
        frozen = _frozen(modules)
        first = next(((m, n) for m, n in others if n.name == ""), None)
        if first is not None and not frozen and _frozen(list(first[0].named_modules())):
            others.remove(first)  # the frozen model that ran first: renamed, the trained one is the root
            self.roots = others
            others.append((first[0], self._place(first[0], list(first[0].named_modules()),
                                                 _free_name(first[0], True, others))))
        name = _free_name(mod, frozen, others) if any(n.name == "" for _, n in others) else ""
        root = self._place(mod, modules, name)
        self.roots = others + [(mod, root)]
        return root

    def _place(self, mod, modules, name: str) -> ModuleNode:
        structure = structure_hashes(mod)
        walk: dict[str, ModuleNode] = {}
        for fqn, sub in modules:
            full = fqn if not name else (f"{name}.{fqn}" if fqn else name)
            parent = walk.get(fqn.rpartition(".")[0]) if fqn else None
            node = self.nodes.get(sub)
            if node is None:
                node = ModuleNode(full, type(sub).__name__, parent, structure[id(sub)], sub)
                self.nodes[sub] = node
            else:
                node.name, node.parent = full, parent
            walk[fqn] = node
        if any(type(m).__name__ == "OptimizedModule" for _, m in modules):
            self.notes.add("torch.compile: compiled modules ran eagerly under the tracker (memory of the eager "
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
            self.owner[p] = (owner, full)
            _label_storages(led, p, PARAM, full, owner, seen_storage)
            if p.grad is not None:
                self.label_grad(p)
            if p.requires_grad:
                grads.append(p)
            if type(p) is not _Parameter and (type(p).__name__ == "FlatParameter" or is_traceable_wrapper_subclass(p)):
                # FSDP and DTensor keep collective buffers made in backward past it, which no tensor the
                # tracker can reach holds: backward is tracked per op (see RecordedBackward.run).
                self.backward.enabled = False
        for bname, b in _members(modules, "_buffers"):
            owner = walk.get(bname.rpartition(".")[0]) or walk[""]
            full = f"{prefix}.{bname}" if prefix else bname
            _label_storages(led, b, BUFFER, full, owner, seen_storage)
        if self.backward.enabled:
            # Gradients are labelled after each backward (RecordedBackward.run), not by a hook per parameter:
            # in a recorded backward the hooks were a third of memprof's cost (a claim and a drain each).
            self.unhooked.extend(grads)
        else:
            self.handles.extend(p.register_post_accumulate_grad_hook(self.hook_grad) for p in grads)

    # ------------------------------------------------------------------------------------------- labels --
    def relabel(self, t, cat, label, node, only_from=None) -> None:
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

    def label_grad(self, p) -> None:
        owner, name = self.owner.get(p, (None, ""))
        self.relabel(p.grad, GRAD, f"{name}.grad", owner)

    def grad_accumulated(self, p) -> None:
        if self.running and p.grad is not None:
            self.label_grad(p)

    def label_grads(self, params) -> None:
        """Label the gradients of ``params`` after a backward: in a recorded one this claims the record the
        recorder made for each."""
        live, owner = self.ledger.live, self.owner
        for p in params:
            g = p.grad
            if g is None:
                continue
            if type(g) is _Tensor:
                rec = live.get(id(g.untyped_storage()))
                if rec is not None and rec.cat == GRAD:
                    continue
            node, name = owner.get(p, (None, ""))
            self.relabel(g, GRAD, f"{name}.grad", node)

    def label_state(self, opt) -> None:
        for p, state in opt.state.items():
            owner, name = self.owner.get(p, (None, ""))
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    self.relabel(v, OPTIMIZER, f"{name}:{k}" if name else k, owner)


def _label_storages(led, tensor, cat: str, label: str, owner, seen: set) -> None:
    """Give each storage of ``tensor`` not seen yet this category, label and owner (found if the ledger does
    not follow it yet); a buffer sharing a parameter's storage leaves it a parameter."""
    for t in real_tensors(tensor):
        s = t.untyped_storage()
        if id(s) in seen:
            continue
        seen.add(id(s))
        rec = led.live.get(id(s))
        if rec is None:
            led.found(s, t, cat, label=label, node=owner)
        elif cat == PARAM or rec.cat != PARAM:
            rec.cat, rec.label, rec.node = cat, label, owner


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
