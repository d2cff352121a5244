"""The chain solvers: the DP and the MILP agree with brute force, the frontier with every budget's optimum.

Costs in the random chains are multiples of 1/8 ms, so float sums are exact and "equal" means equal.
"""

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memprof.policy.solver import (
    ChainProblem,
    InfeasibleBudget,
    Option,
    ProblemError,
    Unit,
    dominant_term,
    frontier,
    min_peak,
    peak_of,
    solve,
    solve_brute_force,
    solve_dp,
    solve_ilp,
)
from memprof.units import format_bytes

GiB = 1 << 30
MiB = 1 << 20
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def chains(draw, min_units=0, max_units=14, max_combinations=1 << 17, infeasible=True):
    """A random chain; its budget is the peak of a random choice (so exactly on a boundary), moved a little."""
    n = draw(st.integers(min_units, max_units))
    scale = draw(st.sampled_from([1, 1000, GiB // 100]))
    small = st.integers(0, 100).map(lambda x: x * scale)
    combos = 1
    units = []
    for i in range(n):
        k = draw(st.integers(2, 3)) if combos * 3 <= max_combinations else 2
        combos *= k
        opts = [
            Option(name, draw(small), draw(small), draw(st.integers(0, 80)) / 8)
            for name in ("keep", "selective", "full")[:k]
        ]
        units.append(Unit(f"blocks.{i}", opts, draw(st.integers(0, 300).map(lambda x: x * scale))))
    problem = ChainProblem(units, draw(st.integers(0, 300).map(lambda x: x * scale)), 0)
    pick = tuple(draw(st.sampled_from([o.name for o in u.options])) for u in units)
    budget = peak_of(problem, pick) + draw(st.sampled_from([0, 0, -1, 1, scale * draw(st.integers(-50, 50))]))
    if infeasible and draw(st.booleans()) and draw(st.booleans()):
        budget = draw(st.integers(0, max(0, budget)))
    return problem.with_budget(max(0, budget))


def _optimum(problem):
    """(extra_ms, peak) of the brute-force optimum, or ("infeasible", min peak)."""
    try:
        s = solve_brute_force(problem)
    except InfeasibleBudget as e:
        return "infeasible", e.min_peak_bytes
    return s.extra_ms, s.peak_bytes


def _outcome(solver, problem):
    try:
        s = solver(problem)
    except InfeasibleBudget as e:
        return "infeasible", e.min_peak_bytes
    assert s.peak_bytes == peak_of(problem, s.choices) <= problem.budget_bytes
    assert s.extra_ms == math.fsum(u.option(c).extra_ms for u, c in zip(problem.units, s.choices))
    return s.extra_ms, s.peak_bytes


def _hand_problem(budget=10**6):
    #            keep: r, l, ms         full: r, l, ms        base b
    units = [
        Unit("a", [Option("keep", 10, 3, 0.0), Option("full", 1, 12, 2.0)], 100),
        Unit("b", [Option("keep", 20, 5, 0.0), Option("full", 2, 25, 3.0)], 90),
        Unit("c", [Option("keep", 30, 7, 0.0), Option("full", 3, 37, 4.0)], 80),
    ]
    return ChainProblem(units, forward_base_bytes=50, budget_bytes=budget)


# ---------------------------------------------------------------------------------------------------------------
# peak_of and the reference


def test_peak_of_hand_computed_example():
    p = _hand_problem()
    # keep, keep, keep: forward 50+10+20+30 = 110; backward c: 80+30+7 = 117; b: 90+10+5 = 105; a: 100+0+3 = 103
    assert peak_of(p, ("keep", "keep", "keep")) == 117
    # full, keep, full: forward 50+1+20+3 = 74; c: 80+21+37 = 138; b: 90+1+5 = 96; a: 100+12 = 112
    assert peak_of(p, ("full", "keep", "full")) == 138
    # full, full, keep: forward 50+1+2+30 = 83; c: 80+3+7 = 90; b: 90+1+25 = 116; a: 100+12 = 112
    assert peak_of(p, ["full", "full", "keep"]) == 116
    t = dominant_term(p, ("full", "full", "keep"))
    assert (t.position, t.unit, t.base_bytes, t.retained_bytes, t.local_bytes) == ("backward", "b", 90, 1, 25)
    assert dominant_term(p, ("keep",) * 3).unit == "c"


def test_peak_of_counts_the_end_of_forward():
    p = ChainProblem([Unit("a", [Option("keep", 500, 0)], 0), Unit("b", [Option("keep", 500, 0)], 0)], 7, 10**6)
    assert peak_of(p, ("keep", "keep")) == 1007
    assert dominant_term(p, ("keep", "keep")).position == "forward"


def test_peak_of_rejects_bad_choices():
    p = _hand_problem()
    with pytest.raises(ProblemError, match="one choice per unit"):
        peak_of(p, ("keep", "keep"))
    with pytest.raises(ProblemError, match="unit 'b' has no option 'selective'"):
        peak_of(p, ("keep", "selective", "keep"))


@settings(max_examples=40, **SETTINGS)
@given(chains(max_units=6))
def test_brute_force_matches_plain_enumeration(problem):
    best, lowest = None, None
    for choice in itertools.product(*[[o.name for o in u.options] for u in problem.units]):
        peak = peak_of(problem, choice)
        cost = math.fsum(u.option(c).extra_ms for u, c in zip(problem.units, choice))
        lowest = peak if lowest is None else min(lowest, peak)
        if peak <= problem.budget_bytes and (best is None or (cost, peak) < best):
            best = (cost, peak)
    assert _optimum(problem) == (best or ("infeasible", lowest))


# ---------------------------------------------------------------------------------------------------------------
# DP and ILP against brute force


@settings(max_examples=150, **SETTINGS)
@given(chains())
def test_dp_equals_brute_force(problem):
    assert _outcome(solve_dp, problem) == _optimum(problem)


@settings(max_examples=40, **SETTINGS)
@given(chains(max_units=10))
def test_ilp_equals_brute_force(problem):
    assert _outcome(solve_ilp, problem) == _optimum(problem)


@settings(max_examples=60, **SETTINGS)
@given(chains(), st.sampled_from([1, 4, 16]))
def test_dp_thinned_to_a_few_states_stays_feasible(problem, max_states):
    """Thinning the front (forced here) may cost optimality, never feasibility, and keeps every feasible budget
    solvable."""
    res = max(1, problem.budget_bytes // 50)
    expected = _optimum(problem)
    got = _outcome(lambda p: solve_dp(p, res, max_exact_states=max_states), problem)
    if expected[0] == "infeasible":
        assert got == expected
    else:
        assert got[0] != "infeasible" and got[0] >= expected[0]


@settings(max_examples=8, **SETTINGS)
@given(chains(min_units=30, max_units=200, max_combinations=1 << 400, infeasible=False))
def test_dp_matches_ilp_on_long_chains(problem):
    dp, ilp = _outcome(solve_dp, problem), _outcome(solve_ilp, problem)
    if dp[0] == "infeasible":
        assert dp == ilp
    else:
        assert dp[0] == pytest.approx(ilp[0], rel=1e-3, abs=1e-9)


def test_identical_blocks_share_their_tables_and_solve_like_the_ilp():
    block = [Option("keep", 300 * MiB, 150 * MiB), Option("selective", 120 * MiB, 330 * MiB, 0.6),
             Option("full", 8 * MiB, 450 * MiB, 4.0)]
    units = [Unit(f"blocks.{i}", block, 20 * GiB + (23 - i) * 10 * MiB, structure="block") for i in range(24)]
    p = ChainProblem(units, 22 * GiB, 24 * GiB)
    dp, ilp = solve_dp(p), solve_ilp(p)
    assert dp.exact and dp.peak_bytes <= p.budget_bytes
    assert dp.extra_ms == pytest.approx(ilp.extra_ms, abs=1e-9)
    assert solve(p) == dp


def test_units_sharing_a_structure_must_share_their_options():
    with pytest.raises(ProblemError, match="share structure 'block' but not their options"):
        ChainProblem([Unit("a", [Option("keep", 1, 1)], 0, "block"), Unit("b", [Option("keep", 2, 1)], 0, "block")],
                     0, 10)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Option("keep", -1, 0), "retained_bytes must be a non-negative integer"),
        (lambda: Option("keep", 1.5, 0), "retained_bytes must be a non-negative integer"),
        (lambda: Option("keep", True, 0), "retained_bytes must be a non-negative integer"),
        (lambda: Option("full", 1, 1, float("nan")), "extra_ms must be finite"),
        (lambda: Unit("a", [], 0), "has no options"),
        (lambda: Unit("a", [Option("keep", 1, 1), Option("keep", 2, 2)], 0), "same name"),
        (lambda: ChainProblem([Unit("a", [Option("k", 1, 1)], 0)] * 2, 0, 1), "two units are named 'a'"),
        (lambda: ChainProblem([], 0, -5), "budget_bytes must be a non-negative integer"),
    ],
)
def test_malformed_problems_are_rejected(make, match):
    with pytest.raises(ProblemError, match=match):
        make()


def test_brute_force_refuses_more_than_16_units():
    units = [Unit(f"u{i}", [Option("keep", 1, 1)], 0) for i in range(17)]
    with pytest.raises(ProblemError, match="brute force is for small problems"):
        solve_brute_force(ChainProblem(units, 0, 10**6))


def test_empty_chain_is_the_forward_base():
    p = ChainProblem([], 40, 100)
    for solver in (solve_dp, solve_ilp, solve_brute_force):
        s = solver(p)
        assert (s.choices, s.peak_bytes, s.extra_ms) == ((), 40, 0.0)
    assert [(s.peak_bytes, s.extra_ms) for s in frontier(p)] == [(40, 0.0)]


def test_ties_in_time_go_to_the_lower_peak():
    # both options of "b" cost nothing; "low" peaks lower
    units = [Unit("a", [Option("keep", 10, 0)], 0), Unit("b", [Option("high", 50, 0), Option("low", 5, 0)], 0)]
    p = ChainProblem(units, 0, 1000)
    for solver in (solve_dp, solve_ilp, solve_brute_force):
        assert solver(p).choices == ("keep", "low")


# ---------------------------------------------------------------------------------------------------------------
# The frontier


@settings(max_examples=60, **SETTINGS)
@given(chains(max_units=10, max_combinations=1 << 12))
def test_frontier_is_non_dominated_and_gives_every_budgets_optimum(problem):
    points = frontier(problem)
    peaks = [p.peak_bytes for p in points]
    costs = [p.extra_ms for p in points]
    assert peaks == sorted(set(peaks)) and costs == sorted(set(costs), reverse=True)
    for p in points:
        assert p.peak_bytes == peak_of(problem, p.choices) and p.exact
    assert peaks[0] == min_peak(problem).peak_bytes
    # every budget's optimum is the frontier's best point under it: at, just below and between its peaks
    budgets = {problem.budget_bytes, 0}
    for a, b in zip(peaks, peaks[1:] + [peaks[-1] + 10]):
        budgets |= {a, a - 1, (a + b) // 2}
    for budget in sorted(x for x in budgets if x >= 0):
        under = [p for p in points if p.peak_bytes <= budget]
        expected = (under[-1].extra_ms, under[-1].peak_bytes) if under else ("infeasible", peaks[0])
        assert _optimum(problem.with_budget(budget)) == expected


def test_frontier_of_the_hand_example():
    # the 8 choices' (peak, ms): kkk 117/0, kkf 147/4, kfk 125/3, kff 129/7, fkk 112/2, fkf 138/6, ffk 116/5, fff 120/9
    got = [(p.peak_bytes, p.extra_ms, p.choices) for p in frontier(_hand_problem())]
    assert got == [(112, 2.0, ("full", "keep", "keep")), (117, 0.0, ("keep", "keep", "keep"))]
    assert solve_dp(_hand_problem(116)).choices == ("full", "keep", "keep")
    assert solve_dp(_hand_problem(117)).choices == ("keep", "keep", "keep")


def test_frontier_max_points_keeps_both_ends_of_a_long_chain():
    opts = [Option("keep", 300 * MiB, 150 * MiB), Option("selective", 120 * MiB, 330 * MiB, 0.625),
            Option("full", 8 * MiB, 450 * MiB, 4.0)]
    p = ChainProblem([Unit(f"blocks.{i}", opts, 20 * GiB, "block") for i in range(64)], 22 * GiB, 24 * GiB)
    full = frontier(p)
    few = frontier(p, max_points=5)
    assert len(full) > 5 and 2 <= len(few) <= 5
    assert few[0] == full[0] and few[-1] == full[-1] and set(few) <= set(full)
    assert full[0].peak_bytes == min_peak(p).peak_bytes and full[-1].extra_ms == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Infeasible budgets


def test_infeasible_budget_states_the_smallest_peak_and_what_sets_it():
    # blocks.11 runs backward first, with the largest base; each unit can keep (r 1 GiB, l 512 MiB) or
    # recompute (r 128 MiB, l 1 GiB). Smallest peak: its base + 11 recomputed inputs + its own keep's local.
    base_11 = int(26.9 * GiB)
    opts = [Option("keep", GiB, GiB // 2), Option("full", GiB // 8, GiB, 5.0)]
    units = [Unit(f"blocks.{i}", opts, base_11 if i == 11 else 20 * GiB, "block") for i in range(12)]
    p = ChainProblem(units, 10 * GiB, 24 * GiB)
    best = base_11 + 11 * (GiB // 8) + GiB // 2
    with pytest.raises(InfeasibleBudget) as info:
        solve_dp(p)
    e = info.value
    assert (e.min_peak_bytes, e.budget_bytes) == (best, 24 * GiB)
    assert str(e) == (
        f"no plan fits the budget of 24.00 GiB: the smallest achievable peak is {format_bytes(best)} "
        f"({format_bytes(best - 24 * GiB)} over), set by the backward of unit blocks.11: base 26.90 GiB + "
        "1.38 GiB retained by earlier units + 512.00 MiB local. "
        "Raise the budget or use more levers (precision, sharding) to lower that term."
    )
    # the same error from every solver, and the stated peak is exactly the smallest that fits
    for solver in (solve_ilp, solve_brute_force, solve):
        with pytest.raises(InfeasibleBudget) as info:
            solver(p)
        assert info.value.min_peak_bytes == best
    assert solve_brute_force(p.with_budget(best)).peak_bytes == best
    with pytest.raises(InfeasibleBudget):
        solve_brute_force(p.with_budget(best - 1))


def test_solve_rejects_an_unknown_method():
    with pytest.raises(ProblemError, match="unknown method 'greedy'"):
        solve(_hand_problem(), method="greedy")


def test_errors_survive_pickling_and_the_policy_modules_do_not_import_torch():
    import ast
    import pickle
    from pathlib import Path

    import memprof.plans
    import memprof.policy.chain_problem
    import memprof.policy.solver
    import memprof.policy.solver_dp
    import memprof.policy.solver_exact

    with pytest.raises(InfeasibleBudget) as info:
        solve_dp(_hand_problem(100))
    again = pickle.loads(pickle.dumps(info.value))
    assert (str(again), again.min_peak_bytes, again.budget_bytes) == (str(info.value), 112, 100)
    for module in (memprof.policy.solver, memprof.policy.chain_problem, memprof.policy.solver_dp,
                   memprof.policy.solver_exact, memprof.plans):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not any(name.split(".")[0] == "torch" for name in imported), module.__name__
