"""A model's repeated blocks: which ``ModuleList`` repeats with which period, found by structure.

:func:`repeated_blocks` looks at structure hashes (classes, parameter shapes and dtypes): it cannot see
behaviour that depends on a block's index or config (the estimate checks that by comparing middle blocks).
:func:`probe` builds the model once under fake tensors to find them (cached per factory);
:func:`full_structure` gives the structure hashes the uncut model's containers have, from a cut model.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref

import torch
import torch.nn as nn

from ..structure import structure_hashes
from .catalog import Architecture

__all__ = ["repeated_blocks", "probe", "full_structure", "catalog_layers", "with_layers"]

MAX_PERIOD = 4
MIN_UNITS = 5  # fewer units than this: nothing worth counting


def repeated_blocks(model: nn.Module) -> tuple[str, int, int] | None:
    """(FQN of the ModuleList, its length, period) of the repeated blocks with the most parameters, or None."""
    hashes = structure_hashes(model)
    best = None
    for fqn, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not fqn:
            continue
        kids = list(mod)
        n = len(kids)
        hs = [hashes[id(c)] for c in kids]
        for p in range(1, MAX_PERIOD + 1):
            if n % p == 0 and n >= MIN_UNITS * p and all(hs[i] == hs[i % p] for i in range(n)):
                size = sum(x.numel() for x in mod.parameters())
                if best is None or size > best[3]:
                    best = (fqn, n, p, size)
                break
    return None if best is None else best[:3]


# (id of the factory or of its bound object, function) -> (weak reference to that object, repeated_blocks)
_PROBED: dict = {}


def probe(build_model):
    """The repeated blocks of the model ``build_model`` makes, built once under fake tensors (cached per
    factory); None when there are none or it does not build (the estimate then reports why). Building first
    also imports what the factory imports (``transformers``) before the estimates, so that they all take
    the same code paths."""
    owner = getattr(build_model, "__self__", None)  # arch.build_model is a new bound method at each access
    target = build_model if owner is None else owner
    key = (id(target), getattr(build_model, "__func__", None))
    hit = _PROBED.get(key)
    if hit is not None and hit[0]() is target:
        return hit[1]
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with contextlib.ExitStack() as stack:
            if catalog_layers(build_model) is not None:  # transformers code on config values: on the meta
                stack.enter_context(torch.device("meta"))  # device (faster, the same structure)
            else:  # a user's factory could make real tensors: it gets fake ones
                stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
                stack.enter_context(torch.device("cpu"))
            model = build_model()
        rep = repeated_blocks(model) if isinstance(model, nn.Module) else None
    except Exception:  # the estimate reports it, with the estimator's context
        return None
    with contextlib.suppress(TypeError):  # an object without weak references is probed each time
        _PROBED[key] = (weakref.ref(target, lambda _r, k=key: _PROBED.pop(k, None)), rep)
    return rep


def catalog_layers(build_model) -> str | None:
    """The config key of the layer count when ``build_model`` is a catalog architecture's own factory (its
    models can be built with fewer layers from the config), else None."""

    arch = getattr(build_model, "__self__", None)
    if not isinstance(arch, Architecture) or getattr(build_model, "__func__", None) is not Architecture.build_model:
        return None
    return next((k for k in ("num_hidden_layers", "n_layer") if k in arch.config), None)


def with_layers(build_model, layers: int):
    """A catalog architecture's factory with ``layers`` layers (see :func:`catalog_layers`)."""
    import dataclasses

    arch = build_model.__self__
    key = catalog_layers(build_model)
    return dataclasses.replace(arch, config={**arch.config, key: layers}).build_model


def _own_hash(m, named_children):
    """:func:`memprof.structure.structure_hashes`' hash of ``m`` with the given (name, hash) children."""
    h = hashlib.sha1(type(m).__qualname__.encode())
    for name, t in m.named_parameters(recurse=False):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.requires_grad}".encode())
    for name, b in m.named_buffers(recurse=False):
        h.update(f"{name}:{tuple(b.shape)}:{b.dtype}".encode())
    for name, ch in named_children:
        h.update(f"{name}={ch}".encode())
    return h.hexdigest()[:12]


def full_structure(cut_model, prefix: str, n: int, p: int) -> dict:
    """Structure hashes, by name, of the modules holding the blocks as the uncut model has them: the cut
    model as it was tracked (sharded, cast) with its block list grown back to ``n`` blocks of the same kinds."""
    hashes = structure_hashes(cut_model)
    out: dict = {}

    def visit(m, name):
        if name == prefix:
            kids = list(m)
            children = [(str(j), hashes[id(kids[j % p])]) for j in range(n)]
        else:
            children = []
            for cname, c in m.named_children():
                full = f"{name}.{cname}" if name else cname
                inside = full == prefix or prefix.startswith(full + ".")
                children.append((cname, visit(c, full) if inside else hashes[id(c)]))
        out[name] = _own_hash(m, children)
        return out[name]

    visit(cut_model, "")
    return out
