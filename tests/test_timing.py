"""Measured option costs (memprof.policy.timing) and how the planner uses them.

Step times are made deterministic by replacing the timer with a known cost law, so the fit and the plan can
be checked against hand-computed values and a brute-force optimum.
"""

import itertools

import pytest

from memprof.policy import timing
from memprof.policy.chain import chain_model, find_units
from memprof.policy.engine import plan
from memprof.policy.solver import min_peak, peak_of
from memprof.policy.timing import OptionCosts, measure_costs

BASE_S = 0.200
PER_UNIT = {"full": 0.007, "selective": 0.003}  # seconds per unit in that mode
LAST = {"full": 0.010, "selective": 0.008}  # seconds more when the last unit uses that mode


def _law(step, the_plan, model):
    step()
    return _cost_law(the_plan)


def _cost_law(the_plan):
    """Seconds per step: each checkpointed unit costs PER_UNIT, the last one LAST more."""
    if the_plan is None:
        return BASE_S
    modes = [c.mode for c in the_plan.checkpoint]
    return BASE_S + sum(PER_UNIT[m] * modes.count(m) for m in PER_UNIT) + LAST.get(modes[-1], 0.0)


def _law_costs(units) -> OptionCosts:
    """The cost law as OptionCosts (what measure_costs should find)."""
    return OptionCosts(BASE_S * 1e3, {m: {u: (PER_UNIT[m] + (LAST[m] if u == units[-1] else 0.0)) * 1e3
                                          for u in units} for m in PER_UNIT}, 1)


def test_costs_are_the_last_unit_alone_and_the_others_share_of_the_rest(gpt, monkeypatch):
    model, _, step, prof = gpt
    monkeypatch.setattr(timing, "_timed", _law)
    costs = measure_costs(model, step, prof, reps=3)
    units = find_units(prof)
    assert costs.base_step_ms == pytest.approx(BASE_S * 1e3)
    for mode in PER_UNIT:
        # Identical blocks: the others share the rest equally; the last one costs what it cost alone.
        assert [costs.extra_ms[mode][u] for u in units] == pytest.approx(
            [PER_UNIT[mode] * 1e3] * (len(units) - 1) + [(PER_UNIT[mode] + LAST[mode]) * 1e3])
    for mode, per in _law_costs(units).extra_ms.items():
        assert costs.extra_ms[mode] == pytest.approx(per)
    # Additive under the law: any plan's overhead is what the fitted costs predict.
    for budget in (0.9, 0.75):
        p = plan(prof, int(budget * prof.peak_bytes), costs=costs)
        assert timing.predicted_overhead(costs, p) == pytest.approx(_cost_law(p) / BASE_S - 1)


def test_plan_with_measured_costs_is_the_brute_force_optimum(gpt):
    _, _, _, prof = gpt
    units = find_units(prof)
    costs = OptionCosts(BASE_S * 1e3, {m: {u: PER_UNIT[m] * 1e3 for u in units} for m in PER_UNIT}, 1)
    cm = chain_model(prof, prof.peak_bytes, units, extra_ms=costs.extra_ms)
    everything = list(itertools.product(("keep", "full", "selective"), repeat=len(units)))
    peaks = {c: max(cm.floor_bytes, peak_of(cm.problem, c)) for c in everything}
    lo = min(peaks.values())
    checked = 0
    for frac in (0.15, 0.3, 0.5, 0.7, 0.9, 1.0):
        budget = int(lo + frac * (prof.peak_bytes - lo))
        fits = [c for c in everything if peaks[c] <= budget]

        def cost(c):
            return sum(PER_UNIT[m] * 1e3 for m in c if m != "keep")

        best = min(cost(c) for c in fits)
        p = plan(prof, budget, costs=costs)
        got = tuple(ch.mode for ch in p.checkpoint)
        assert peaks[got] <= budget
        assert cost(got) == pytest.approx(best)
        assert p.predicted_step_ms == pytest.approx(BASE_S * 1e3 + best)
        # The plan's overhead, recomputed from the costs alone (as verify_overheads re-predicts it).
        assert timing.predicted_overhead(costs, p) == pytest.approx(p.predicted_overhead)
        checked += best > 0
    assert checked >= 3


