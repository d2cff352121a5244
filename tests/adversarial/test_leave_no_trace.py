"""Leave no trace in every order of use (issue "hardened", finding 7): trackers nested, started twice, paused
and stopped out of order; plans applied twice, to a shared submodule, removed twice, removed after an error,
interleaved with a tracker; ``@memprof.auto`` returning or raising. Each order either works and leaves the
process and the model exactly as before (every hook registry and patch, the signal handlers, module classes,
instance attributes, parameter objects and dtypes: ``runtime_scenarios.process_state``) or refuses the second
use with a ``MemprofError`` at its start.
"""

import pytest
import torch

import memprof
from tests.adversarial import runtime_scenarios as scenarios

ORDERS = list(scenarios.leave_no_trace_orders())


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_of_use_leaves_the_process_and_model_as_they_were(order):
    assert scenarios.run_order(order) is None


def test_two_trackers_stopped_out_of_order_leave_the_autograd_engine_entry_unpatched():
    engine = torch.autograd._engine_run_backward
    model = torch.nn.Linear(8, 8)
    a = memprof.track(model).start()
    try:
        b = memprof.track(model).start()  # refused now; the 2026-11 code started it
    except memprof.MemprofError:
        b = None
    model(torch.randn(4, 8)).sum().backward()
    a.stop()
    if b is not None:
        b.stop()
    assert torch.autograd._engine_run_backward is engine
    assert "resize_" not in torch.UntypedStorage.__dict__


def test_a_paused_tracker_stopped_before_the_one_started_after_it_leaves_nothing_patched():
    engine = torch.autograd._engine_run_backward
    model = torch.nn.Linear(8, 8)
    a = memprof.track(model).start()
    a.pause()
    b = memprof.track(model).start()
    model(torch.randn(4, 8)).sum().backward()
    a.stop()
    b.stop()
    assert torch.autograd._engine_run_backward is engine
    assert "resize_" not in torch.UntypedStorage.__dict__


def test_a_nested_tracker_is_refused_at_its_start_with_a_clear_error():
    model = torch.nn.Linear(8, 8)
    with memprof.track(model) as outer:
        with pytest.raises(memprof.MemprofError, match="trackers do not nest"):
            memprof.track(model).start()
        model(torch.randn(4, 8)).sum().backward()
    assert outer.profile.peak_bytes > 0


def test_an_inert_optimizer_post_hook_is_removed_at_the_next_step():
    from torch.optim import optimizer as o

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = (dict(o._global_optimizer_pre_hooks), dict(o._global_optimizer_post_hooks))
    tracker = memprof.track(model, opt, steps=1).start()
    later = o.register_optimizer_step_post_hook(lambda *a: None)
    for _ in range(2):  # the tracker stops inside the first step's post-hooks, before the later hook
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    assert not tracker.active
    later.remove()
    assert (dict(o._global_optimizer_pre_hooks), dict(o._global_optimizer_post_hooks)) == before


@pytest.mark.slow
@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
def test_auto_removes_its_plan_when_the_training_function_ends(raises, tmp_path):
    assert scenarios.auto_order(raises, str(tmp_path)) is None
