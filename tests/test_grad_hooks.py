"""The backward-end signal of a module with several inputs (boundaries.on_all_grads).

``register_multi_grad_hook(mode="all")`` keeps every input's gradient until the last one arrives; a tracker
using it would hold memory the untracked step frees earlier. These tests check the signal and that no
gradient is kept.
"""

import weakref

import torch
from torch import nn

from memprof.tracking.boundaries import on_all_grads


class _Net(nn.Module):
    """x -> pa -> a, x -> pb -> b; b's producer runs its backward before a's (it was made later)."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb = nn.Linear(64, 64), nn.Linear(64, 64)
        self.l1, self.l2 = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x, on_inputs):
        a, b = self.pa(x), self.pb(x)
        on_inputs(a, b)
        return self.l2(torch.relu(self.l1(a)) + b).sum()


def _run(register):
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(32, 64)
    seen = []  # (what, weakref to b's gradient or None)
    b_grad = []

    def on_inputs(a, b):
        b.register_hook(lambda g: b_grad.append(weakref.ref(g)))
        register((a, b), lambda _grads: seen.append(("all", b_grad[0]() if b_grad else "no grad yet")))

    net(x, on_inputs).backward()
    return seen


def test_fires_once_after_all_gradients_and_keeps_none():
    seen = _run(on_all_grads)
    assert len(seen) == 1
    assert seen[0][1] is None  # b's gradient was freed when its producer ran, before a's arrived


def test_torch_multi_grad_hook_would_have_kept_it():
    # The reason for on_all_grads: with torch's "all" hook, b's gradient is still alive at the end.
    seen = _run(lambda ts, fn: torch.autograd.graph.register_multi_grad_hook(ts, fn, mode="all"))
    assert len(seen) == 1
    assert isinstance(seen[0][1], torch.Tensor)


def test_only_the_gradients_this_backward_computes_are_waited_for():
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    ya, yb = a * 2, b * 3
    calls = []
    handle = on_all_grads((ya, yb), lambda _g: calls.append(1))
    (ya.sum() + yb.sum()).backward(retain_graph=True)
    ya.sum().backward(inputs=[a], retain_graph=True)  # yb's gradient is not computed this time
    assert calls == [1, 1]
    handle.remove()
    (ya.sum() + yb.sum()).backward()
    assert calls == [1, 1]


class _Join(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, a, b):
        return self.l2(torch.relu(self.l1(a)) + b)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.pa, self.pb, self.join = nn.Linear(64, 64), nn.Linear(64, 64), _Join()

    def forward(self, x):
        return self.join(self.pa(x), self.pb(x)).sum()


def test_tracked_module_with_two_inputs_matches_the_untracked_allocator():
    import memprof
    from memprof.tracking.groundtruth import allocator_peak, live_bytes

    torch.manual_seed(0)
    net, x = _TwoInputs(), torch.randn(512, 64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def step():
        net(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with memprof.track(net, opt) as tr:
        step()
    live = live_bytes(list(net.parameters()) + [v for s in opt.state.values() for v in s.values()] + [x])
    allocator, _ = allocator_peak(step, live)
    prof = tr.profile
    assert prof.peak_bytes == allocator
    join = prof.modules["join"]
    assert join.backward_ms > 0 and join.backward_peak_bytes > 0
