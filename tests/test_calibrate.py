"""Calibration: the loop's own steps, tracked and timed before run --budget / @memprof.auto make their plan."""

import copy
import time

import pytest
import torch

import memprof
from memprof.policy.calibrate import Calibration
from memprof.zoo import GPT, gpt_batch
from tests.common import POLICY_GPT, SMALL_GPT


class StubSession:
    """What Calibration needs of a session: the plan applied (a handle) and how to apply or remove one."""

    def __init__(self, model):
        self.model, self.handle, self.applied = model, None, []

    def apply_plan(self, plan):
        self.handle = plan
        self.applied.append(plan)

    def remove_plan(self):
        self.handle = None


def _gpt_and_profile():
    torch.manual_seed(0)
    model = GPT(SMALL_GPT)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = gpt_batch(SMALL_GPT, 2)
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model, opt, (x, y), tracker.profile


def test_calibration_prices_each_checkpoint_mode_from_the_loops_timed_steps():
    # The loop's step sleeps a hand-set time per configuration: plain 30 ms, every unit full +15 ms (+50%),
    # every unit selective +30 ms (+100%). The costs fitted must be those, shared over the units.
    model, _, _, prof = _gpt_and_profile()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    session = StubSession(model)
    done = []
    cal = Calibration(session, opt, plain_profile=prof, base_precision="fp32", modes=("full", "selective"),
                      rounds=4, on_done=done.append, notify=print).install()
    extra = {"full": 0.015, "selective": 0.030}
    for _ in range(60):
        modes = {c.mode for c in session.handle.checkpoint} if session.handle is not None else {"keep"}
        time.sleep(0.030 + sum(extra.get(m, 0.0) for m in modes))
        opt.step()
        if cal.done:
            break
    assert done == [cal] and not cal.error
    assert "step" not in opt.__dict__ and session.handle is None  # unwrapped, plain step restored
    costs = cal.costs
    units = memprof.policy.chain.find_units(prof)
    assert set(costs.extra_ms["full"]) == set(units)
    assert costs.base_step_ms == pytest.approx(30, abs=6)
    assert sum(costs.extra_ms["full"].values()) / costs.base_step_ms == pytest.approx(0.5, abs=0.15)
    assert sum(costs.extra_ms["selective"].values()) / costs.base_step_ms == pytest.approx(1.0, abs=0.2)
    # per configuration: applied for its warm-up step, then for each planned-planned run of plain, planned,
    # planned, plain, plain, planned, planned, plain (two): three times
    assert len(session.applied) == 2 * 3


def test_calibration_gives_way_to_a_tracker_already_running_in_the_loop():
    model, opt, (x, y), _ = _gpt_and_profile()
    session = StubSession(model)
    done = []
    cal = Calibration(session, opt, plain_profile=None, base_precision="fp32", modes=("full",),
                      on_done=done.append, notify=print).install()
    with memprof.track(model, opt):
        for _ in range(2):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert done == [cal] and "another tracker" in cal.error
    assert "step" not in opt.__dict__


@pytest.mark.slow
def test_auto_plans_from_the_loops_measured_steps_and_the_applied_steps_measure_as_predicted(tmp_path):
    # The loss is computed outside the model, as Lightning does in training_step: the estimate made before
    # step 1 from the model's forward does not see it; the plan made after calibration does.
    torch.manual_seed(0)
    model = GPT(POLICY_GPT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = gpt_batch(POLICY_GPT, 4)

    def step():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    with memprof.track(twin, twin_opt) as tracker:
        for _ in range(2):
            torch.nn.functional.cross_entropy(twin(x).flatten(0, 1), y.flatten()).backward()
            twin_opt.step()
            twin_opt.zero_grad(set_to_none=True)
    budget = int(0.85 * tracker.profile.peak_bytes)

    @memprof.auto(budget=budget, levers=("checkpoint",), profile_path=str(tmp_path / "p.json"),
                  plan_path=str(tmp_path / "plan.toml"))
    def train():
        for _ in range(70):
            step()
            if train.session.check is not None and train.session.check.done:
                break

    train()
    session = train.session
    r = session.verification
    assert r is not None and r.finished, session.action
    assert "timed the levers in the loop's own steps" in session.action, session.action
    assert "calibration" in session.plan.assumptions
    assert r.measured_peak_bytes <= budget, r.describe()
    assert abs(r.measured_peak_bytes - r.predicted_peak_bytes) <= 0.01 * r.predicted_peak_bytes, r.describe()
    assert session.handle is None  # the plan was removed when train() returned
