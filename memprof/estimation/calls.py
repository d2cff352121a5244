"""How the estimator runs the user's code: its error type, calls to the user's factories and step with their
failures named, and the fake process group that stands for a world of ranks in this one process."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..errors import MemprofError

__all__ = ["EstimateError", "call_fake", "current_fake_mode", "fake_process_group"]


class EstimateError(MemprofError):
    """The model, the batch or the step could not be built or run under fake tensors."""


@contextlib.contextmanager
def fake_process_group(world_size: int, needed: bool = True):
    import torch.distributed as dist

    if not needed:
        yield
        return
    if dist.is_initialized():
        raise EstimateError("cannot estimate another world size inside a running torch.distributed job; "
                            "run the estimate in a plain process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def call_fake(what: str, fn: Callable, *args):
    """``fn(*args)`` of user code under fake tensors; its failures become an :class:`EstimateError` saying what."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    try:
        return fn(*args)
    except MemprofError:
        raise
    except (DataDependentOutputException, DynamicOutputShapeException) as e:
        raise EstimateError(f"{what} reads the value of a large tensor ({e}), which fake tensors do not have; "
                            "estimate a step that does not branch on such data (pass step=)") from e
    except Exception as e:
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
        raise EstimateError(f"{what} {name} failed under fake tensors: {type(e).__name__}: {e}") from e


def current_fake_mode():
    """The innermost FakeTensorMode on the dispatch-mode stack (RuntimeError when there is none)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, FakeTensorMode):
            return mode
    raise RuntimeError("fake_copy must run under a FakeTensorMode")
