"""Exact solvers for checking the dynamic program: every combination (:func:`solve_brute_force`, tests only)
and the same model as a MILP (:func:`solve_ilp`, HiGHS through scipy, the ``dev`` extra)."""

from __future__ import annotations

import math

import numpy as np

from .chain_problem import (
    ChainProblem,
    ProblemError,
    Solution,
    SolverError,
    infeasible,
    ns,
    solution,
    tables,
)

__all__ = ["solve_brute_force", "solve_ilp"]

_BRUTE_FORCE_MAX_UNITS = 16
_BRUTE_FORCE_MAX_COMBINATIONS = 1 << 24


def solve_brute_force(problem: ChainProblem) -> Solution:
    """Every combination (at most 16 units and 2**24 combinations), evaluated with the forward-order formula."""
    n = len(problem.units)
    count = math.prod(len(u.options) for u in problem.units)
    if n > _BRUTE_FORCE_MAX_UNITS or count > _BRUTE_FORCE_MAX_COMBINATIONS:
        raise ProblemError(f"brute force is for small problems ({n} units, {count:,} combinations given; "
                           f"at most {_BRUTE_FORCE_MAX_UNITS} units and {_BRUTE_FORCE_MAX_COMBINATIONS:,})")
    retained = np.zeros(1, dtype=np.int64)  # sum of r of the units so far
    peak = np.zeros(1, dtype=np.int64)  # largest backward term so far
    cost = np.zeros(1, dtype=np.int64)  # nanoseconds, as in the DP
    for u in problem.units:  # combination index = sum_i option_i * prod_{j<i} k_j
        peak = np.concatenate([np.maximum(peak, u.base_bytes + retained + o.local_bytes) for o in u.options])
        cost = np.concatenate([cost + ns(o.extra_ms) for o in u.options])
        retained = np.concatenate([retained + o.retained_bytes for o in u.options])
    peak = np.maximum(peak, problem.forward_base_bytes + retained)
    fits = np.flatnonzero(peak <= problem.budget_bytes)
    if len(fits) == 0:
        raise infeasible(problem, tables(problem)) or SolverError("brute force and min-peak disagree (a bug)")
    best = int(fits[np.lexsort((peak[fits], cost[fits]))[0]])  # least cost, then lowest peak
    # decode: the concatenations above put the last unit's option outermost
    idx = [0] * n
    block = count
    for i in range(n - 1, -1, -1):
        block //= len(problem.units[i].options)
        idx[i], best = divmod(best, block)
    return solution(problem, idx, "brute-force")


# ---------------------------------------------------------------------------------------------------------------
# MILP (HiGHS)


def solve_ilp(problem: ChainProblem, *, time_limit_s: float = 60.0) -> Solution:
    """Least extra time within the budget as a MILP solved by HiGHS, then the lowest peak at that time.

    Binary x[i,o] = 1 when unit i takes option o. Exactness: HiGHS works in floating point with tolerances, so
    the answer is re-checked in integers and re-solved with a tighter budget if rounding let it slip over.
    """
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as e:  # pragma: no cover - scipy is a dev dependency
        raise SolverError("solve_ilp needs scipy: pip install 'memprof[dev]' (or scipy)") from e
    t = tables(problem)
    err = infeasible(problem, t)
    if err is not None:
        raise err
    n = len(problem.units)
    if n == 0:
        return solution(problem, [], "ilp")
    sizes = [len(u.options) for u in problem.units]
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    nvar = int(start[-1])  # x[i,o] is variable start[i] + o
    r_all = np.concatenate(t.r).astype(np.float64)
    e_all = np.concatenate(t.e).astype(np.float64)  # nanoseconds, as in the DP

    # one option per unit: sum_o x[i,o] = 1
    one = np.zeros((n, nvar))
    for i in range(n):
        one[i, start[i]:start[i + 1]] = 1.0
    # memory at each backward position i: b_i + sum_{j<i,o} r[j,o] x[j,o] + sum_o l[i,o] x[i,o]
    # (b_i is folded into unit i's own coefficients, which is exact because its x sum to 1)
    memory = np.zeros((n + 1, nvar))
    for i in range(n):
        memory[i, :start[i]] = r_all[:start[i]]
        memory[i, start[i]:start[i + 1]] = t.local[i]
    # memory at the end of forward: F + sum_{j,o} r[j,o] x[j,o]
    memory[n] = r_all
    base = np.zeros(n + 1)
    base[n] = problem.forward_base_bytes
    opts = {"time_limit": time_limit_s, "mip_rel_gap": 0.0}

    def run(budget: int) -> tuple[list[int], bool] | None:
        # stage 1: least extra time; every memory position within the budget
        res = milp(
            e_all,
            constraints=[LinearConstraint(one, 1.0, 1.0), LinearConstraint(memory, -np.inf, budget - base)],
            integrality=np.ones(nvar),
            bounds=Bounds(0, 1),
            options=opts,
        )
        if res.x is None:
            if res.status == 2:  # infeasible (only after tightening: the first budget was checked to fit)
                return None
            raise SolverError(f"HiGHS found no plan: {res.message}")
        cost = float(e_all @ np.round(res.x))
        # stage 2: the lowest peak P at that time; variables x and P
        zero_col = np.zeros((n, 1))
        res2 = milp(
            np.concatenate([np.zeros(nvar), [1.0]]),
            constraints=[
                # one option per unit, as above
                LinearConstraint(np.hstack([one, zero_col]), 1.0, 1.0),
                # every memory position <= P
                LinearConstraint(np.hstack([memory, -np.ones((n + 1, 1))]), -np.inf, -base),
                # extra time <= stage 1's (+ half a nanosecond)
                LinearConstraint(np.concatenate([e_all, [0.0]])[None, :], -np.inf, cost + 0.5),
            ],
            integrality=np.concatenate([np.ones(nvar), [0]]),
            bounds=Bounds(np.zeros(nvar + 1), np.concatenate([np.ones(nvar), [budget]])),
            options=opts,
        )
        x = res2.x[:nvar] if res2.x is not None else res.x
        idx = [int(np.argmax(x[start[i]:start[i + 1]])) for i in range(n)]
        return idx, res.status == 0 and res2.status == 0

    budget = problem.budget_bytes
    for _ in range(4):
        out = run(budget)
        if out is None:
            break
        idx, exact = out
        sol = solution(problem, idx, "ilp", exact)
        if sol.peak_bytes <= problem.budget_bytes:
            return sol
        budget -= sol.peak_bytes - problem.budget_bytes  # HiGHS's tolerance let it slip over: tighten
    raise SolverError("HiGHS returned only plans over the budget (numerical trouble); use solve_dp")

