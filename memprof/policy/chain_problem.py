"""The chain problem the planner solves: units of a chain, their options, and the exact peak of a choice.

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

The solvers are in :mod:`.solver` (:func:`.solver.solve`); this module holds the problem, the choice's peak
(:func:`peak_of`, :func:`dominant_term`), the per-unit arrays the solvers share and the smallest peak
(:func:`min_peak`). All bytes and nanosecond sums are integers inside int64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import MemprofError
from ..units import format_bytes

__all__ = ["Option", "Unit", "ChainProblem", "Solution", "PeakTerm", "ProblemError", "InfeasibleBudget",
           "SolverError", "peak_of", "dominant_term", "min_peak"]

_INT_LIMIT = 1 << 62  # all byte and nanosecond sums must stay inside int64
_NS_PER_MS = 1_000_000


class ProblemError(MemprofError, ValueError):
    """A chain problem or a choice is malformed (negative bytes, unknown option, wrong number of choices, ...)."""


class SolverError(MemprofError, RuntimeError):
    """A solver failed on a well-formed problem (e.g. HiGHS hit its time limit without a feasible plan)."""


class InfeasibleBudget(MemprofError):
    """No choice fits the budget: of a chain's options (the solvers) or of the levers' configurations (the
    planner, which says in ``message`` which configuration came closest and what would help).
    ``min_peak_bytes`` is the smallest achievable peak; ``dominant`` the term that sets it, when known."""

    def __init__(self, min_peak_bytes: int, budget_bytes: int, dominant: PeakTerm | None = None,
                 message: str | None = None) -> None:
        self.min_peak_bytes = min_peak_bytes
        self.budget_bytes = budget_bytes
        self.dominant = dominant
        self.message = message
        where = f", set by {dominant.describe()}" if dominant is not None else ""
        super().__init__(message or (
            f"no plan fits the budget of {format_bytes(budget_bytes)}: the smallest achievable peak is "
            f"{format_bytes(min_peak_bytes)} ({format_bytes(min_peak_bytes - budget_bytes)} over){where}. "
            "Raise the budget or use more levers (precision, sharding) to lower that term."
        ))

    def __reduce__(self):  # picklable despite the custom signature (e.g. across processes)
        return (type(self), (self.min_peak_bytes, self.budget_bytes, self.dominant, self.message))


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


def solution(problem: ChainProblem, idx: Sequence[int], method: str, exact: bool = True) -> Solution:
    choices = tuple(u.options[k].name for u, k in zip(problem.units, idx))
    return Solution(choices, max(t.total_bytes for t in _terms(problem, idx)), _extra_ms(problem, idx),
                    method, exact)


# ---------------------------------------------------------------------------------------------------------------
# Per-unit arrays (computed once per structure)


@dataclass(frozen=True)
class Tables:
    r: list[np.ndarray]  # per unit, int64 per option
    local: list[np.ndarray]  # b_i + l, int64 per option
    e: list[np.ndarray]  # extra time in whole nanoseconds (int64) per option
    ms: list[np.ndarray]  # extra time in ms as given (float64) per option, for reporting
    prefix_min_r: list[int]  # sum over units before i of their smallest r (a lower bound on what they retain)


def ns(ms: float) -> int:
    return round(ms * _NS_PER_MS)


def tables(problem: ChainProblem) -> Tables:
    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = {}
    r, local, e, ms, prefix = [], [], [], [], [0]
    for u in problem.units:
        arrays = cache.get(u.structure) if u.structure else None
        if arrays is None:
            arrays = (
                np.array([o.retained_bytes for o in u.options], dtype=np.int64),
                np.array([o.local_bytes for o in u.options], dtype=np.int64),
                np.array([ns(o.extra_ms) for o in u.options], dtype=np.int64),
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
    return Tables(r, local, e, ms, prefix)


def _min_peak_indices(problem: ChainProblem, t: Tables) -> tuple[int, list[int]]:
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
    _, idx = _min_peak_indices(problem, tables(problem))
    return solution(problem, idx, "min-peak")


def infeasible(problem: ChainProblem, t: Tables) -> InfeasibleBudget | None:
    peak, idx = _min_peak_indices(problem, t)
    if peak <= problem.budget_bytes:
        return None
    return InfeasibleBudget(peak, problem.budget_bytes, max(_terms(problem, idx), key=lambda x: x.total_bytes))


