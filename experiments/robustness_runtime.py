"""Interrupts and leave-no-trace orders of use (issue "hardened"): the runtime categories of
experiments/robustness.py, which imports :func:`run_categories`; also standalone:

    python experiments/robustness_runtime.py            # full: 150 + 5 interrupt trials, every order (< 5 min)
    python experiments/robustness_runtime.py --quick    # 10 + 1 trials, every order, auto once

Prints the categories as JSON, each ``{"tried", "held", "failures"}``:

- "interrupts": SIGINT from a timer thread at a seeded random moment of 50 tracked steps
  (``@memprof.profile(steps=50, output=...)``), in this process and in child scripts
  (tests/fixtures/interrupted_training.py); held = the KeyboardInterrupt reached the training code (the child
  script ended by it), nothing was ignored, every hook, patch, dispatch mode and signal handler is as before, and
  the profile file is absent or loads with no temporary file beside it.
- "leave-no-trace orders": every order of use of tests/adversarial/runtime_scenarios.py (trackers nested,
  twice, paused and stopped out of order, stopped inside a step; plans applied twice, to a shared submodule,
  removed twice, after an error, interleaved with a tracker) and ``@memprof.auto`` returning and raising;
  held = it worked and left the process and model as they were, or refused the second use with a MemprofError.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.adversarial import runtime_scenarios as scenarios  # noqa: E402

__all__ = ["run_categories"]


def _category() -> dict:
    return {"tried": 0, "held": 0, "failures": []}


def _count(cat: dict, problem: str | None, name: str) -> None:
    cat["tried"] += 1
    if problem is None:
        cat["held"] += 1
    else:
        cat["failures"].append(f"{name}: {problem}")


def interrupts(quick: bool) -> dict:
    cat = _category()
    in_process, children = (10, 1) if quick else (150, 5)
    for seed in range(in_process):
        with tempfile.TemporaryDirectory() as out:
            _count(cat, scenarios.interrupt_trial(1000 + seed, steps=50, out_dir=out), "in process")
    for seed in range(children):
        with tempfile.TemporaryDirectory() as out:
            _count(cat, scenarios.child_interrupt_trial(2000 + seed, out, steps=50), "child script")
    return cat


def orders(quick: bool) -> dict:
    cat = _category()
    for name in scenarios.leave_no_trace_orders():
        _count(cat, scenarios.run_order(name), name)
    for raises in ((False,) if quick else (False, True)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                problem = scenarios.auto_order(raises, tmp)
            except Exception as e:
                problem = f"raised {type(e).__name__}: {e}"
        _count(cat, problem, "@memprof.auto " + ("raising" if raises else "returning"))
    return cat


def run_categories(quick: bool) -> dict[str, dict]:
    """{"interrupts": ..., "leave-no-trace orders": ...}, each {"tried", "held", "failures", "seconds"}."""
    out = {}
    for name, fn in (("interrupts", interrupts), ("leave-no-trace orders", orders)):
        t0 = time.monotonic()
        out[name] = fn(quick)
        out[name]["seconds"] = round(time.monotonic() - t0, 1)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer interrupt trials, auto once")
    print(json.dumps(run_categories(ap.parse_args().quick), indent=1))
