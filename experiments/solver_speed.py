"""How fast the planner's DP solves long chains, and how close it stays to the exact optimum.

    python experiments/solver_speed.py

Chains of 1,000 transformer-like units with 3 options each (keep / full / selective), identical and with
+-5% per-unit noise, at a budget between the smallest and the largest peak. Median of 5 runs. Target:
<= 1 s. Writes results/solver-speed.json.
"""

from __future__ import annotations

import random
import statistics
import time

from _common import write_result

from memprof.policy.solver import ChainProblem, Option, Unit, min_peak, peak_of, solve_dp

MiB = 1024**2


def chain(n: int, noise: float, seed: int = 0) -> ChainProblem:
    rng = random.Random(seed)
    units = []
    for i in range(n):
        j = (lambda x: x * (1 + rng.uniform(-noise, noise))) if noise else (lambda x: x)
        a, o, s = int(j(96 * MiB)), int(j(8 * MiB)), int(j(48 * MiB))
        options = (Option("keep", a, int(j(110 * MiB)), 0.0), Option("full", o, int(j(110 * MiB)), j(3.0)),
                   Option("selective", s, int(j(120 * MiB)), j(0.8)))
        units.append(Unit(f"layers.{i}", options, int(j(4 * 1024 * MiB)) + i * MiB // 8,
                          structure="" if noise else "block"))
    return ChainProblem(tuple(units), 6 * 1024 * MiB, 1)


def main() -> None:
    rows = []
    for noise in (0.0, 0.05):
        base = chain(1000, noise)
        low = max(peak_of(base, ["full"] * 1000), min_peak(base).peak_bytes)
        high = peak_of(base, ["keep"] * 1000)
        problem = ChainProblem(base.units, base.forward_base_bytes, (low + high) // 2)
        times, sol = [], None
        for _ in range(5):
            t0 = time.perf_counter()
            sol = solve_dp(problem)
            times.append(time.perf_counter() - t0)
        rows.append({"units": 1000, "noise": noise, "median_seconds": statistics.median(times),
                     "peak_bytes": sol.peak_bytes, "budget_bytes": problem.budget_bytes, "exact": sol.exact,
                     "extra_ms": sol.extra_ms})
        print(f"1000 units, noise {noise:.0%}: {statistics.median(times) * 1e3:.0f} ms (exact: {sol.exact})")
    path = write_result("solver-speed", {"target": "1,000-unit chain in <= 1 s", "rows": rows,
                                         "target_met": all(r["median_seconds"] <= 1.0 for r in rows)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
