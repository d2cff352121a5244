"""The exact dynamic program over a chain problem (:mod:`.chain_problem`): the least-time choice within the
budget (:func:`solve_dp`) and the Pareto frontier of (peak, extra time) (:func:`frontier`).

* :func:`solve_dp` — exact dynamic program, fast on long chains. It runs from the last unit to the first with the
  state q_i = the peak of units i..n measured from the memory level at the start of unit i's forward:
  q_{n+1} = F and q_i = max(b_i + l_i, r_i + q_{i+1}), so q_1 is the peak and every backward position is checked.
  q_i grows with q_{i+1}, so a state with lower-or-equal q and lower-or-equal cost dominates: the states kept per
  step are exactly the Pareto front of (q, cost). (The forward-order DP over the running sum sum_{j<i} r_j needs
  the peak so far as a third dimension to break ties by peak; this order does not.)

See :mod:`.solver` for the exactness limits (nanosecond costs, bucketed fronts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .chain_problem import (
    ChainProblem,
    ProblemError,
    Solution,
    SolverError,
    Tables,
    infeasible,
    tables,
)

__all__ = ["solve_dp", "frontier", "DEFAULT_BUCKETS", "MAX_EXACT_STATES"]

DEFAULT_BUCKETS = 20_000  # default resolution: budget / 20,000 (~1.2 MiB of a 24 GiB budget)
MAX_EXACT_STATES = 4_096  # the DP front is kept exact up to this many states per step



@dataclass
class _Front:
    q: np.ndarray  # int64, ascending: peak of units i..n above the level at unit i's forward start
    c: np.ndarray  # int64, strictly descending: extra ns of units i..n
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per unit: (pick, offsets, first); see _dp
    exact: bool = True


def _dp(problem: ChainProblem, t: Tables, limit: int | None, resolution: int, max_states: int) -> _Front:
    """Pareto fronts of (q, cost) from the last unit to the first; ``limit`` drops states whose peak must exceed it.

    Option k extends a slice ``first[k]:last[k]`` of the previous front, which is sorted by q: the states that
    can still fit the limit are a prefix, and of the states whose r + q stays under the unit's own backward term
    b + l (they all reach q = b + l) only the last, the cheapest, is not dominated. Candidates are concatenated
    option by option (``offsets``); ``pick`` holds the positions of the kept candidates in that concatenation.
    """
    n = len(problem.units)
    q = np.array([problem.forward_base_bytes], dtype=np.int64)
    c = np.zeros(1, dtype=np.int64)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * n  # type: ignore[list-item]
    exact = True
    for i in range(n - 1, -1, -1):
        r, local, e = t.r[i], t.local[i], t.e[i]
        # the slice of the front each option extends
        first = np.searchsorted(q, local - r, side="right") - 1
        np.maximum(first, 0, out=first)
        if limit is None:
            last = np.full(len(r), len(q))
        else:
            bound = limit - t.prefix_min_r[i]
            last = np.where(local <= bound, np.searchsorted(q, bound - r, side="right"), 0)
        np.maximum(last, first, out=last)
        offsets = np.concatenate([[0], np.cumsum(last - first)])
        if offsets[-1] == 0:
            raise SolverError("the DP lost every state; this is a bug (the budget check passed)")
        parts = range(len(r))
        nq = np.concatenate([np.maximum(local[k], r[k] + q[first[k]:last[k]]) for k in parts])
        nc = np.concatenate([e[k] + c[first[k]:last[k]] for k in parts])
        pick = np.argsort(nq, kind="stable")  # each option's candidates are sorted: timsort merges the runs
        nq, nc = nq[pick], nc[pick]
        # Pareto: keep a state only if it is cheaper than every state before it (lower or equal q) ...
        keep = np.empty(len(nq), dtype=bool)
        keep[0] = True
        np.less(nc[1:], np.minimum.accumulate(nc)[:-1], out=keep[1:])
        # ... and, among kept states of equal q, only the last (the cheapest)
        sel = np.flatnonzero(keep)
        kq = nq[sel]
        keep = np.empty(len(sel), dtype=bool)
        keep[-1] = True
        np.not_equal(kq[:-1], kq[1:], out=keep[:-1])
        sel = sel[keep]
        if len(sel) > max_states and resolution > 1:
            # one state per bucket of q: the cheapest (the last, costs descend), and always the lowest q,
            # so the smallest achievable peak stays reachable
            bucket = nq[sel] // resolution
            keep = np.empty(len(sel), dtype=bool)
            keep[-1] = True
            np.not_equal(bucket[1:], bucket[:-1], out=keep[:-1])
            keep[0] = True
            if not keep.all():
                exact = False
                sel = sel[keep]
        q, c = nq[sel], nc[sel]
        steps[i] = (pick[sel], offsets, first)
    return _Front(q, c, steps, exact)


def _trace(front: _Front, js: np.ndarray) -> np.ndarray:
    """Option indices (one row per final state in ``js``, one column per unit) by following the parents."""
    idx = np.empty((len(js), len(front.steps)), dtype=np.int64)
    for i, (pick, offsets, first) in enumerate(front.steps):
        cand = pick[js]
        k = np.searchsorted(offsets, cand, side="right") - 1
        idx[:, i] = k
        js = first[k] + cand - offsets[k]
    return idx


def _solutions(problem: ChainProblem, t: Tables, idx: np.ndarray, method: str, exact: bool) -> list[Solution]:
    """Solutions for many rows of option indices at once; peaks recomputed with the forward-order formula."""
    rows, n = idx.shape
    peak = np.full(rows, problem.forward_base_bytes, dtype=np.int64)
    retained = np.zeros(rows, dtype=np.int64)
    for i in range(n):
        k = idx[:, i]
        np.maximum(peak, t.local[i][k] + retained, out=peak)
        retained += t.r[i][k]
    np.maximum(peak, problem.forward_base_bytes + retained, out=peak)
    names = [np.array([o.name for o in u.options], dtype=object)[idx[:, i]].tolist()
             for i, u in enumerate(problem.units)]
    costs = np.empty((rows, n), dtype=np.float64)
    for i in range(n):
        costs[:, i] = t.ms[i][idx[:, i]]
    choices = zip(*names) if n else [()] * rows
    return [Solution(ch, pk, math.fsum(cs), method, exact)
            for ch, pk, cs in zip(choices, peak.tolist(), costs.tolist())]


def _resolution(resolution_bytes: int | None, scale: int) -> int:
    if resolution_bytes is None:
        return max(1, scale // DEFAULT_BUCKETS)
    if isinstance(resolution_bytes, bool) or not isinstance(resolution_bytes, int) or resolution_bytes < 0:
        raise ProblemError(f"resolution_bytes must be a non-negative integer, got {resolution_bytes!r}")
    return resolution_bytes


def solve_dp(problem: ChainProblem, resolution_bytes: int | None = None, *,
             max_exact_states: int = MAX_EXACT_STATES) -> Solution:
    """Least extra time within the budget (ties: lower peak), by the DP described in the module doc.

    Exact while every front has at most ``max_exact_states`` states; beyond that, states are thinned to one per
    ``resolution_bytes`` of q (default: budget / 20,000; 0 or 1 never thins). Thinning never yields an
    infeasible plan. Raises :class:`InfeasibleBudget` when no choice fits.
    """
    t = tables(problem)
    err = infeasible(problem, t)
    if err is not None:
        raise err
    front = _dp(problem, t, problem.budget_bytes, _resolution(resolution_bytes, problem.budget_bytes),
                max_exact_states)
    j = int(np.searchsorted(front.q, problem.budget_bytes, side="right")) - 1  # costs descend: the last that fits
    (sol,) = _solutions(problem, t, _trace(front, np.array([j])), "dp", front.exact)
    if sol.peak_bytes != int(front.q[j]) or sol.peak_bytes > problem.budget_bytes:
        raise SolverError(f"DP peak {int(front.q[j])} disagrees with the formula's {sol.peak_bytes}; a bug")
    return sol


def frontier(problem: ChainProblem, resolution_bytes: int | None = None, *,
             max_exact_states: int = MAX_EXACT_STATES, max_points: int | None = None) -> tuple[Solution, ...]:
    """The Pareto frontier of (peak, extra time) over all choices, by increasing peak (and decreasing time).

    The budget is ignored. The first point has the smallest achievable peak, the last the least extra time.
    Exact under the same condition as :func:`solve_dp` (default resolution: the largest peak / 20,000).
    ``max_points`` keeps that many points (at least 2), evenly spread by peak, both ends included: long chains
    can have thousands of points, and each carries one choice per unit.
    """
    t = tables(problem)
    scale = problem.forward_base_bytes
    for i in range(len(problem.units) - 1, -1, -1):  # the largest achievable peak, for the default resolution
        scale = int(np.max(np.maximum(t.local[i], t.r[i] + scale)))
    front = _dp(problem, t, None, _resolution(resolution_bytes, scale), max_exact_states)
    js = np.arange(len(front.q))
    if max_points is not None and len(js) > max(2, max_points):
        targets = np.linspace(front.q[0], front.q[-1], max(2, max_points))
        js = np.unique(np.clip(np.searchsorted(front.q, targets), 0, len(js) - 1))
    points = _solutions(problem, t, _trace(front, js), "frontier", front.exact)
    if [p.peak_bytes for p in points] != front.q[js].tolist():
        raise SolverError("frontier peaks disagree with the formula; this is a bug")
    return tuple(points)

