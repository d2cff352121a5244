"""The policy engine: the chain model against measurement, plans against the budget, and clear refusals."""

import dataclasses
import math

import pytest

import memprof
from memprof.plans import CheckpointChoice
from memprof.policy.apply import apply
from memprof.policy.chain import chain_model, find_units
from memprof.policy.chain_problem import InfeasibleBudget
from memprof.policy.engine import plan
from memprof.policy.solver import frontier, peak_of
from memprof.zoo import GPT, gpt_batch
from tests.common import POLICY_GPT

CFG = POLICY_GPT


def _measure(model, opt, step, the_plan, steps=2):
    with apply(model, the_plan):
        with memprof.track(model, opt) as tracker:
            for _ in range(steps):
                step()
    return tracker.profile.peak_bytes


def test_units_are_the_repeated_blocks_in_forward_order(gpt):
    *_, prof = gpt
    assert find_units(prof) == [f"blocks.{i}" for i in range(6)]


def test_chain_model_reproduces_the_measured_peak_when_everything_is_kept(gpt):
    *_, prof = gpt
    model = chain_model(prof, prof.peak_bytes)
    assert model.peak(["keep"] * 6) == prof.peak_bytes


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_chain_model_predicts_uniform_checkpointing_to_the_byte(gpt, mode):
    model, opt, step, prof = gpt
    cm = chain_model(prof, prof.peak_bytes)
    the_plan = plan(prof, prof.peak_bytes)
    uniform = dataclasses.replace(the_plan, checkpoint=tuple(CheckpointChoice(f"blocks.{i}", mode) for i in range(6)))
    assert _measure(model, opt, step, uniform) == cm.peak([mode] * 6)


@pytest.mark.parametrize("fraction", [0.95, 0.85, 0.76])
def test_plans_meet_the_budget_and_measure_as_predicted(gpt, fraction):
    model, opt, step, prof = gpt
    budget = int(prof.peak_bytes * fraction)
    the_plan = plan(prof, budget)
    assert the_plan.predicted_peak_bytes <= budget
    measured = _measure(model, opt, step, the_plan)
    assert measured <= budget
    assert abs(measured - the_plan.predicted_peak_bytes) <= 0.02 * the_plan.predicted_peak_bytes
    assert the_plan.predicted_overhead > 0 and any(c.mode != "keep" for c in the_plan.checkpoint)


@pytest.mark.slow
def test_verify_puts_prediction_and_measurement_side_by_side(gpt):
    model, opt, step, prof = gpt
    the_plan = plan(prof, int(prof.peak_bytes * 0.85))
    v = memprof.verify(model, step, the_plan, optimizer=opt, time_reps=3)
    assert v.within_budget and abs(v.peak_error) <= 0.02
    assert v.measured_peak_bytes == v.profile.peak_bytes and v.measured_overhead is not None
    assert [r[0] for r in v.rows()] == ["peak", "step-time overhead"]
    assert all("forward" not in m.__dict__ for m in model.modules())  # left as it was


def test_no_checkpointing_when_the_budget_is_roomy(gpt):
    *_, prof = gpt
    the_plan = plan(prof, "1GiB")
    assert all(c.mode == "keep" for c in the_plan.checkpoint)
    assert the_plan.predicted_overhead == 0 and the_plan.predicted_peak_bytes == prof.peak_bytes


def test_infeasible_budget_states_the_smallest_peak_and_what_dominates(gpt):
    *_, prof = gpt
    cm = chain_model(prof, 1)
    smallest = min(s.peak_bytes for s in frontier(cm.problem))
    with pytest.raises(InfeasibleBudget) as info:
        plan(prof, smallest - 1)
    e = info.value
    assert e.min_peak_bytes == max(smallest, cm.floor_bytes)
    msg = str(e)
    largest = max(prof.peak.by_category, key=prof.peak.by_category.get)  # over every category, not 3 of them
    words = {"activation": "activations", "optimizer": "optimizer state", "temporary": "temporaries",
             "param": "parameters", "grad": "gradients"}[largest]
    assert "smallest achievable peak" in msg and f"of it, {words}" in msg
    assert "allow sharding" in msg


def test_dp_beats_uniform_baselines_at_every_budget(gpt):
    *_, prof = gpt
    cm = chain_model(prof, prof.peak_bytes)
    n = len(cm.problem.units)
    t = {u.name: {o.name: o.extra_ms for o in u.options} for u in cm.problem.units}

    def cost(choices):
        return sum(t[u.name][c] for u, c in zip(cm.problem.units, choices))

    k = round(math.sqrt(n))
    baselines = {
        "every block": ["full"] * n,
        "every other block": ["full" if i % 2 == 0 else "keep" for i in range(n)],
        "sqrt(n) segments": ["keep" if i % k == 0 else "full" for i in range(n)],
    }
    points = frontier(cm.problem)
    for name, choices in baselines.items():
        peak, ms = peak_of(cm.problem, choices), cost(choices)
        best = min(p.extra_ms for p in points if p.peak_bytes <= peak)
        assert best <= ms + 1e-9, name


def test_unknown_lever_and_bad_budget_are_clear_errors(gpt):
    *_, prof = gpt
    with pytest.raises(memprof.MemprofError, match="unknown lever 'offload'"):
        plan(prof, "1GiB", levers=("offload",))
    with pytest.raises(memprof.MemprofError, match="not a memory size"):
        plan(prof, "-5GB")
    with pytest.raises(memprof.MemprofError, match="unknown device"):
        plan(prof, "H99-1GB")


def test_plan_file_round_trips_and_names_the_profile(gpt, tmp_path):
    *_, prof = gpt
    the_plan = plan(prof, int(prof.peak_bytes * 0.8))
    path = tmp_path / "plan.toml"
    the_plan.save(path)
    assert memprof.load(path) == the_plan
    assert the_plan.source.profile_hash.startswith("sha256:")
    assert the_plan.frontier and the_plan.frontier[0].peak_bytes <= the_plan.frontier[-1].peak_bytes


def test_precision_lever_with_an_estimate_source_picks_a_cheaper_precision(gpt):
    from memprof.estimation.sources import EstimateSource

    *_, prof = gpt
    source = EstimateSource(lambda: GPT(CFG), lambda: gpt_batch(CFG, 4), device="cpu")
    est_bf16 = source.profile("bf16-autocast")
    budget = int(est_bf16.peak_bytes * 1.001)  # fits bf16-autocast without checkpointing, not fp32
    the_plan = plan(prof, budget, levers=("checkpoint", "precision"), source=source)
    assert the_plan.predicted_peak_bytes <= budget
    assert any("bf16" in f.description or "fp16" in f.description for f in the_plan.frontier)
    assert "Chosen" in the_plan.explanation[-1] or "Chosen" in " ".join(the_plan.explanation)
