"""Measured option costs (memprof.policy.timing) and how the planner uses them.

Step times are made deterministic by replacing the timer with a known cost law, so the fit and the plan can
be checked against hand-computed values and a brute-force optimum.
"""

import itertools

import pytest

from memprof.policy import timing
from memprof.policy.chain import chain_model, find_units
from memprof.policy.engine import plan
from memprof.policy.solver import peak_of
from memprof.policy.timing import OptionCosts, measure_costs

BASE_S = 0.200
FIRST = {"full": 0.012, "selective": 0.009}  # seconds paid once when a mode is used at all
PER_UNIT = {"full": 0.007, "selective": 0.003}  # seconds per unit in that mode


def _law(step, the_plan, model):
    step()
    if the_plan is None:
        return BASE_S
    modes = [c.mode for c in the_plan.checkpoint]
    return BASE_S + sum(FIRST[m] + PER_UNIT[m] * modes.count(m) for m in FIRST if m in modes)


def test_costs_fit_the_once_per_mode_surcharge_and_the_per_unit_slope(gpt, monkeypatch):
    model, _, step, prof = gpt
    monkeypatch.setattr(timing, "_timed", _law)
    costs = measure_costs(model, step, prof, reps=3)
    units = find_units(prof)
    assert costs.base_step_ms == pytest.approx(BASE_S * 1e3)
    for mode in FIRST:
        assert costs.first_unit_ms[mode] == pytest.approx(FIRST[mode] * 1e3)
        # Identical blocks: the slope is shared equally.
        assert [costs.extra_ms[mode][u] for u in units] == pytest.approx([PER_UNIT[mode] * 1e3] * len(units))
    assert costs.surcharge_ms(["keep", "full", "full"]) == pytest.approx(FIRST["full"] * 1e3)


def test_plan_with_surcharges_is_the_brute_force_optimum(gpt):
    _, _, _, prof = gpt
    units = find_units(prof)
    costs = OptionCosts(BASE_S * 1e3, {m: {u: PER_UNIT[m] * 1e3 for u in units} for m in PER_UNIT}, 1,
                        {m: FIRST[m] * 1e3 for m in FIRST})
    cm = chain_model(prof, prof.peak_bytes, units, extra_ms=costs.extra_ms)
    everything = list(itertools.product(("keep", "full", "selective"), repeat=len(units)))
    peaks = {c: max(cm.floor_bytes, peak_of(cm.problem, c)) for c in everything}
    lo = min(peaks.values())
    checked = 0
    for frac in (0.15, 0.3, 0.5, 0.7, 0.9, 1.0):
        budget = int(lo + frac * (prof.peak_bytes - lo))
        fits = [c for c in everything if peaks[c] <= budget]

        def cost(c):
            return sum(PER_UNIT[m] * 1e3 for m in c if m != "keep") + costs.surcharge_ms(c)

        best = min(cost(c) for c in fits)
        p = plan(prof, budget, costs=costs)
        got = tuple(ch.mode for ch in p.checkpoint)
        assert peaks[got] <= budget
        assert cost(got) == pytest.approx(best)
        assert p.predicted_step_ms == pytest.approx(BASE_S * 1e3 + best)
        checked += best > 0
    assert checked >= 3
