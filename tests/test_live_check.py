"""The live check: an applied plan is measured in the running loop and replaced when it does not hold."""

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main
from memprof.policy.live_check import LiveCheck, time_tolerance

NANOGPT = Path(__file__).resolve().parent / "fixtures" / "nanogpt" / "train.py"


def _plan(precision="fp32", overhead=0.10, peak=1000, budget=1200, modes=("full",), head=0):
    return SimpleNamespace(precision=precision, predicted_overhead=overhead, predicted_peak_bytes=peak,
                           budget_bytes=budget, checkpoint=tuple(SimpleNamespace(mode=m) for m in modes),
                           loss_head_chunk_tokens=head, predicted_step_ms=20.0 * (1 + overhead))


class StubSession:
    """What LiveCheck needs of an AutoSession; a step's duration depends on the plan applied (hand-set)."""

    def __init__(self, plan, replans):
        self.plan, self.budget_bytes, self.base_precision = plan, plan.budget_bytes, "fp32"
        self.handle = object()
        self.replans = list(replans)
        self.calls, self.verifications = [], []
        self.replan_refusal = "the smallest achievable peak is 1.1 KiB"

    def apply_plan(self, plan):
        self.handle, self.applied = object(), plan

    def remove_plan(self):
        self.handle = None

    def replan(self, budget, precisions, without_modes=(), without_levers=()):
        self.calls.append((budget, precisions, without_modes) + ((without_levers,) if without_levers else ()))
        return self.replans.pop(0) if self.replans else None

    def verified(self, result):
        self.verifications.append(result)


def _drive(check, session, step_s, steps=40):
    """Run ``steps`` optimizer steps; each sleeps step_s(plan applied or None) seconds."""
    opt = check.optimizer
    w = opt.param_groups[0]["params"][0]
    for _ in range(steps):
        time.sleep(step_s(session.plan if session.handle is not None else None))
        (w * 2).sum().backward()
        opt.step()
        opt.zero_grad()
        if check.done:
            break


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_time_tolerance_is_a_quarter_of_the_predicted_overhead_or_five_points():
    assert time_tolerance(0.10) == 0.05 and time_tolerance(0.40) == pytest.approx(0.10)
    assert time_tolerance(-0.3) == pytest.approx(0.075)


def test_a_plan_that_holds_is_kept_with_its_measured_figures():
    plan = _plan(overhead=0.5)
    session = StubSession(plan, [])
    check = LiveCheck(session, _opt(), notify=print, plain_may_run=True, peak_known=900, pairs=4).install()
    _drive(check, session, lambda p: 0.03 if p is not None else 0.02)  # +50%, as predicted
    check.remove()
    (r,) = session.verifications
    assert r.finished and r.interleaved and r.timed_pairs == 4 and not r.moves
    assert r.measured_overhead == pytest.approx(0.5, abs=0.15)
    assert session.handle is not None  # left applied


def test_a_precision_plan_slower_than_predicted_moves_to_the_base_precision():
    slow = _plan(precision="bf16-autocast", overhead=-0.1)
    fp32 = _plan(overhead=0.2)
    session = StubSession(slow, [fp32])
    notes = []
    check = LiveCheck(session, _opt(), notify=notes.append, plain_may_run=True, peak_known=900, pairs=4).install()
    # bf16 runs 4x the plain step here (no bf16 units), the fp32 plan +20% as predicted
    _drive(check, session, lambda p: 0.02 if p is None else (0.08 if p is slow else 0.024), steps=60)
    check.remove()
    assert session.calls[0][1] == ("fp32",)  # planned again without the slow precision
    assert session.plan is fp32 and session.verifications[-1].finished
    assert "bf16-autocast is slow on this device" in notes[0] and "moved to: fp32" in notes[0]
    assert session.verifications[-1].measured_overhead == pytest.approx(0.2, abs=0.15)


def test_when_no_other_plan_fits_the_plain_step_is_restored_and_the_reason_given():
    slow = _plan(precision="bf16-autocast", overhead=-0.1)
    session = StubSession(slow, [])
    notes = []
    check = LiveCheck(session, _opt(), notify=notes.append, plain_may_run=True, peak_known=900, pairs=4).install()
    _drive(check, session, lambda p: 0.02 if p is None else 0.08)
    check.remove()
    r = session.verifications[-1]
    assert r.reverted and session.handle is None and session.plan is slow  # kept as the record, not applied
    assert "reverted to the plain step" in notes[-1] and "smallest achievable peak" in notes[-1]


def test_a_plan_over_budget_is_planned_again_for_a_budget_lowered_by_the_excess():
    over = _plan(peak=1000, budget=1200)
    session = StubSession(over, [])
    check = LiveCheck(session, _opt(), notify=lambda m: None, plain_may_run=True, peak_known=1300).install()
    _drive(check, session, lambda p: 0.0, steps=3)
    check.remove()
    assert session.calls == [(1200 - 300, None, ())]  # over by 300 bytes against the prediction


