"""Steady optimizer steps replayed from the last tracked one instead of being dispatched op by op.

A training step's optimizer phase is most of its ops (a for-loop AdamW runs about ten per parameter), and
in a steady step it does the same thing every time: in-place updates of parameters and state, plus
temporaries (``sqrt``, ``div``) born and freed per parameter. The ledger records that allocation pattern
once; later steps of the same optimizer with the same *signature* run without the dispatch mode, and the
ledger appends the recorded births and frees instead. Memory is the same to the byte (the accuracy tests
compare both paths with the allocator); the optimizer phase then costs the tracker almost nothing.

A pattern is recorded only when the whole phase is self-contained: every storage born in it also dies in
it, nothing older is freed or resized, nothing unseen is found, no module runs, and the signature is the
same before and after the step (so the step created no state). The signature covers what decides an
optimizer's allocations: its class, every group's options except the learning rate, each parameter's and
gradient's shape, dtype, device and layout, the state's tensors' shapes, dtypes and devices, and the
autocast state. A step called with a closure (LBFGS) is never replayed.

Known limit: an optimizer whose allocations depend on tensor *values* (not shapes) — none of torch's do —
would be misreported by a replay; track with ``optimizer_replay=False``. After every replayed step the
signature is checked again and a pattern that no longer holds is dropped.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = ["Pattern", "signature", "extract", "lookup", "store", "forget"]

_SKIP_GROUP_KEYS = frozenset(("params", "lr", "initial_lr"))


@dataclass(frozen=True)
class Pattern:
    """Births and frees of one steady optimizer step: ``templates`` (nbytes, op, shape, dtype, device name,
    label) and ``events`` (template index, delta bytes) in order."""

    templates: tuple
    events: tuple
    device_names: tuple = ()  # the devices the templates name


# optimizer -> (context, signature, pattern). Weak: a pattern lives as long as its optimizer.
_patterns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensor_sig(t) -> tuple:
    return (t.shape, t.dtype, t.device, t.layout)  # torch.Size is a tuple: compares and hashes as one


def signature(opt) -> tuple:
    """What decides the optimizer step's allocations (not the values it computes)."""
    groups = []
    state = opt.state
    for g in opt.param_groups:
        opts = []
        for k, v in g.items():
            if k in _SKIP_GROUP_KEYS:
                continue
            if isinstance(v, torch.Tensor):
                opts.append((k, _tensor_sig(v)))
            elif isinstance(v, (bool, int, float, str, type(None))):
                opts.append((k, v))
            elif isinstance(v, tuple) and all(isinstance(x, (bool, int, float, str)) for x in v):
                opts.append((k, v))
            else:
                opts.append((k, type(v).__name__))
        # One flat list per group (the cost of this runs twice per replayed step): each parameter's shape,
        # dtype, device and layout, its gradient's (or None), then its state's size and entries.
        params: list = []
        add, ext = params.append, params.extend
        for p in g["params"]:
            ext((p.shape, p.dtype, p.device, p.layout))
            grad = p.grad
            if grad is None:
                add(None)
            else:
                ext((grad.shape, grad.dtype, grad.device, grad.layout))
            st = state.get(p)
            if not st:
                add(0)
                continue
            add(len(st))
            for k, v in st.items():
                add(k)
                if isinstance(v, torch.Tensor):
                    ext((v.shape, v.dtype, v.device, v.layout))
                else:
                    add(type(v).__name__)
        groups.append((tuple(opts), tuple(params)))
    autocast = (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
    return (type(opt), autocast, tuple(groups))


def extract(events: list, phase_id: int, device_names: list[str]) -> Pattern | None:
    """The pattern of an optimizer phase's ledger events, or None when the phase is not self-contained."""
    templates: list = []
    index: dict[int, int] = {}  # id(record) -> template index
    open_: dict[int, int] = {}  # id(record) -> bytes born and not yet freed
    out = []
    for rec, delta in events:
        if rec.phase_id != phase_id:
            return None  # an older storage freed or resized, or one found live
        key = id(rec)
        i = index.get(key)
        if i is None:
            if delta <= 0:
                return None
            dev = rec.device
            name = device_names[-dev - 1 if dev < 0 else dev]
            i = index[key] = len(templates)
            templates.append((delta, rec.op, rec.shape, rec.dtype, name, rec.label))
            open_[key] = delta
        elif delta != -open_.pop(key, 0):
            return None  # resized in place, or freed twice
        out.append((i, delta))
    if open_:
        return None  # something born in the step outlives it
    return Pattern(tuple(templates), tuple(out), tuple(sorted({t[4] for t in templates})))


def lookup(opt, context, sig) -> Pattern | None:
    entry = _patterns.get(opt)
    if entry is None or entry[0] != context or entry[1] != sig:
        return None
    return entry[2]


def store(opt, context, sig, pattern: Pattern) -> None:
    _patterns[opt] = (context, sig, pattern)


def forget(opt) -> None:
    _patterns.pop(opt, None)