def test_median_stderr_is_the_mad_based_normal_value():
    ratios = [1.00, 1.02, 1.04, 1.06, 1.08]  # median 1.04, absolute deviations 0.04 0.02 0 0.02 0.04 -> MAD 0.02
    assert timing.median_stderr(ratios) == pytest.approx(1.2533 * 1.4826 * 0.02 / 5**0.5)
    # One stalled step does not move it.
    assert timing.median_stderr(ratios[:-1] + [3.0]) == pytest.approx(timing.median_stderr(ratios))
    assert timing.median_stderr([1.1]) == float("inf")


def _scripted(ratios_in_turn):
    """A _timed stand-in: plain steps take 1 s, planned ones the next ratio of the script."""
    it = iter(ratios_in_turn)

    def timed(step, the_plan, model):
        return 1.0 if the_plan is None else next(it)
    return timed


def test_paired_timing_adds_pairs_until_the_stderr_is_that_share_of_the_overhead(monkeypatch):
    quiet = [1.10, 1.101, 1.099] * 200  # a 10% overhead, +-0.1 pp: the minimum number of pairs is enough
    monkeypatch.setattr(timing, "_timed", _scripted(quiet))
    t = timing.time_overhead(None, lambda: None, object(), reps=9, stderr=0.05, max_reps=500)
    assert t.pairs == 9 and t.overhead == pytest.approx(0.10) and t.base_ms == pytest.approx(1000.0)

    noisy = [1.03, 1.00, 1.06] * 400  # a 3% overhead, +-3 pp
    monkeypatch.setattr(timing, "_timed", _scripted(noisy))
    t = timing.time_overhead(None, lambda: None, object(), reps=9, stderr=0.1, max_reps=1000)
    # MAD 0.03 -> stderr 1.2533 * 1.4826 * 0.03 / sqrt(n) <= 0.1 * 0.03 needs n >= (1.2533 * 1.4826 / 0.1)^2.
    need = (1.2533 * 1.4826 / 0.1) ** 2
    assert need <= t.pairs <= need + 3
    assert t.stderr <= 0.1 * 0.03 + 1e-12
    # Never asked for better than 0.2 percentage points: a 0.05 share of 3% would be 0.15.
    monkeypatch.setattr(timing, "_timed", _scripted(noisy))
    t = timing.time_overhead(None, lambda: None, object(), reps=9, stderr=0.05, max_reps=1000)
    need = (1.2533 * 1.4826 * 0.03 / 0.002) ** 2
    assert need <= t.pairs <= need + 3

    monkeypatch.setattr(timing, "_timed", _scripted(noisy))
    assert timing.time_overhead(None, lambda: None, object(), reps=9, stderr=0.05, max_reps=40).pairs == 40
    monkeypatch.setattr(timing, "_timed", _scripted(noisy))
    assert timing.time_overhead(None, lambda: None, object(), reps=9).pairs == 9  # no stderr asked: a count


@pytest.mark.slow
def test_measure_costs_records_pairs_per_configuration(gpt, monkeypatch):
    model, _, step, prof = gpt
    monkeypatch.setattr(timing, "_timed", _law)
    costs = measure_costs(model, step, prof, reps=3, stderr=0.1, max_reps=10)
    # The cost law has no noise: the minimum is enough for every configuration.
    assert set(costs.pairs) == {"full", "selective", "full@1", "selective@1"}
    assert all(n == 3 and se == 0.0 for n, se in costs.pairs.values())


def _drifting(per_call):
    """A _timed stand-in following the cost law on a machine where checkpointing's extra time grows by
    ``per_call`` (a share) with every step timed (a slowdown of the whole step would cancel in the paired
    ratios; this does not), recording what it timed."""
    calls = []

    def timed(step, the_plan, model):
        calls.append(the_plan)
        return BASE_S + (_cost_law(the_plan) - BASE_S) * (1 + per_call * len(calls))
    return timed, calls


