"""Optimizer step in backward (memprof.policy.step_in_backward): the same parameters as the plain loop, one
gradient alive at a time, the peak lower by a hand count, the estimator to the byte of the real run."""

import pytest
import torch
import torch.nn as nn

import memprof
from memprof.policy.step_in_backward import StepInBackwardError, step_in_backward
from memprof.tracking.groundtruth import allocator_peak, live_bytes


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


X = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))


def _step(model, opt, sched=None):
    model(X).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()


def test_parameters_and_state_equal_the_plain_loop_with_an_lr_scheduler():
    plain, moved = _mlp(), _mlp()
    o1 = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    o2 = torch.optim.AdamW(moved.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    s1, s2 = (torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (o1, o2))
    handle = step_in_backward(moved, o2)
    for _ in range(3):
        _step(plain, o1, s1)
        _step(moved, o2, s2)
    for a, b in zip(plain.parameters(), moved.parameters()):
        assert torch.equal(a, b)
    sd1, sd2 = o1.state_dict(), o2.state_dict()
    assert sd1["state"].keys() == sd2["state"].keys()
    for k in sd1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sd1["state"][k][name], sd2["state"][k][name])
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"] == 1e-3 / 8
    assert (handle.steps, handle.stepped) == (3, 3 * 6)


def test_at_most_one_gradient_exists_at_any_hook_and_the_peak_drops_by_all_but_the_largest():
    plain, moved = _mlp(), _mlp()
    o1 = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=False)
    o2 = torch.optim.AdamW(moved.parameters(), lr=1e-3, foreach=False)
    step_in_backward(moved, o2)
    alive = []
    for p in moved.parameters():  # registered after the lever's hooks: runs after each parameter's step
        p.register_post_accumulate_grad_hook(lambda _p: alive.append(sum(q.grad is not None
                                                                          for q in moved.parameters())))
    _step(plain, o1), _step(moved, o2)  # the first step creates the optimizer state
    assert max(alive) == 0  # each gradient was freed by the time the next hook ran
    plain_peak, _ = allocator_peak(lambda: _step(plain, o1))
    moved_peak, _ = allocator_peak(lambda: _step(moved, o2))
    grads = [p.numel() * 4 for p in plain.parameters()]
    # Plain: the peak is the largest parameter's AdamW update with every gradient alive; moved: the same
    # update with its own gradient alone (plus this batch's few activation gradients).
    saving = plain_peak - moved_peak
    assert sum(grads) - max(grads) - 64 * 1024 <= saving <= sum(grads) - max(grads), (saving, grads)


def test_gradient_accumulation_is_refused_with_a_clear_error():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_in_backward(model, opt)
    model(X).sum().backward()
    with pytest.raises(StepInBackwardError, match="gradient accumulation"):
        model(X).sum().backward()


def test_remove_restores_the_optimizer_and_the_hooks():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = step_in_backward(model, opt)
    with pytest.raises(StepInBackwardError, match="already"):
        step_in_backward(model, opt)
    handle.remove()
    assert "step" not in opt.__dict__ and not hasattr(opt, "_memprof_step_in_backward")
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    model(X).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # gradients stay for the loop's own step
    handle.remove()  # twice is harmless


def test_parameters_missing_from_the_optimizer_are_refused():
    model = _mlp()
    opt = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(StepInBackwardError, match="not in the optimizer"):
        step_in_backward(model, opt)
    assert "step" not in opt.__dict__


def _moved_step(model, batch, opt):
    if getattr(opt, "_memprof_step_in_backward", None) is None:
        step_in_backward(model, opt)
    model(batch).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _allocator_second_step_peak():
    from memprof.training import make_optimizer

    model, batch = _mlp(), torch.randn(4, 512)
    opt = make_optimizer("adamw", model.parameters())
    _moved_step(model, batch, opt)
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    before = live_bytes(list(model.parameters()) + [batch] + state)
    return model, batch, opt, allocator_peak(lambda: _moved_step(model, batch, opt), before)[0]


def test_the_estimator_sees_the_step_in_backward_to_the_byte_of_the_allocator():
    *_, expected = _allocator_second_step_peak()
    est = memprof.estimate(_mlp, lambda: torch.randn(4, 512), step=_moved_step, device="cpu", blocks="all")
    assert est.peak_bytes == expected


def test_the_tracker_sees_the_step_in_backward_to_the_byte_of_the_allocator():
    model, batch, opt, expected = _allocator_second_step_peak()
    fresh = _mlp()
    from memprof.training import make_optimizer

    fresh_opt = make_optimizer("adamw", fresh.parameters())
    with memprof.track(fresh, fresh_opt) as tracker:
        for _ in range(2):
            _moved_step(fresh, batch, fresh_opt)
    assert tracker.profile.peak_bytes == expected


def test_an_lr_scheduler_made_after_the_lever_drives_its_steps():
    plain, moved = _mlp(), _mlp()
    o1 = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=False)
    o2 = torch.optim.AdamW(moved.parameters(), lr=1e-3, foreach=False)
    step_in_backward(moved, o2)
    s1, s2 = (torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0 / (i + 1)) for o in (o1, o2))
    for _ in range(3):
        _step(plain, o1, s1)
        _step(moved, o2, s2)
    for a, b in zip(plain.parameters(), moved.parameters()):
        assert torch.equal(a, b)
