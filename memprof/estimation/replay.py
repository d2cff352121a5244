"""Fake ops replayed by signature: the outputs of an op already met on the same input metadata are made
directly, without going through ``FakeTensorMode``'s dispatch.

A training step under fake tensors repeats the same few hundred ops on the same shapes (every block, every
step); ``FakeTensorMode`` caches their outputs too, but building its cache key (every input's full
metadata) and its dispatch frames cost more than the estimator's own work per op. :class:`OpReplay` keys an
op by what decides its outputs' metadata (each fake input's dtype, shape, strides, storage offset and device;
every other argument by type and value; the default dtype) and remembers, for ops that make fresh tensors
or write into their first argument, what they returned: new tensors' dtype, shape, strides and device, or
which argument. A key is trusted once a second real dispatch gave the same answer; from then on its outputs
are empty meta tensors wrapped as fake tensors, as ``FakeTensorMode`` makes them on its own cache hits.

Never replayed (always dispatched): views and ops whose outputs alias inputs another way, ops that change
their inputs' metadata (in-place views, resizes, ``set_``), writes to arguments other than the first
(``out=``), data-dependent and dynamic-shape ops, ops outside ``aten`` (collectives, FSDP's own ops), ops
with an input that is a constant or not a fake tensor, and outputs whose storage is not exactly what
``empty_strided`` makes (the ledger counts storages).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["OpReplay", "PRIM_DEVICE"]

PRIM_DEVICE = torch.ops.prim.device.default
_aten = torch.ops.aten
_NEVER = frozenset({_aten.lift.default, _aten.lift_fresh.default,
                    _aten.lift_fresh_copy.default, _aten._local_scalar_dense.default, _aten.equal.default,
                    _aten.is_nonzero.default})
_BAD_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape, torch.Tag.inplace_view)
_STRIDED = torch.strided
_META = torch.device("meta")
_EMPTY = _aten.empty_strided.default
_SET = _aten.set_.source_Storage_storage_offset
_LIMIT = 200_000  # entries kept per process (keys hold metadata only, no tensors)


class _Skip(Exception):
    pass


def _replayable(func) -> bool:
    if not isinstance(func, torch._ops.OpOverload) or func.namespace != "aten" or func in _NEVER:
        return False
    if any(t in func.tags for t in _BAD_TAGS):
        return False
    schema = func._schema
    if "resize" in schema.name or schema.name.endswith("set_"):
        return False
    return not any(a.alias_info is not None and a.alias_info.is_write and (i != 0 or a.kwarg_only)
                   for i, a in enumerate(schema.arguments))


def _meta(a):
    t = type(a)
    if t is FakeTensor:
        if a.constant is not None:
            raise _Skip
        return (a.dtype, a.shape, a.stride(), a.storage_offset(), a.device)
    if t is list or t is tuple:
        return (t, tuple(_meta(x) for x in a))
    if isinstance(a, torch.Tensor):
        raise _Skip  # a real tensor, a subclass or a fake tensor of another kind
    return (t, a)  # 1, 1.0 and True are different arguments


def _storage_bytes(t) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


class OpReplay:
    """Makes an op's outputs from a trusted entry, else dispatches it and learns (see the module)."""

    def __init__(self) -> None:
        self._ok: dict = {}  # op -> whether it may be replayed
        self.replayed = 0

    def key(self, func, args, kwargs):
        """The op's replay key, or None when it is never replayed."""
        ok = self._ok.get(func)
        if ok is None:
            ok = self._ok[func] = _replayable(func)
        if not ok:
            return None
        try:
            key = (func, torch.get_default_dtype(), tuple(_meta(a) for a in args),
                   tuple((k, _meta(v)) for k, v in kwargs.items()) if kwargs else ())
        except _Skip:
            return None
        return key if _mode_of(args, kwargs) is not None else None

    def run(self, func, args, kwargs, key):
        """``func(*args, **kwargs)``, replayed when ``key``'s entry is trusted."""
        try:
            entry = _ENTRIES.get(key)
        except TypeError:  # an unhashable argument
            return func(*args, **kwargs)
        if entry is False:
            return func(*args, **kwargs)
        if entry is not None and entry[0]:
            self.replayed += 1
            return _make(entry[1], args, kwargs)
        out = func(*args, **kwargs)
        learned = _learn((*args, *kwargs.values()) if kwargs else args, out, len(args), func._schema.is_mutable)
        if entry is None:
            if len(_ENTRIES) >= _LIMIT:
                _ENTRIES.clear()
            _ENTRIES[key] = (False, learned) if learned is not None else False
        else:  # seen once: trusted when this dispatch answered the same
            _ENTRIES[key] = (True, learned) if learned is not None and learned == entry[1] else False
        return out


# key -> False (never replayed) or (trusted, what the op returns)
_ENTRIES: dict = {}


def _learn(args, out, positional, mutable):
    """What ``out`` is in terms ``_make`` can rebuild, or None (``args``: the positional arguments, then the
    keyword arguments' values; an op that writes its first argument must return it or nothing)."""
    storages = {}
    for i, a in enumerate(args[:positional]):
        for t in (a if type(a) in (list, tuple) else (a,)):
            if isinstance(t, torch.Tensor):
                storages.setdefault(id(t.untyped_storage()), i if t is a else None)
    others = {id(t.untyped_storage()) for a in args[positional:]
              for t in (a if type(a) in (list, tuple) else (a,)) if isinstance(t, torch.Tensor)}
    fresh: set = set()  # new outputs' storages: each its own (two outputs of one storage are not rebuilt)

    def one(t):
        if t is None:
            return None
        for i, a in enumerate(args[:positional]):
            if t is a:
                return ("arg", i)
        if (mutable or type(t) is not FakeTensor or t.constant is not None or t.requires_grad
                or t.layout != _STRIDED or t.is_conj() or t.is_neg()):
            raise _Skip
        s = id(t.untyped_storage())
        meta = (tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.fake_device)
        if s in others:
            raise _Skip
        if s in storages:  # a view of a positional tensor argument (not of a list's element)
            if storages[s] is None:
                raise _Skip
            return ("view", storages[s]) + meta
        if meta[2] != 0 or s in fresh or t.untyped_storage().nbytes() != _storage_bytes(t):
            raise _Skip
        fresh.add(s)
        return ("new",) + meta

    try:
        if out is None or isinstance(out, torch.Tensor):
            return ("one", one(out))
        if type(out) in (tuple, list):
            return (type(out), tuple(one(o) if o is None or isinstance(o, torch.Tensor) else _raise()
                                     for o in out))
    except _Skip:
        return None
    return None


def _raise():
    raise _Skip


def _make(what, args, kwargs):
    if what[0] == "one":
        return _one(what[1], args, kwargs)
    return what[0](_one(w, args, kwargs) for w in what[1])


def _one(w, args, kwargs):
    if w is None:
        return None
    if w[0] == "arg":
        return args[w[1]]
    shape, stride, offset, dtype, device = w[-5:]
    with torch._C._DisableTorchDispatch():
        empty = _EMPTY(shape, stride, dtype=dtype, device=_META)
        if w[0] == "view":
            _SET(empty, args[w[1]].untyped_storage(), offset, shape, stride)
    return FakeTensor(_mode_of(args, kwargs), empty, device)


def _mode_of(args, kwargs):
    for a in (*args, *kwargs.values()) if kwargs else args:
        if type(a) is FakeTensor:
            return a.fake_mode
        if type(a) in (list, tuple):
            for x in a:
                if type(x) is FakeTensor:
                    return x.fake_mode
    return None