def test_verify_overheads_times_costs_and_plans_in_the_same_rounds(gpt, monkeypatch):
    model, _, step, prof = gpt
    units = find_units(prof)
    costs = _law_costs(units)
    cm = chain_model(prof, prof.peak_bytes, units)
    lo = max(cm.floor_bytes, min_peak(cm.problem).peak_bytes)
    plans = {"a": plan(prof, int(lo + 0.6 * (prof.peak_bytes - lo)), costs=costs),
             "b": plan(prof, int(lo + 0.05 * (prof.peak_bytes - lo)), costs=costs)}
    assert all(any(c.mode != "keep" for c in p.checkpoint) for p in plans.values())

    # A steady machine: the fitted costs are the law's and each plan measures what they predict.
    monkeypatch.setattr(timing, "_timed", lambda step, the_plan, model: _cost_law(the_plan))
    fitted, timings = timing.verify_overheads(model, step, prof, plans, reps=3)
    for mode, per in costs.extra_ms.items():
        assert fitted.extra_ms[mode] == pytest.approx(per)
    for label, p in plans.items():
        assert timings[label].pairs == 3
        assert timings[label].overhead == pytest.approx(timing.predicted_overhead(fitted, p))
        assert timings[label].overhead == pytest.approx(p.predicted_overhead)

    # Rounds: after the warm-up, each round times every configuration once, each next to a plain step,
    # plain first in even rounds and second (configurations reversed) in odd ones.
    timed, calls = _drifting(0.0)
    monkeypatch.setattr(timing, "_timed", timed)
    timing.verify_overheads(model, step, prof, plans, reps=2)
    n_configs = 4 + len(plans)
    rounds = [calls[i * 2 * n_configs:(i + 1) * 2 * n_configs] for i in range(2)]
    assert len(calls) == 2 * 2 * n_configs
    assert all(c is None for c in rounds[0][0::2]) and all(c is not None for c in rounds[0][1::2])
    assert all(c is None for c in rounds[1][1::2]) and all(c is not None for c in rounds[1][0::2])
    assert rounds[1][0::2] == rounds[0][1::2][::-1]
    assert rounds[0][-1] is plans["b"] and plans["a"] != plans["b"]

    # Checkpointing getting 0.2% dearer with every step: costs timed first and a plan timed afterwards disagree
    # by the drift; timed in the same rounds they agree to well within it.
    timed, _ = _drifting(0.002)
    monkeypatch.setattr(timing, "_timed", timed)
    early = measure_costs(model, step, prof, reps=9)
    late = {label: timing.time_overhead(model, step, p, reps=9).overhead for label, p in plans.items()}
    fitted, timings = timing.verify_overheads(model, step, prof, plans, reps=9)
    for label, p in plans.items():
        apart = abs(late[label] - timing.predicted_overhead(early, p))
        together = abs(timings[label].overhead - timing.predicted_overhead(fitted, p))
        assert apart > 0.005 and together < apart / 3, (apart, together)


@pytest.mark.parametrize("env, libc, noted", [
    ({}, "glibc", True),
    ({"MALLOC_MMAP_MAX_": "0"}, "glibc", False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "glibc", False),
    ({}, "", False),
])
def test_plans_with_cpu_costs_say_when_the_allocator_unmaps_freed_memory(gpt, monkeypatch, env, libc, noted):
    _, _, _, prof = gpt
    for k in ("MALLOC_MMAP_MAX_", "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(timing.platform, "libc_ver", lambda: (libc, "2.35"))
    units = find_units(prof)
    with_costs = plan(prof, int(0.8 * prof.peak_bytes), costs=_law_costs(units))
    without = plan(prof, int(0.8 * prof.peak_bytes))
    said = [v for v in with_costs.assumptions.values() if "glibc's default malloc" in v]
    assert len(said) == (1 if noted else 0)
    assert not any("malloc" in v for v in without.assumptions.values())
