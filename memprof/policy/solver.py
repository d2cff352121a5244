"""Choosing one option per unit of a chain (keep, checkpoint, ...) so that the step fits a memory budget.

The model: repeated blocks ("units") run forward in order 1..n and backward in order n..1. For each unit the
planner picks one :class:`Option`: its ``retained_bytes`` r stay live from the end of the unit's forward until its
backward, its ``local_bytes`` l are live during its own backward on top of everything else (recomputed
activations included), and ``extra_ms`` is the step time it costs. Unit i also has ``base_bytes`` b_i, live during
its backward whatever is chosen (parameters, grads of units already done, optimizer state, ...), and the problem
has ``forward_base_bytes`` F, live at the end of forward besides the retained activations. The peak of a choice is
the largest of

    end of forward:      F + sum_j r_j
    backward of unit i:  b_i + sum_{j<i} r_j + l_i          (units after i are done, units before still hold r)

and the goal is the least total ``extra_ms`` whose peak fits ``budget_bytes``, ties broken by the lower peak.

Solvers (each one's answer is re-checked with :func:`peak_of`; peak is not monotonic in the choices):

* :func:`solve_dp` — exact dynamic program, fast on long chains. It runs from the last unit to the first with the
  state q_i = the peak of units i..n measured from the memory level at the start of unit i's forward:
  q_{n+1} = F and q_i = max(b_i + l_i, r_i + q_{i+1}), so q_1 is the peak and every backward position is checked.
  q_i grows with q_{i+1}, so a state with lower-or-equal q and lower-or-equal cost dominates: the states kept per
  step are exactly the Pareto front of (q, cost). (The forward-order DP over the running sum sum_{j<i} r_j needs
  the peak so far as a third dimension to break ties by peak; this order does not.)
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

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

from ..errors import MemprofError
from ..units import format_bytes

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

DEFAULT_BUCKETS = 20_000  # default resolution: budget / 20,000 (~1.2 MiB of a 24 GiB budget)
MAX_EXACT_STATES = 4_096  # the DP front is kept exact up to this many states per step
_BRUTE_FORCE_MAX_UNITS = 16
_BRUTE_FORCE_MAX_COMBINATIONS = 1 << 24
_INT_LIMIT = 1 << 62  # all byte and nanosecond sums must stay inside int64
_NS_PER_MS = 1_000_000


class ProblemError(MemprofError, ValueError):
    """A chain problem or a choice is malformed (negative bytes, unknown option, wrong number of choices, ...)."""


class SolverError(MemprofError, RuntimeError):
    """A solver failed on a well-formed problem (e.g. HiGHS hit its time limit without a feasible plan)."""


class InfeasibleBudget(MemprofError):
    """No choice of options fits the budget. ``min_peak_bytes`` is the smallest achievable peak."""

    def __init__(self, min_peak_bytes: int, budget_bytes: int, dominant: PeakTerm | None = None) -> None:
        self.min_peak_bytes = min_peak_bytes
        self.budget_bytes = budget_bytes
        self.dominant = dominant
        where = f", set by {dominant.describe()}" if dominant is not None else ""
        super().__init__(
            f"no plan fits the budget of {format_bytes(budget_bytes)}: the smallest achievable peak is "
            f"{format_bytes(min_peak_bytes)} ({format_bytes(min_peak_bytes - budget_bytes)} over){where}. "
            "Raise the budget or use more levers (precision, sharding) to lower that term."
        )

    def __reduce__(self):  # picklable despite the custom signature (e.g. across processes)
        return (type(self), (self.min_peak_bytes, self.budget_bytes, self.dominant))


def _check_bytes(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _INT_LIMIT:
        raise ProblemError(f"{what} must be a non-negative integer number of bytes, got {value!r}")


@dataclass(frozen=True)
class Option:
    """One way to run a unit: what it keeps for backward, what its backward needs, and what it costs."""

    name: str  # "keep", "full", "selective", ...
    retained_bytes: int  # live from the end of the unit's forward until its backward
    local_bytes: int  # extra bytes live during the unit's own backward (recomputed activations included)
    extra_ms: float = 0.0  # extra step time (recomputation); 0 for keep

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ProblemError(f"option name must be a non-empty string, got {self.name!r}")
        _check_bytes(self.retained_bytes, f"option {self.name!r}: retained_bytes")
        _check_bytes(self.local_bytes, f"option {self.name!r}: local_bytes")
        if isinstance(self.extra_ms, bool) or not isinstance(self.extra_ms, (int, float)):
            raise ProblemError(f"option {self.name!r}: extra_ms must be a number, got {self.extra_ms!r}")
        if not math.isfinite(self.extra_ms):
            raise ProblemError(f"option {self.name!r}: extra_ms must be finite, got {self.extra_ms!r}")
        object.__setattr__(self, "extra_ms", float(self.extra_ms))


@dataclass(frozen=True)
class Unit:
    """One block of the chain and its options. Units with equal non-empty ``structure`` must have equal options."""

    name: str  # module FQN, e.g. "blocks.11"
    options: tuple[Option, ...]
    base_bytes: int  # live during this unit's backward whatever is chosen (params, grads so far, optimizer, ...)
    structure: str = ""  # equal non-empty strings: structurally identical units (per-unit data computed once)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if not all(isinstance(o, Option) for o in self.options):
            raise ProblemError(f"unit {self.name!r}: options must be Option objects")
        if not self.options:
            raise ProblemError(f"unit {self.name!r} has no options")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ProblemError(f"unit {self.name!r} has two options with the same name: {names}")
        _check_bytes(self.base_bytes, f"unit {self.name!r}: base_bytes")

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise ProblemError(f"unit {self.name!r} has no option {name!r} (it has {[o.name for o in self.options]})")


@dataclass(frozen=True)
class ChainProblem:
    """Units in forward order, the bytes live at the end of forward besides them, and the budget."""

    units: tuple[Unit, ...]
    forward_base_bytes: int
    budget_bytes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        _check_bytes(self.forward_base_bytes, "forward_base_bytes")
        _check_bytes(self.budget_bytes, "budget_bytes")
        seen: set[str] = set()
        by_structure: dict[str, Unit] = {}
        worst = self.forward_base_bytes
        worst_ms = 0.0
        for u in self.units:
            if not isinstance(u, Unit):
                raise ProblemError(f"units must be Unit objects, got {type(u).__name__}")
            if u.name in seen:
                raise ProblemError(f"two units are named {u.name!r}")
            seen.add(u.name)
            if u.structure:
                first = by_structure.setdefault(u.structure, u)
                if first.options != u.options:
                    raise ProblemError(
                        f"units {first.name!r} and {u.name!r} share structure {u.structure!r} but not their options"
                    )
            worst += max(o.retained_bytes + o.local_bytes for o in u.options) + u.base_bytes
            worst_ms += max(abs(o.extra_ms) for o in u.options)
        if worst >= _INT_LIMIT or worst_ms * _NS_PER_MS >= _INT_LIMIT:
            raise ProblemError("the problem's byte counts or times are too large to sum in 64 bits")

    def with_budget(self, budget_bytes: int) -> ChainProblem:
        return replace(self, budget_bytes=budget_bytes)


@dataclass(frozen=True)
class Solution:
    """One option name per unit (forward order), its exact peak, its total extra time, and how it was found."""

    choices: tuple[str, ...]
    peak_bytes: int  # recomputed with peak_of
    extra_ms: float  # math.fsum of the chosen options' extra_ms
    method: str  # "dp", "ilp", "brute-force", "frontier"
    exact: bool = True  # False when the DP bucketed states or HiGHS stopped before proving optimality

    def choice_map(self, problem: ChainProblem) -> dict[str, str]:
        """``{unit name: option name}``."""
        return {u.name: c for u, c in zip(problem.units, self.choices)}


@dataclass(frozen=True)
class PeakTerm:
    """One position of the peak formula, split into its parts: ``total = base + retained + local``."""

    position: str  # "forward" (end of forward) or "backward" (of ``unit``)
    unit: str  # "" for the end of forward
    base_bytes: int  # F at the end of forward, b_i in a backward
    retained_bytes: int  # sum of r over all units (forward) or over the units before this one (backward)
    local_bytes: int  # l of this unit's option; 0 at the end of forward

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + self.retained_bytes + self.local_bytes

    def describe(self) -> str:
        fb = format_bytes
        if self.position == "forward":
            return (f"the end of forward: base {fb(self.base_bytes)} + {fb(self.retained_bytes)} retained "
                    "by the units")
        return (f"the backward of unit {self.unit}: base {fb(self.base_bytes)} + {fb(self.retained_bytes)} "
                f"retained by earlier units + {fb(self.local_bytes)} local")


# ---------------------------------------------------------------------------------------------------------------
# The peak of one choice


def _indices(problem: ChainProblem, choices: Sequence[str]) -> list[int]:
    if isinstance(choices, str) or len(choices) != len(problem.units):
        n = len(choices) if not isinstance(choices, str) else "a string"
        raise ProblemError(f"expected one choice per unit ({len(problem.units)}), got {n}")
    out = []
    for u, c in zip(problem.units, choices):
        for k, o in enumerate(u.options):
            if o.name == c:
                out.append(k)
                break
        else:
            u.option(c)  # raises with the unit's option names
    return out


def _terms(problem: ChainProblem, idx: Sequence[int]) -> list[PeakTerm]:
    """Every position of the formula in time order: end of forward, then the backward of units n..1."""
    terms = []
    prefix = 0
    for u, k in zip(problem.units, idx):
        o = u.options[k]
        terms.append(PeakTerm("backward", u.name, u.base_bytes, prefix, o.local_bytes))
        prefix += o.retained_bytes
    terms.append(PeakTerm("forward", "", problem.forward_base_bytes, prefix, 0))
    return terms[::-1]


def peak_of(problem: ChainProblem, choices: Sequence[str]) -> int:
    """The exact peak in bytes of one option name per unit: the largest term of the formula in the module doc."""
    return max(t.total_bytes for t in _terms(problem, _indices(problem, choices)))


def dominant_term(problem: ChainProblem, choices: Sequence[str]) -> PeakTerm:
    """The term that sets the peak of ``choices``; on ties the earliest in time (end of forward, unit n, ...)."""
    return max(_terms(problem, _indices(problem, choices)), key=lambda t: t.total_bytes)


def _extra_ms(problem: ChainProblem, idx: Sequence[int]) -> float:
    return math.fsum(u.options[k].extra_ms for u, k in zip(problem.units, idx))


def _solution(problem: ChainProblem, idx: Sequence[int], method: str, exact: bool = True) -> Solution:
    choices = tuple(u.options[k].name for u, k in zip(problem.units, idx))
    return Solution(choices, max(t.total_bytes for t in _terms(problem, idx)), _extra_ms(problem, idx),
                    method, exact)


# ---------------------------------------------------------------------------------------------------------------
# Per-unit arrays (computed once per structure)


@dataclass(frozen=True)
class _Tables:
    r: list[np.ndarray]  # per unit, int64 per option
    local: list[np.ndarray]  # b_i + l, int64 per option
    e: list[np.ndarray]  # extra time in whole nanoseconds (int64) per option
    ms: list[np.ndarray]  # extra time in ms as given (float64) per option, for reporting
    prefix_min_r: list[int]  # sum over units before i of their smallest r (a lower bound on what they retain)


def _ns(ms: float) -> int:
    return round(ms * _NS_PER_MS)


def _tables(problem: ChainProblem) -> _Tables:
    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = {}
    r, local, e, ms, prefix = [], [], [], [], [0]
    for u in problem.units:
        arrays = cache.get(u.structure) if u.structure else None
        if arrays is None:
            arrays = (
                np.array([o.retained_bytes for o in u.options], dtype=np.int64),
                np.array([o.local_bytes for o in u.options], dtype=np.int64),
                np.array([_ns(o.extra_ms) for o in u.options], dtype=np.int64),
                np.array([o.extra_ms for o in u.options], dtype=np.float64),
                min(o.retained_bytes for o in u.options),
            )
            if u.structure:
                cache[u.structure] = arrays
        r.append(arrays[0])
        local.append(arrays[1] + u.base_bytes)
        e.append(arrays[2])
        ms.append(arrays[3])
        prefix.append(prefix[-1] + arrays[4])
    return _Tables(r, local, e, ms, prefix)


def _min_peak_indices(problem: ChainProblem, t: _Tables) -> tuple[int, list[int]]:
    """Smallest achievable peak and a choice reaching it: q_i = min_o max(b_i + l_o, r_o + q_{i+1}) is exact
    because q_i grows with q_{i+1}."""
    q = problem.forward_base_bytes
    idx = [0] * len(problem.units)
    for i in range(len(problem.units) - 1, -1, -1):
        cand = np.maximum(t.local[i], t.r[i] + q)
        k = int(np.argmin(cand))
        idx[i], q = k, int(cand[k])
    return q, idx


def min_peak(problem: ChainProblem) -> Solution:
    """A choice with the smallest achievable peak (exact; its extra time is not minimised). Ignores the budget."""
    _, idx = _min_peak_indices(problem, _tables(problem))
    return _solution(problem, idx, "min-peak")


def _infeasible(problem: ChainProblem, t: _Tables) -> InfeasibleBudget | None:
    peak, idx = _min_peak_indices(problem, t)
    if peak <= problem.budget_bytes:
        return None
    return InfeasibleBudget(peak, problem.budget_bytes, max(_terms(problem, idx), key=lambda x: x.total_bytes))


# ---------------------------------------------------------------------------------------------------------------
# The dynamic program


@dataclass
class _Front:
    q: np.ndarray  # int64, ascending: peak of units i..n above the level at unit i's forward start
    c: np.ndarray  # int64, strictly descending: extra ns of units i..n
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per unit: (pick, offsets, first); see _dp
    exact: bool = True


def _dp(problem: ChainProblem, t: _Tables, limit: int | None, resolution: int, max_states: int) -> _Front:
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


def _solutions(problem: ChainProblem, t: _Tables, idx: np.ndarray, method: str, exact: bool) -> list[Solution]:
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
    t = _tables(problem)
    err = _infeasible(problem, t)
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
    t = _tables(problem)
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


# ---------------------------------------------------------------------------------------------------------------
# Brute force (tests)


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
        cost = np.concatenate([cost + _ns(o.extra_ms) for o in u.options])
        retained = np.concatenate([retained + o.retained_bytes for o in u.options])
    peak = np.maximum(peak, problem.forward_base_bytes + retained)
    fits = np.flatnonzero(peak <= problem.budget_bytes)
    if len(fits) == 0:
        raise _infeasible(problem, _tables(problem)) or SolverError("brute force and min-peak disagree (a bug)")
    best = int(fits[np.lexsort((peak[fits], cost[fits]))[0]])  # least cost, then lowest peak
    # decode: the concatenations above put the last unit's option outermost
    idx = [0] * n
    block = count
    for i in range(n - 1, -1, -1):
        block //= len(problem.units[i].options)
        idx[i], best = divmod(best, block)
    return _solution(problem, idx, "brute-force")


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
    t = _tables(problem)
    err = _infeasible(problem, t)
    if err is not None:
        raise err
    n = len(problem.units)
    if n == 0:
        return _solution(problem, [], "ilp")
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
        sol = _solution(problem, idx, "ilp", exact)
        if sol.peak_bytes <= problem.budget_bytes:
            return sol
        budget -= sol.peak_bytes - problem.budget_bytes  # HiGHS's tolerance let it slip over: tighten
    raise SolverError("HiGHS returned only plans over the budget (numerical trouble); use solve_dp")


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
