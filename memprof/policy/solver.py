"""Choosing one option per unit of a chain (keep, checkpoint, ...) so that the step fits a memory budget.

The problem, a choice's peak and what the solvers share are in :mod:`.chain_problem`: the least total
``extra_ms`` whose peak fits ``budget_bytes``, ties broken by the lower peak.

Solvers (each one's answer is re-checked with :func:`peak_of`; peak is not monotonic in the choices):

* :func:`solve_dp` — exact dynamic program, fast on long chains (:mod:`.solver_dp` says how it works).
* :func:`solve_ilp` — the same model as a MILP (``scipy.optimize.milp``, HiGHS), for cross-checks and for
  structures other than chains later. Needs scipy (the ``dev`` extra).
* :func:`solve_brute_force` — every combination, for tests (at most 16 units).
* :func:`frontier` — the Pareto frontier of (peak, extra time) over all choices, read off the same DP.

Units with the same non-empty ``structure`` share their per-option arrays (built once per structure).

Known limits: the DP and brute force compare costs in whole nanoseconds (each option's ``extra_ms`` rounded to
1e-6 ms, then summed exactly in integers), so choices closer than that in time count as ties and go to the lower
peak; the MILP compares in floating point with the same tolerance. ``Solution.extra_ms`` is the exact
(``math.fsum``) sum of the options' ``extra_ms``. When a front grows beyond ``max_exact_states`` states, the DP
keeps one state per bucket of ``resolution_bytes`` of q (the cheapest, plus the lowest q overall): every state
still holds its exact bytes, so the plan always fits and the smallest peak stays reachable, but the optimum may be
missed by a little (0.04% on a 1,000-block chain with per-block noise, see tests/benchmarks/test_solver_bench.py);
``Solution.exact`` says whether that happened.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations

from .chain_problem import (
    ChainProblem,
    InfeasibleBudget,
    Option,
    PeakTerm,
    ProblemError,
    Solution,
    SolverError,
    Unit,
    dominant_term,
    min_peak,
    peak_of,
)
from .solver_dp import DEFAULT_BUCKETS, MAX_EXACT_STATES, frontier, solve_dp
from .solver_exact import solve_brute_force, solve_ilp

__all__ = [
    "Option",
    "Unit",
    "ChainProblem",
    "Solution",
    "PeakTerm",
    "ProblemError",
    "InfeasibleBudget",
    "SolverError",
    "peak_of",
    "dominant_term",
    "min_peak",
    "solve",
    "solve_dp",
    "solve_ilp",
    "solve_brute_force",
    "frontier",
    "solve_with_surcharges",
    "frontier_with_surcharges",
    "DEFAULT_BUCKETS",
    "MAX_EXACT_STATES",
]


def solve(problem: ChainProblem, method: str = "auto") -> Solution:
    """Solve with ``method`` "auto" (= "dp"), "dp", "ilp" or "brute-force"."""
    if method in ("auto", "dp"):
        return solve_dp(problem)
    if method == "ilp":
        return solve_ilp(problem)
    if method == "brute-force":
        return solve_brute_force(problem)
    raise ProblemError(f"unknown method {method!r}; use 'auto', 'dp', 'ilp' or 'brute-force'")


def _restricted(problem, allowed: set):
    if all(o.name in allowed for u in problem.units for o in u.options):
        return problem
    units = tuple(replace(u, options=tuple(o for o in u.options if o.name in allowed)) for u in problem.units)
    return ChainProblem(units, problem.forward_base_bytes, problem.budget_bytes)


def _mode_sets(problem, first_unit_ms: dict):
    """Every set of surcharged modes a plan may use, with the options it allows (keep always)."""
    names = {o.name for u in problem.units for o in u.options}
    charged = sorted(m for m, ms in first_unit_ms.items() if ms > 0 and m in names)
    free = names - set(charged)
    for k in range(len(charged) + 1):
        for chosen in combinations(charged, k):
            yield set(chosen) | free


def _surcharged(sol: Solution, first_unit_ms: dict) -> float:
    used = set(sol.choices)
    return sol.extra_ms + sum(ms for m, ms in first_unit_ms.items() if m in used)


def solve_with_surcharges(problem, first_unit_ms: dict):
    """The least-time solution within the budget when each mode costs ``first_unit_ms[mode]`` once if used.

    Exact under that model: the chain DP is solved once per set of surcharged modes allowed (at most four
    for full and selective) and the best total is kept. Returns ``(solution, extra_ms)`` with the surcharges
    included; raises :class:`InfeasibleBudget` like :func:`solve_dp` when nothing fits."""
    best = None
    error = None
    for allowed in _mode_sets(problem, first_unit_ms):
        try:
            sol = solve_dp(_restricted(problem, allowed))
        except InfeasibleBudget as e:
            error = error or e
            continue
        total = _surcharged(sol, first_unit_ms)
        if best is None or (total, sol.peak_bytes) < (best[1], best[0].peak_bytes):
            best = (sol, total)
    if best is None:
        raise error
    return best


def frontier_with_surcharges(problem, first_unit_ms: dict) -> list:
    """Pareto points ``(solution, extra_ms)`` (peak vs. time, surcharges included), by increasing peak."""
    points = []
    for allowed in _mode_sets(problem, first_unit_ms):
        for sol in frontier(_restricted(problem, allowed)):
            total = _surcharged(sol, first_unit_ms)
            points.append((sol, total))
    points.sort(key=lambda p: (p[0].peak_bytes, p[1]))
    out = []
    for sol, total in points:
        if not out or total < out[-1][1]:
            out.append((sol, total))
    return out
