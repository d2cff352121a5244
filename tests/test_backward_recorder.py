"""Backward tracked from the C++ allocation recorder (Tracker._run_backward) against the per-op path."""

import pytest
import torch

import memprof
from memprof.tracking import native
from memprof.tracking.groundtruth import allocator_peak
from memprof.tracking.ledger import Ledger
from memprof.zoo import GPT, GPTConfig, gpt_batch
from tests.common import gpt_adamw_step, hook_registries

if not native.available():
    pytest.skip(f"the allocation recorder is unavailable here: {native.unavailable_reason()}",
                allow_module_level=True)

SMALL = GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=97)


@pytest.fixture
def recorded(monkeypatch):
    """Counts the backwards the ledger took from the recorder."""
    runs = []
    start = Ledger.start_recording

    def counting(self, recorder):
        runs.append(recorder)
        return start(self, recorder)

    monkeypatch.setattr(Ledger, "start_recording", counting)
    return runs


def _profile(step, model, opt, steps=2):
    with memprof.track(model, opt) as tracker:
        for _ in range(steps):
            step()
    return tracker.profile


def _per_op(monkeypatch, fn):
    """Run ``fn`` with the recorder turned off: the tracker falls back to dispatching backward's ops."""
    monkeypatch.setenv("MEMPROF_NATIVE", "0")
    native._reset_for_tests()
    try:
        return fn()
    finally:
        monkeypatch.delenv("MEMPROF_NATIVE")
        native._reset_for_tests()


def test_backward_from_the_recorder_gives_the_per_op_paths_profile(monkeypatch, recorded):
    model, opt, step = gpt_adamw_step(SMALL)
    step()
    step()
    fast = _profile(step, model, opt)
    assert len(recorded) == 2  # both backwards ran on the recorder
    slow = _per_op(monkeypatch, lambda: _profile(step, model, opt))
    assert len(recorded) == 2
    assert fast.peak.phase == slow.peak.phase == "backward"
    for a, b in zip(fast.steps, slow.steps):
        assert a.peak_bytes == b.peak_bytes  # op scratch: measured per op there, seen by the allocator here
        assert dict(a.phase_peak_bytes) == dict(b.phase_peak_bytes)
    for cat in ("param", "grad", "optimizer", "activation", "input"):
        assert fast.peak.by_category[cat] == slow.peak.by_category[cat], cat
    for name, m in slow.modules.items():
        assert fast.modules[name].backward_peak_bytes == m.backward_peak_bytes, name
        assert fast.modules[name].grad_bytes == m.grad_bytes, name
    grads = [t for t in fast.peak.tensors if t.category == "grad"]
    assert grads and all(t.shape and t.label.endswith(".grad") for t in grads)  # claimed by their parameter


def test_the_peak_equals_the_allocators_with_gradient_accumulation_and_zeroed_grads(recorded):
    torch.manual_seed(0)
    model = GPT(SMALL)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = gpt_batch(SMALL, 2)

    def step():
        for _ in range(2):  # two micro-batches: the second backward adds into the first one's grads
            model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    step()
    live = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *(p.grad for p in model.parameters()),
                                                      x, y])
    live += sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    expected, _ = allocator_peak(step, live)
    profile = _profile(step, model, opt, steps=1)
    assert len(recorded) == 2
    assert profile.peak_bytes == expected


def test_autograd_grad_results_are_followed_after_backward(recorded):
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(128, 256)
    with memprof.track() as tracker:
        loss = torch.tanh(x @ w).sum()
        (g,) = torch.autograd.grad(loss, w)
        kept = g * 2  # g outlives its backward: claimed, so its free below is seen
        del g, loss
        after = torch.ones(256, 256) + kept
        del kept, after
    profile = tracker.profile
    assert len(recorded) == 1
    assert not any("outlived" in n for n in profile.notes)
    assert profile.steps[-1].end_bytes == w.untyped_storage().nbytes() + x.untyped_storage().nbytes()


def test_memory_outliving_backward_in_no_followed_tensor_is_noted_and_later_backwards_go_per_op(recorded):
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with memprof.track() as tracker:
        h = x @ w
        h.retain_grad()  # h.grad outlives backward: no parameter nor autograd.grad result holds it
        h.tanh().sum().backward()
        h2 = x @ w
        h2.tanh().sum().backward()
    assert len(recorded) == 1
    assert any("outlived" in n and "per op" in n for n in tracker.profile.notes)


