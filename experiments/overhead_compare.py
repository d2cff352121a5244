"""Tracking overhead of this checkout against another one, interleaved in one process (same model, same rounds).

    python experiments/overhead_compare.py --base /path/to/other/checkout [--reps 20] [--name overhead-compare]

The other checkout's ``memprof`` package is copied to a temporary folder as ``memprof_base`` (its absolute
``memprof`` imports re-pointed), so both trackers run in this process on the same model and batch: the
GPT-2-small-shaped CPU step of experiments/overhead.py, under the same malloc setting (CACHING_MALLOC). Each
round times, in alternating order (ABBA), the plain step, the step tracked by the base checkout and the step
tracked by this one (``with track(model, opt)`` around each step, op calibration cached, as in
experiments/overhead.py). Reported: each tracker's median paired ratio to the plain step of its round, with
its standard error, and the median paired ratio of this checkout's tracked step to the base's.
Writes results/<name>.json.
"""

from __future__ import annotations

import argparse
import gc
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MALLOC_HELP, ROOT, gpt2_small_step, use_caching_malloc, write_result

from memprof.policy.timing import median_stderr

_ABSOLUTE = re.compile(r"^(\s*)(from|import) memprof(\b)", re.M)


def import_base(checkout: Path, into: Path):
    """The ``memprof`` package of ``checkout``, imported as ``memprof_base``."""
    target = into / "memprof_base"
    shutil.copytree(checkout / "memprof", target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = path.read_text()
        new = _ABSOLUTE.sub(r"\1\2 memprof_base\3", text)
        if new != text:
            path.write_text(new)
    sys.path.insert(0, str(into))
    import memprof_base

    return memprof_base


def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path, help="the other checkout (its root folder)")
    ap.add_argument("--reps", type=int, default=20, help="rounds (rounded up to an even number)")
    ap.add_argument("--name", default="overhead-compare", help="results/<name>.json")
    ap.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    args = ap.parse_args()
    use_caching_malloc(args.default_malloc)
    import memprof

    with tempfile.TemporaryDirectory() as tmp:
        base = import_base(args.base.resolve(), Path(tmp))
        model, opt, _, step = gpt2_small_step()

        def tracked(pkg):
            def run():
                with pkg.track(model, opt):
                    step()
            return run

        conditions = {"plain": step, "base": tracked(base), "this": tracked(memprof)}
        step()
        step()  # optimizer state exists: every condition times a steady step
        for fn in conditions.values():  # warm each path (and each tracker's op calibration) once
            fn()
            fn()
        names = list(conditions)
        times: dict[str, list[float]] = {k: [] for k in names}
        rounds = args.reps + args.reps % 2
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                gc.collect()
                t0 = time.perf_counter()
                conditions[name]()
                times[name].append(time.perf_counter() - t0)
    paired = {k: [a / b for a, b in zip(times[k], times["plain"])] for k in ("base", "this")}
    this_to_base = [a / b for a, b in zip(times["this"], times["base"])]
    result = {
        "model": "GPT-2 small shape: 12 layers, d=768, 12 heads, vocab 50257, seq 256, batch 2, AdamW (CPU)",
        "base": {"checkout": str(args.base), "commit": _commit(args.base)},
        "this": {"checkout": str(ROOT), "commit": _commit(ROOT)},
        "rounds": rounds,
        "step_seconds": times,
        "median_step_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_plain": {k: statistics.median(v) for k, v in paired.items()},
        "ratio_stderr": {k: median_stderr(v) for k, v in paired.items()},
        "this_to_base": {"median_paired_ratio": statistics.median(this_to_base), "stderr": median_stderr(this_to_base),
                         "rounds_this_faster": sum(x < 1 for x in this_to_base) / len(this_to_base)},
    }
    path = write_result(args.name, result)
    print(f"wrote {path}")
    for k in ("base", "this"):
        print(f"  {k:5s} x{result['ratio_to_plain'][k]:.4f} +-{result['ratio_stderr'][k]:.4f} of the plain step")
    t = result["this_to_base"]
    print(f"  this/base, paired: x{t['median_paired_ratio']:.4f} +-{t['stderr']:.4f}, "
          f"this faster in {t['rounds_this_faster']:.0%} of rounds")


if __name__ == "__main__":
    main()
