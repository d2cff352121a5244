"""bf16 optimizer moments (memprof.policy.state_precision): the update formula against torch's own
single-tensor Adam/AdamW, the state's bytes halved (hand count), the estimator to the byte of the
allocator, remove() restoring dtypes and step."""

import copy

import pytest
import torch
import torch.nn as nn

import memprof
from memprof.policy.state_precision import StatePrecisionError, low_precision_state
from memprof.tracking.groundtruth import allocator_peak, live_bytes


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


X = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))


def _train(model, opt, steps=4, sched=None):
    for _ in range(steps):
        model(X).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("cls,kw", [(torch.optim.AdamW, {"weight_decay": 0.1}),
                                    (torch.optim.Adam, {"weight_decay": 0.1}),
                                    (torch.optim.Adam, {"maximize": True})])
def test_with_fp32_moments_the_update_equals_torch_single_tensor_step_exactly(cls, kw):
    ref, ours = _mlp(), _mlp()
    o1 = cls(ref.parameters(), lr=1e-2, foreach=False, **kw)
    o2 = cls(ours.parameters(), lr=1e-2, **kw)
    _train(ref, o1, 1), _train(ours, o2, 1)  # state made by torch's own step, then carried on by ours
    low_precision_state(o2, dtype=torch.float32)
    _train(ref, o1, 3, torch.optim.lr_scheduler.StepLR(o1, 1, 0.5))
    _train(ours, o2, 3, torch.optim.lr_scheduler.StepLR(o2, 1, 0.5))
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_bf16_moments_halve_the_state_and_stay_close_to_the_fp32_run():
    ref, ours = _mlp(), _mlp()
    o1 = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    o2 = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    handle = low_precision_state(o2)
    _train(ref, o1), _train(ours, o2)
    moments = [o2.state[p][n] for p in ours.parameters() for n in ("exp_avg", "exp_avg_sq")]
    assert all(m.dtype == torch.bfloat16 for m in moments)
    n_params = sum(p.numel() for p in ours.parameters())
    assert sum(m.numel() * m.element_size() for m in moments) == 2 * n_params * 2  # two bf16 moments
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)  # 4 steps of lr 1e-3: bf16 rounding of moments
    handle.remove()
    assert all(o2.state[p][n].dtype == torch.float32 for p in ours.parameters() for n in ("exp_avg", "exp_avg_sq"))
    assert "step" not in o2.__dict__ and not hasattr(o2, "_memprof_state_precision")
    _train(ours, o2, 1)  # torch's own step again


def test_the_step_peak_drops_by_half_the_state_and_the_estimator_sees_it():
    def step(model, batch, opt):
        if getattr(opt, "_memprof_state_precision", None) is None:
            low_precision_state(opt)
        model(batch).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from memprof.training import make_optimizer

    peaks = {}
    for name, fn in (("plain", None), ("bf16", step)):
        model = _mlp()
        opt = make_optimizer("adamw", model.parameters())
        batch = X.clone()
        run = fn or (lambda m, b, o: (m(b).square().mean().backward(), o.step(), o.zero_grad(set_to_none=True)))
        run(model, batch, opt)
        state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        before = live_bytes(list(model.parameters()) + [batch] + state)
        peaks[name] = allocator_peak(lambda r=run, m=model, b=batch, o=opt: r(m, b, o), before)[0]
        if fn is not None:
            est = memprof.estimate(_mlp, lambda: torch.randn(16, 64), step=fn, device="cpu", blocks="all")
            assert est.peak_bytes == peaks[name]
    n_params = sum(p.numel() for p in _mlp().parameters())
    # Half the moments' bytes saved (2 moments x 2 bytes each per parameter), less the one parameter's
    # fp32 moments the update upcasts at a time (the largest: 128 x 64 weights, its two moments).
    largest = 128 * 64
    assert peaks["plain"] - peaks["bf16"] >= 2 * n_params * 2 - 2 * largest * 4


def test_unsupported_optimizers_and_settings_are_refused():
    model = _mlp()
    with pytest.raises(StatePrecisionError, match="Adam/AdamW"):
        low_precision_state(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(StatePrecisionError, match="amsgrad"):
        low_precision_state(torch.optim.AdamW(model.parameters(), amsgrad=True))
    with pytest.raises(StatePrecisionError, match="floating-point"):
        low_precision_state(torch.optim.AdamW(model.parameters()), dtype=torch.int8)
    opt = torch.optim.AdamW(copy.deepcopy(model).parameters())
    low_precision_state(opt)
    with pytest.raises(StatePrecisionError, match="already"):
        low_precision_state(opt)


@pytest.mark.parametrize("first", ["step-in-backward", "state-precision"])
def test_composed_with_the_step_in_backward_in_either_order(first):
    from memprof.policy.step_in_backward import step_in_backward

    ref, ours = _mlp(), _mlp()
    o1 = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    o2 = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    if first == "step-in-backward":
        moved, low = step_in_backward(ours, o2), low_precision_state(o2, dtype=torch.float32)
    else:
        low, moved = low_precision_state(o2, dtype=torch.float32), step_in_backward(ours, o2)
    _train(ref, o1), _train(ours, o2)
    assert moved.stepped == 4 * 4  # the hooks stepped every parameter: the moved step ran
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)  # with fp32 moments: torch's own update, through both levers
    low.remove(), moved.remove()
    assert "step" not in o2.__dict__
    _train(ref, o1, 1), _train(ours, o2, 1)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)
