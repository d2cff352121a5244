"""What each way of watching a training step costs, before any bookkeeping: the floor under a tracker.

    python experiments/floors.py [--reps 24] [--default-malloc]

Same model, step and method as experiments/overhead.py (GPT-2-small shape, AdamW, CPU, glibc malloc keeping
freed memory; conditions interleaved ABBA, each one's ratio taken to the plain step of its round, medians):

    plain             the step alone
    empty mode fw/bw  an empty TorchDispatchMode around forward and backward: the floor of memprof's
                      dispatch-mode ledger (Python runs for every aten op)
    C++ op tracer     a RecordFunction callback on every aten op, in C++, recording each op's name, times
                      and output storages and shapes (experiments/op_tracer.cpp): per-op facts without Python
    C++ allocations   memprof.tracking.native.AllocationRecorder around the step: every allocation and free
                      the allocator reports, in C++, and nothing per op
    profiler          torch.profiler.profile(activities=[CPU], profile_memory=True)
    memprof           memprof.track(model, opt) as it is now (dispatch-mode ledger)
    memprof hooks only  the same tracker with its dispatch mode never pushed: its module, gradient and
                      optimizer hooks, start and stop, and no per-op work (its profile is not meaningful;
                      this is what a tracker fed by C++ events would still pay in Python)
    memprof hooks + C++ allocations  the two together: the floor of a tracker fed by allocator events
                      at module boundaries instead of a dispatch mode (no bookkeeping yet)
    memprof, backward outside its mode  memprof with its dispatch mode popped while autograd's engine
                      runs (torch.autograd._engine_run_backward patched): what moving backward alone onto
                      the allocation recorder could save at most (its profile misses backward's ops)

Writes results/floors.json. The question it answers: how cheap can a tracker that meets "exact bytes per
module, category and phase" be, and which source of events allows it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from pathlib import Path

from _common import MALLOC_HELP, gpt2_small_step, use_caching_malloc, write_result

import memprof
from memprof.policy.timing import median_stderr
from memprof.tracking import native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=24, help="rounds (even)")
    ap.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    args = ap.parse_args()
    use_caching_malloc(args.default_malloc)
    if not native.available():
        raise SystemExit(f"the C++ allocation recorder is unavailable: {native.unavailable_reason()}")
    tracer = ctypes.CDLL(str(native.build(source=Path(__file__).with_name("op_tracer.cpp"),
                                          libs=("c10", "torch_cpu"))))
    tracer.op_tracer_stop.restype = ctypes.c_int64

    model, opt, (x, y), step = gpt2_small_step()

    from torch.utils._python_dispatch import TorchDispatchMode

    class Empty(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def empty_mode_fw_bw():
        with Empty():
            model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    events = {"C++ op tracer": [], "C++ allocations": []}

    def op_tracer():
        if tracer.op_tracer_start() != 0:
            raise RuntimeError("op tracer did not start")
        try:
            step()
        finally:
            events["C++ op tracer"].append(tracer.op_tracer_stop())

    def allocations():
        with native.AllocationRecorder() as rec:
            step()
        events["C++ allocations"].append(len(rec))

    def profiler():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            step()

    def with_memprof():
        with memprof.track(model, opt):
            step()

    from memprof.tracking.ledger import Ledger

    def hooks_only():
        enter, exit_ = Ledger.__enter__, Ledger.__exit__
        Ledger.__enter__ = lambda self: self
        Ledger.__exit__ = lambda self, *exc: None
        try:
            with memprof.track(model, opt):
                step()
        finally:
            Ledger.__enter__, Ledger.__exit__ = enter, exit_

    def hooks_and_allocations():
        with native.AllocationRecorder():
            hooks_only()

    import torch.autograd as autograd
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

    engine = autograd._engine_run_backward

    def engine_without_ledger(*a, **k):
        if isinstance(_get_current_dispatch_mode(), Ledger):
            with _pop_mode_temporarily():
                return engine(*a, **k)
        return engine(*a, **k)

    def backward_outside_mode():
        autograd._engine_run_backward = engine_without_ledger
        try:
            with_memprof()
        finally:
            autograd._engine_run_backward = engine

    conditions = {"plain": step, "empty mode fw/bw": empty_mode_fw_bw, "C++ op tracer": op_tracer,
                  "C++ allocations": allocations, "profiler": profiler, "memprof": with_memprof,
                  "memprof hooks only": hooks_only, "memprof hooks + C++ allocations": hooks_and_allocations,
                  "memprof, backward outside its mode": backward_outside_mode}
    step()
    step()
    for fn in conditions.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in conditions}
    names = list(conditions)
    for r in range(args.reps + args.reps % 2):
        for name in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            conditions[name]()
            times[name].append(time.perf_counter() - t0)
    paired = {k: [a / b for a, b in zip(times[k], times["plain"])] for k in conditions}
    ratios = {k: statistics.median(v) for k, v in paired.items()}
    plain = statistics.median(times["plain"])
    result = {
        "model": "GPT-2 small shape: 12 layers, d=768, 12 heads, vocab 50257, seq 256, batch 2, AdamW",
        "reps": len(times["plain"]),
        "step_seconds": times,
        "median_step_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_plain": ratios,
        "ratio_stderr": {k: median_stderr(v) for k, v in paired.items() if k != "plain"},
        "extra_ms_per_step": {k: (ratios[k] - 1) * plain * 1e3 for k in conditions if k != "plain"},
        "allocation_events_per_step": statistics.median(events["C++ allocations"]),
        "op_tracer_int64_per_step": statistics.median(events["C++ op tracer"]),
    }
    path = write_result("floors" + ("-default-malloc" if args.default_malloc else ""), result)
    print(f"wrote {path}")
    for k in conditions:
        extra = "" if k == "plain" else f" +-{result['ratio_stderr'][k]:.3f}  ({result['extra_ms_per_step'][k]:+.1f} ms)"
        print(f"  {k:34s} {result['median_step_seconds'][k]:.3f} s  x{ratios[k]:.4f}{extra}")


if __name__ == "__main__":
    main()
