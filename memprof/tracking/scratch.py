"""Op-internal memory ("scratch"): bytes an op allocates and frees inside itself, which dispatch cannot see.

oneDNN convolution backward, bf16 matmul packing and CPU flash attention allocate working memory inside the
kernel; on a CNN this put a dispatch-only ledger 11.7% below the allocator's peak. The calibrator measures it
from the allocator itself, once per op *signature* (op, input shapes/strides/dtypes, non-float arguments):

    CPU   the allocator's own reports of that one op call's allocations and frees: their running maximum
          minus the bytes still allocated at its end. Recorded in C++ (:mod:`.native`, a few microseconds
          per new signature) where it can be built, else by a PyTorch profiler session with
          ``profile_memory=True`` (~1 ms per new signature; the first session in a process costs ~1 s)
    CUDA  the caching allocator's counters: reset the peak, run the op, read the peak back

The answer is cached for the process, so steady steps pay only for building the signature key. The first
step in a process is slower; this is reported by the overhead experiment, not hidden.

Collective ops (``c10d``) are never calibrated. Known limits: only the calling thread's allocations count (gloo's collective worker threads allocate
buffers concurrently, at times that vary from run to run); skipped when another profiler is already
running, for fake/meta tensors (the estimator applies its own corrections), and for devices other than CPU
and CUDA. Resetting CUDA peak
counters means ``torch.cuda.max_memory_allocated()`` read *after* tracking is only the peak since the last
calibrated op; the profile keeps the true peaks (the tracker folds the counters in before each reset).
"""

from __future__ import annotations

import os

import torch

from . import native

__all__ = ["ScratchCalibrator", "signature", "clear_cache"]

_Tensor = torch.Tensor
CACHE: dict = {}  # signature -> (excess bytes, device), at most CACHE_LIMIT entries
CACHE_LIMIT = 20_000

# Never calibrated: collectives run on worker threads (a profiler session stopped under a running collective
# crashed gloo ranks), and profiler/FSDP bookkeeping ops allocate nothing of their own.
SKIP_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_dtensor", "fsdp", "profiler"})


def clear_cache() -> None:
    CACHE.clear()


def _meta(a):
    if isinstance(a, _Tensor):
        return (a.dtype, a.shape, a.stride(), a.device)
    if isinstance(a, (list, tuple)):
        return tuple(_meta(x) for x in a)
    if isinstance(a, float):
        return float  # values such as lr or dropout p do not change working memory
    return a


def signature(func, args, kwargs):
    key = [func]
    for a in args:
        key.append(_meta(a))
    if kwargs:
        for k, v in kwargs.items():
            key.append(k)
            key.append(_meta(v))
    return tuple(key)


def _first_device(args):
    for a in args:
        if isinstance(a, _Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, _Tensor):
                    return x.device
    return None


class ScratchCalibrator:
    """Runs ops, measuring each new signature's internal peak on the real allocator."""

    def __init__(self, cuda_counters=None) -> None:
        self._cuda = cuda_counters  # devices.CudaPeakFolder or None
        self.calibrated = 0  # ops measured by this calibrator (the rest came from the cache)

    def use_cuda(self, cuda_counters) -> None:
        """Measure CUDA ops from now on (CUDA was initialised after this calibrator was made)."""
        self._cuda = cuda_counters

    def call(self, func, args, kwargs):
        if func.namespace in SKIP_NAMESPACES:  # not cached: their arguments (profiler handles) are new each time
            return func(*args, **kwargs), 0, None
        key = signature(func, args, kwargs)
        try:
            hit = CACHE.get(key)
        except TypeError:  # an unhashable argument: run it plainly
            return func(*args, **kwargs), 0, None
        if hit is not None:
            out = func(*args, **kwargs)
            return out, hit[0], hit[1]
        device = _first_device(args)
        if device is None:
            return func(*args, **kwargs), 0, None
        if device.type == "cpu":
            if torch._C._autograd._profiler_enabled():
                return func(*args, **kwargs), 0, None
            out, excess = cpu_measure(func, args, kwargs)
        elif device.type == "cuda" and self._cuda is not None:
            out, excess = self._cuda.measure(func, args, kwargs, device)
        else:
            return func(*args, **kwargs), 0, None
        if len(CACHE) >= CACHE_LIMIT:  # bounded: drop the oldest signature (it is measured again if seen)
            CACHE.pop(next(iter(CACHE)))
        CACHE[key] = (excess, device)
        self.calibrated += 1
        return out, excess, device


_warmed = False


def cpu_measure(func, args, kwargs):
    """Run ``func`` once, recording the allocations it makes: with the C++ recorder (:mod:`.native`) where it
    can be built, else under a minimal Kineto session recording only CPU allocations."""
    if native.available():
        try:
            rec = native.AllocationRecorder().start()
        except native.NativeUnavailable:  # the slot is taken: let Kineto say whether it can run
            pass
        else:
            try:
                out = func(*args, **kwargs)
            finally:
                rec.stop()
            peak, end = rec.peak()
            return out, max(0, peak - end)
    return _kineto_measure(func, args, kwargs)


def _kineto_measure(func, args, kwargs):
    """Run ``func`` once under a minimal Kineto session recording only CPU allocations."""
    global _warmed
    from torch._C._profiler import ProfilerActivity, ProfilerConfig, ProfilerState, _ExperimentalConfig

    restore_log = None
    if not _warmed:
        # Kineto prints "USDT ... profiler_start" lines at its default log level; the level is read once,
        # at the first session, so quieten that first session and put the environment back.
        restore_log = os.environ.get("KINETO_LOG_LEVEL", "")
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    cfg = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
    acts = {ProfilerActivity.CPU}
    try:
        torch.autograd._prepare_profiler(cfg, acts)
        torch.autograd._enable_profiler(cfg, acts)
    except RuntimeError:
        return func(*args, **kwargs), 0
    finally:
        if restore_log is not None:
            _warmed = True
            if restore_log:
                os.environ["KINETO_LOG_LEVEL"] = restore_log
            else:
                os.environ.pop("KINETO_LOG_LEVEL", None)
    try:
        out = func(*args, **kwargs)
    finally:
        result = torch.autograd._disable_profiler()
    return out, _transient_excess(result)


def caller_allocations(roots) -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` of the allocations made on the thread that ran the first op, and of their frees.

    Allocations made on other threads (gloo's collective workers) are left out: they happen concurrently
    with the caller's work, so where they fall relative to its allocations changes from run to run. A free
    counts with its allocation, whichever thread frees it.
    """
    from torch._C._profiler import _EventType

    ops = [r for r in roots if r.tag == _EventType.TorchOp]
    caller = min(ops, key=lambda r: r.start_time_ns).start_tid if ops else None
    events = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.ptr, node.start_tid))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    mine: dict[int, bool] = {}
    out = []
    for t, size, ptr, tid in events:
        if size > 0:
            keep = caller is None or tid == caller
            mine[ptr] = keep
        else:
            keep = mine.pop(ptr, caller is None or tid == caller)
        if keep:
            out.append((t, size))
    return out


def _transient_excess(result) -> int:
    """Highest running sum of the session's allocations minus where it ended (>= 0)."""
    allocs = caller_allocations(result.experimental_event_tree())
    run = peak = 0
    for _, size in allocs:
        run += size
        if run > peak:
            peak = run
    return max(0, peak - run)
