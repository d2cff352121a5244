"""Independent ground truth for the tracker on CPU: the allocator's own allocation events.

``torch.profiler`` with ``profile_memory=True`` records every allocation and free the CPU allocator
reports (``alloc_size``, negative on free). The running maximum of those events over a step, plus the
bytes already live before it, is the allocator's peak for that step. This module has nothing in common
with the tracker's code path (no dispatch mode, no hooks), which is what makes it a check.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

__all__ = ["allocator_peak", "live_bytes"]


def live_bytes(tensors: Iterable[torch.Tensor], round_to: int = 1) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once), each rounded
    up to a multiple of ``round_to`` (512 for the CUDA caching allocator)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        # keyed by address, not id(): the storage's Python object may die and its id be reused
        key = (s.device, s.data_ptr()) if s.nbytes() else ("empty", id(t))
        if key not in seen:
            seen.add(key)
            total += -(-s.nbytes() // round_to) * round_to
    return total


def allocator_peak(fn: Callable[[], object], live_before: int = 0, caller_thread_only: bool = False
                   ) -> tuple[int, object]:
    """Run ``fn`` under the profiler; return (``live_before`` + running maximum of allocations, fn's result).

    ``caller_thread_only`` drops allocations made on other threads (gloo's collective workers), whose
    timing relative to the caller's allocations varies from run to run.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from .scratch import caller_allocations

    with warnings.catch_warnings():
        # torch 2.11 warns once per process that a profiler without a schedule "clears events at the end
        # of each cycle": true of scheduled cycles, and there is one cycle here
        warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    roots = prof.profiler.kineto_results.experimental_event_tree()
    if caller_thread_only:
        events = caller_allocations(roots)
    else:
        events = []
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
        events.sort(key=lambda e: e[0])
    run = peak = 0
    for _, size in events:
        run += size
        peak = max(peak, run)
    return live_before + peak, result
