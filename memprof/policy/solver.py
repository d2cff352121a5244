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