def test_under_a_running_torch_profiler_backward_is_tracked_per_op(recorded):
    from torch.profiler import ProfilerActivity, profile

    model, opt, step = gpt_adamw_step(SMALL)
    step()
    step()
    fast = _profile(step, model, opt, steps=1)
    with profile(activities=[ProfilerActivity.CPU]):
        slow = _profile(step, model, opt, steps=1)
    assert len(recorded) == 1
    assert slow.peak_bytes == fast.peak_bytes
    # No accumulate hooks (the tracker expected the recorder): gradients are labelled after the engine.
    assert slow.peak.by_category["grad"] == fast.peak.by_category["grad"] > 0
    for name, m in fast.modules.items():
        assert slow.modules[name].grad_bytes == m.grad_bytes, name


def test_an_error_in_backward_leaves_no_trace(recorded):
    model, opt, step = gpt_adamw_step(SMALL)
    step()
    before = hook_registries(model, opt)
    x, y = gpt_batch(SMALL, 2)

    def boom(_grad):
        raise RuntimeError("in backward")

    with pytest.raises(RuntimeError, match="in backward"):
        with memprof.track(model, opt):
            loss = model(x, y)
            loss.register_hook(boom)
            loss.backward()
    assert len(recorded) == 1
    assert hook_registries(model, opt) == before  # engine entry, profiler slot and c10 log level included


def test_tracking_that_stops_inside_backward_leaves_no_trace(recorded):
    """An optimizer stepped from a gradient hook (optimizer in backward) ends the last tracked step, so the
    tracker stops while autograd's engine runs with its mode popped."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_registries(model)

    def step_now(_p):
        opt.step()
        opt.zero_grad()

    handles = [model[0].weight.register_post_accumulate_grad_hook(step_now)]  # its grad is among the last
    x = torch.randn(16, 32)
    tracker = memprof.track(model, opt, steps=1)
    with tracker:
        model(x).sum().backward()
        assert not tracker.active  # it stopped inside that backward
        model(x).sum().backward()
    for h in handles:
        h.remove()
    assert len(recorded) == 1
    assert hook_registries(model) == before
    assert tracker.profile.steps


def test_module_boundaries_at_one_tensor_share_one_hook_and_give_the_same_profile(monkeypatch, recorded):
    """One output feeds the next module (and a module's input is its first child's): the tracker adds one
    gradient hook per such tensor, and the profile is the one a hook per module boundary gives."""
    from memprof.tracking import boundaries as boundaries_mod

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x = torch.randn(16, 32)

    def step():
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with memprof.track(model, opt) as tracker:
        model(x)
        # Hand count: x needs no gradient; 0's output (0's and 1's boundary), 1's output (1's and 2's), 2's
        # output (2's and the Sequential's): three tensors, two calls each.
        assert sorted(len(h.calls) for h in tracker._bounds.grad_hooks.values()) == [2, 2, 2]
    shared = _profile(step, model, opt)

    def one_hook_per_boundary(self, tensors, call, mode):
        self.handles.append(boundaries_mod.on_grads(tensors, call, mode))

    monkeypatch.setattr(boundaries_mod.Boundaries, "on_grads", one_hook_per_boundary)
    separate = _profile(step, model, opt)
    assert len(recorded) == 4  # every backward ran on the recorder
    assert shared.peak_bytes == separate.peak_bytes
    assert sum(m.backward_peak_bytes > 0 for m in separate.modules.values()) >= 3
    for name, m in separate.modules.items():
        assert shared.modules[name].backward_peak_bytes == m.backward_peak_bytes, name
        assert shared.modules[name].forward_peak_bytes == m.forward_peak_bytes, name


def test_the_gradients_a_backward_will_make_are_known_by_size_before_it_runs():
    from memprof.tracking.recorded_backward import gradient_shapes

    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    loss = (x.double() @ w).log_softmax(-1).sum()
    # by hand: the loss (8 B, float64), the log-softmax's and the product's gradients (4x16 float64), the
    # gradient of x's float64 copy (4x8 float64: 256 B) and of w (8x16 float64), and of x itself (4x8 float32)
    assert gradient_shapes((loss,)) == {8: ((), torch.float64), 512: ((4, 16), torch.float64),
                                        256: ((4, 8), torch.float64), 1024: ((8, 16), torch.float64),
                                        128: ((4, 8), torch.float32)}