def test_a_chunked_head_slower_than_predicted_is_planned_again_without_it():
    chunked = _plan(overhead=0.05, modes=("keep", "keep"), head=256)
    checkpointed = _plan(overhead=0.2, modes=("full", "keep"))
    session = StubSession(chunked, [checkpointed])
    notes = []
    check = LiveCheck(session, _opt(), notify=notes.append, plain_may_run=True, peak_known=900, pairs=4).install()
    # the chunked head runs at 2x the plain step here, the checkpointed plan +20% as predicted
    _drive(check, session, lambda p: 0.02 if p is None else (0.04 if p is chunked else 0.024), steps=60)
    check.remove()
    assert session.calls[0] == (1200, None, (), ("loss-head",))  # same budget, without the lever
    assert session.plan is checkpointed and session.verifications[-1].finished
    assert "chunked loss head costs more here" in notes[0]


def test_a_chunked_head_whose_full_logits_the_loop_needs_is_dropped_when_over_budget():
    chunked = _plan(peak=1000, budget=1200, modes=("keep",), head=256)
    session = StubSession(chunked, [])
    session.loss_head_materialised = lambda: 2  # two head calls computed the full logits after all
    notes = []
    check = LiveCheck(session, _opt(), notify=notes.append, plain_may_run=True, peak_known=1700).install()
    _drive(check, session, lambda p: 0.0, steps=3)
    check.remove()
    assert session.calls == [(1200 - 700, None, (), ("loss-head",))]
    assert "needed the chunked head's full logits in 2 call(s)" in notes[0]


def test_the_check_unwraps_the_optimizer_step_exactly():
    opt = _opt()
    before = dict(opt.__dict__)
    check = LiveCheck(StubSession(_plan(), []), opt, notify=print, plain_may_run=True, peak_known=1).install()
    assert "step" in opt.__dict__
    check.remove()
    assert opt.__dict__.keys() == before.keys() and "step" not in opt.__dict__


@pytest.mark.slow
def test_run_budget_on_a_nanogpt_script_measures_the_applied_steps_and_prints_both(tmp_path):
    out, plan_out = tmp_path / "p.json", tmp_path / "plan.toml"
    budget = 16 * 2**20  # below the script's 19.6 MiB peak, reachable by checkpointing its 4 blocks
    r = CliRunner().invoke(main, ["run", "--budget", str(budget), "--levers", "checkpoint", "--out", str(out),
                                  "--plan-out", str(plan_out), str(NANOGPT), "--max_iters=60"])
    assert r.exit_code == 0, r.output
    # 60 iterations leave room for the check to move to other plans (about 14 steps each) and finish
    assert "Applied plan checked in the running script" in r.stderr and "unfinished" not in r.stderr
    assert "peak (tracked)" in r.stderr and "step-time overhead (untracked" in r.stderr
    plan = memprof.load(plan_out)
    verified = plan.assumptions["verified"]
    measured = int(verified.split("measured peak ")[1].split(" bytes")[0])
    assert measured <= budget
    assert abs(measured - plan.predicted_peak_bytes) <= 0.01 * plan.predicted_peak_bytes
    assert "plan_verified" in memprof.load(out).assumptions


@pytest.mark.slow
def test_a_precision_plan_slower_than_it_predicted_is_dropped_on_the_users_path(tmp_path):
    # Only bf16 autocast (with every block checkpointed) reaches 12 MiB on this script. From iteration 36 on,
    # after memprof has timed the loop's steps in bf16 and planned (about 34 steps), its head's backward sleeps
    # 1.5 s in bf16, as on a CPU without bf16 units: the applied plan turns slower than it predicted
    plan_out = tmp_path / "plan.toml"
    r = CliRunner().invoke(main, ["run", "--budget", "12MiB", "--out", str(tmp_path / "p.json"), "--plan-out",
                                  str(plan_out), str(NANOGPT), "--max_iters=60", "--bf16_backward_delay=1.5",
                                  "--bf16_delay_from_iter=36"])
    assert r.exit_code == 0, r.output
    assert "bf16-autocast is slow on this device" in r.stderr
    # no fp32 plan reaches the budget: the plain step is restored, and the smallest peak without bf16 is named
    assert "reverted to the plain step" in r.stderr and "the smallest achievable peak is" in r.stderr
    assert "no plan held" in r.stderr
    assert "no plan held: plain step restored" in memprof.load(plan_out).assumptions["verified"]


@pytest.mark.slow
def test_a_precision_slow_in_backward_is_timed_on_the_whole_step_before_the_plan_is_made(tmp_path):
    # The head's backward sleeps 1.5 s in bf16 from the start: the forward timed before step 1 cannot see it
    # (its ratio stays near 1), the loop's whole steps timed before the plan is made do.
    plan_out = tmp_path / "plan.toml"
    r = CliRunner().invoke(main, ["run", "--budget", "12MiB", "--out", str(tmp_path / "p.json"), "--plan-out",
                                  str(plan_out), str(NANOGPT), "--max_iters=60", "--bf16_backward_delay=1.5"])
    assert r.exit_code == 0, r.output
    plan = memprof.load(plan_out)
    step_ratio = float(plan.assumptions["calibration"].split("bf16-autocast ")[1].split("x")[0])
    timing = next(v for k, v in plan.assumptions.items() if k.startswith("note") and "precision time" in v)
    forward_ratio = float(timing.split("forward alone: bf16-autocast ")[1].split("x")[0])
    assert forward_ratio < 3 < step_ratio, (forward_ratio, step_ratio)
    assert plan.precision == "bf16-autocast" and plan.predicted_overhead > 2  # the slowdown is in the prediction
