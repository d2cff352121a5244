"""What the ledger's per-op path needs to know about an op (decided once per op) and about a tensor's memory.

Every ``OpOverload`` is classified on first sight by its schema (:func:`classify`), and the ledger caches the
answer: whether its outputs can be new storages, views of its arguments or its arguments written in place,
and the C++ callable to run it with. :func:`real_tensors` gives the plain tensors that hold a wrapper
subclass's memory (DTensor), which is what the ledger counts.

Known limits: the kind comes from the schema's alias annotations, so an op that changes an argument's size
without declaring that it writes it is not re-measured (``UntypedStorage.resize_`` is followed apart, by the
tracker's patch); a wrapper subclass that is not traceable (no ``__tensor_flatten__``) is counted as the
tensor it is.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["FRESH", "VIEW", "INPLACE", "LIFT", "ALIAS", "classify", "real_tensors"]

_Tensor = torch.Tensor

# Op kinds. FRESH: its outputs are new storages (or, when already followed, storages it was given).
# VIEW: an output aliases an argument. INPLACE: it writes an argument (which may change size). LIFT:
# ``lift_fresh`` (``torch.tensor(...)``): its input is the constant being lifted, the same storage as its
# output in a real run; under fake tensors the output is a new fake storage and the real constant is not
# memory of the step, so the input is not looked at. ALIAS: a view op whose one tensor argument is its first
# (most views): its outputs alias that argument, so the per-op path looks at the output alone (the cheapest
# case, and over two thirds of a transformer step's ops).
FRESH, VIEW, INPLACE, LIFT, ALIAS = 0, 1, 2, 3, 4
_LIFTS = {torch.ops.aten.lift_fresh.default}


def classify(func) -> tuple:
    """``(kind, callable)`` for an op: the callable is the C++ overload an ``OpOverload`` calls (one Python
    frame fewer per op)."""
    if func in _LIFTS:
        kind = LIFT
    elif func.is_view:
        arguments = func._schema.arguments
        tensors = [a for a in arguments if "Tensor" in str(a.type)]
        kind = ALIAS if len(tensors) == 1 and tensors[0] is arguments[0] and not arguments[0].kwarg_only \
            and str(arguments[0].type) == "Tensor" else VIEW
    else:
        kind = FRESH
        for ret in func._schema.returns:
            info = ret.alias_info
            if info is not None:
                kind = INPLACE if info.is_write else max(kind, VIEW)
    run = func._op if type(func) is torch._ops.OpOverload and callable(getattr(func, "_op", None)) else func
    return kind, run


def real_tensors(t):
    """The plain tensors that hold ``t``'s memory (wrapper subclasses such as DTensor are flattened)."""
    if type(t) is _Tensor or type(t) is torch.nn.Parameter or not is_traceable_wrapper_subclass(t):
        yield t
        return
    inner, _ = t.__tensor_flatten__()
    for attr in inner:
        x = getattr(t, attr)
        if isinstance(x, _Tensor):  # DTensor also lists its device mesh
            yield from real_tensors(x)
