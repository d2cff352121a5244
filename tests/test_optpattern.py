"""Steady optimizer steps replayed from a recorded allocation pattern (memprof.tracking.optpattern).

Each replayed step is checked against the same step dispatched op by op (on an identical twin) and against
the CPU allocator's own allocation events.
"""

import copy

import pytest
import torch
import torch.nn as nn

import memprof
from memprof.tracking import optpattern
from tests.common import CASES, allocator_step_peak, hook_registries, make_optimizer, train_step, twin

REPLAYED = "replayed from the allocation pattern"


def _replayed(prof) -> bool:
    return any(REPLAYED in n for n in prof.notes)


def _summary(prof):
    s = prof.steps[-1]
    return (prof.peak_bytes, prof.peak.phase, dict(prof.peak.by_category), s.peak_bytes, dict(s.phase_peak_bytes),
            s.end_bytes, [(x.phase, x.total_bytes, x.by_category) for x in prof.timeline if x.phase == "optimizer"])


@pytest.mark.parametrize("opt_name", ["adamw", "sgd-momentum"])
@pytest.mark.parametrize("case_name", ["gpt", "tied-inplace"])
def test_replayed_step_equals_dispatched_step(case_name, opt_name):
    case = CASES[case_name]()
    model, opt = case.model, make_optimizer(opt_name, case.model.parameters())
    train_step(case, model, opt)  # state made
    ref_model, ref_opt = twin(case, opt_name)
    ref_opt.load_state_dict(opt.state_dict())
    ref_model.load_state_dict(model.state_dict())
    with memprof.track(model, opt):  # records the pattern
        train_step(case, model, opt)
    with memprof.track(ref_model, ref_opt, optimizer_replay=False):
        train_step(case, ref_model, ref_opt)
    torch.manual_seed(0)
    with memprof.track(model, opt) as replayed:
        train_step(case, model, opt)
    torch.manual_seed(0)
    with memprof.track(ref_model, ref_opt, optimizer_replay=False) as dispatched:
        train_step(case, ref_model, ref_opt)
    assert _replayed(replayed.profile) and not _replayed(dispatched.profile)
    assert _summary(replayed.profile) == _summary(dispatched.profile)


class Wide(nn.Module):
    """Big weights, tiny activations: the step's peak is in the optimizer phase."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1024, 1024)
        self.b = nn.Linear(1024, 512)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_replayed_optimizer_peak_matches_allocator():
    x = torch.randn(2, 1024)
    case = CASES["gpt"]()
    case.model, case.batch, case.loss = Wide(), [x], lambda m: m(x).square().mean()
    model, opt = case.model, torch.optim.Adam(case.model.parameters(), lr=1e-3, weight_decay=0.1)
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3, weight_decay=0.1)
    for i in range(4):
        expected = allocator_step_peak(case, ref_model, ref_opt)
        with memprof.track(model, opt) as tracker:
            train_step(case, model, opt)
        prof = tracker.profile
        assert prof.peak_bytes == expected, f"step {i}"
        assert _replayed(prof) == (i >= 2)
    assert prof.peak.phase == "optimizer"
    # Hand count at the peak: params, their grads (set_to_none comes after the step), two Adam states
    # each, the step counters, plus the temporaries of the largest weight (weight decay's grad + param
    # and the denominator).
    n = sum(p.numel() for p in model.parameters())
    assert prof.peak.by_category["param"] == 4 * n
    assert prof.peak.by_category["grad"] == 4 * n
    assert prof.peak.by_category["optimizer"] == 8 * n + 4 * 4


def test_signature_change_records_again():
    case = CASES["gpt"]()
    model = case.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_model, _ = twin(case, "adamw")
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    for _ in range(3):
        train_step(case, model, opt)
        train_step(case, ref_model, ref_opt)
    # Weight decay makes Adam allocate another temporary per parameter: the old pattern must not be used.
    for o in (opt, ref_opt):
        o.param_groups[0]["weight_decay"] = 0.1
    for step, replay in [(0, False), (1, True), (2, True)]:  # state exists: step 0 records
        expected = allocator_step_peak(case, ref_model, ref_opt)
        with memprof.track(model, opt) as tracker:
            train_step(case, model, opt)
        assert tracker.profile.peak_bytes == expected, f"step {step}"
        assert _replayed(tracker.profile) == replay, f"step {step}"
    # A learning-rate change (schedulers do it every step) keeps the pattern.
    opt.param_groups[0]["lr"] = 5e-4
    with memprof.track(model, opt) as tracker:
        train_step(case, model, opt)
    assert _replayed(tracker.profile)


def test_closure_steps_and_disabled_replay_are_dispatched():
    case = CASES["tied-inplace"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())

    def closure():
        return None

    for _ in range(4):
        with memprof.track(model, opt) as tracker:
            case.loss(model).backward()
            opt.step(closure)
            opt.zero_grad()
        assert not _replayed(tracker.profile)
    for _ in range(2):
        with memprof.track(model, opt, optimizer_replay=False) as tracker:
            train_step(case, model, opt)
        assert not _replayed(tracker.profile)
    for replay in (False, True):  # neither kind of step above recorded a pattern: the first now does
        with memprof.track(model, opt) as tracker:
            train_step(case, model, opt)
        assert _replayed(tracker.profile) == replay


class Flaky(torch.optim.SGD):
    fail = False

    def step(self, closure=None):
        out = super().step(closure)
        if self.fail:
            raise RuntimeError("boom")
        return out


def test_replayed_step_that_raises_leaves_no_trace_and_ledger_returns():
    case = CASES["tied-inplace"]()
    model = case.model
    opt = Flaky(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(3):
        with memprof.track(model, opt):
            train_step(case, model, opt)
    before = hook_registries(model, opt)
    opt.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        with memprof.track(model, opt):
            train_step(case, model, opt)
    assert hook_registries(model, opt) == before
    assert optpattern.lookup(opt, (True, ()), optpattern.signature(opt)) is not None
    # Caught inside the block: the next forward puts the ledger back and is tracked.
    with memprof.track(model, opt) as tracker:
        loss = case.loss(model)
        loss.backward()
        with pytest.raises(RuntimeError, match="boom"):
            opt.step()
        opt.fail = False
        out = model(case.batch[0])
        kept = out.untyped_storage().nbytes()
    prof = tracker.profile
    assert hook_registries(model, opt) == before
    assert any("did not end as recorded" in n for n in prof.notes)
    assert prof.timeline[-1].total_bytes >= kept
    assert optpattern.lookup(opt, (True, ()), optpattern.signature(opt)) is None


class Sub(torch.optim.SGD):
    def step(self, closure=None):
        return super().step(closure)


def test_subclass_step_calling_super_is_one_optimizer_phase():
    case = CASES["tied-inplace"]()
    torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # torch now hooks SGD.step too: Sub's steps nest
    model = case.model
    opt = Sub(model.parameters(), lr=1e-3, momentum=0.9)
    ref_model, _ = twin(case, "sgd-momentum")
    ref_opt = Sub(ref_model.parameters(), lr=1e-3, momentum=0.9)
    for i in range(3):
        expected = allocator_step_peak(case, ref_model, ref_opt)
        with memprof.track(model, opt) as tracker:
            train_step(case, model, opt)
            train_step(case, model, opt)
        prof = tracker.profile
        assert len(prof.steps) == 2
        assert _replayed(prof) == (i > 0)
        if i > 0:  # the first tracked block's first step made the momentum buffers
            assert prof.steps[0].peak_bytes == expected
        train_step(case, ref_model, ref_opt)
