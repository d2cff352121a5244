"""Ctrl-C while tracking (issue "hardened", finding 4): an interrupt always reaches the training code.

The deterministic tests make a signal arrive inside the ledger's free callback: ``PyErr_SetInterruptEx``
(what a real signal does: the handler is due at the next bytecode) and the last reference to a tracked
tensor dropped, in one C-level call, so the first Python code to run after the signal is the weakref
callback memprof registered for that tensor's storage. Python drops exceptions raised there.
"""

import ctypes
import functools
import operator
import signal
import sys
import tempfile

import pytest
import torch

import memprof
from tests.adversarial import runtime_scenarios as scenarios

_set_interrupt = ctypes.pythonapi.PyErr_SetInterruptEx
_set_interrupt.argtypes = [ctypes.c_int]


@pytest.fixture(autouse=True)
def _pythons_sigint():
    """Python's own SIGINT handler, also when the test process inherited SIGINT ignored (a CI runner)."""
    with scenarios.pythons_sigint():
        yield


def _free_with_signal_due(holder: list, signum: int = signal.SIGINT) -> None:
    """Make ``signum`` due and free the tensors in ``holder`` with no Python bytecode between the two."""
    list(map(operator.call, [functools.partial(_set_interrupt, signum), holder.clear]))


def _tracked_tensor(model):
    holder = [model(torch.randn(4, 8))]
    return holder


def test_keyboard_interrupt_in_the_free_callback_is_raised_at_the_next_op():
    model = torch.nn.Linear(8, 8)
    before = scenarios.process_state(model)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with memprof.track(model):
            holder = _tracked_tensor(model)
            _free_with_signal_due(holder)
            reached.append("free")
            model(torch.randn(4, 8))
            reached.append("next op")  # the 2026-11 code printed "Exception ignored" and got here
    assert reached == ["free"]
    assert scenarios.differences(before, scenarios.process_state(model)) == []


def test_an_interrupt_in_the_free_callback_with_no_op_after_it_is_raised_when_tracking_stops():
    model = torch.nn.Linear(8, 8)
    before = scenarios.process_state(model)
    tracker = memprof.track(model)
    with pytest.raises(KeyboardInterrupt):
        with tracker:
            model(torch.randn(4, 8)).sum().backward()
            _free_with_signal_due(_tracked_tensor(model))
    assert tracker.profile.peak_bytes > 0  # stopped and built before the interrupt was raised
    assert scenarios.differences(before, scenarios.process_state(model)) == []


def test_systemexit_from_a_sigterm_handler_in_the_free_callback_reaches_the_training_code():
    def on_term(signum, frame):
        sys.exit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        model = torch.nn.Linear(8, 8)
        before = scenarios.process_state(model)
        with pytest.raises(SystemExit) as exited:
            with memprof.track(model):
                _free_with_signal_due(_tracked_tensor(model), signal.SIGTERM)
                model(torch.randn(4, 8))
        assert exited.value.code == 143
        assert scenarios.differences(before, scenarios.process_state(model)) == []
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupt_outside_memprofs_code_is_raised_at_once():
    model = torch.nn.Linear(8, 8)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with memprof.track(model):
            model(torch.randn(4, 8))
            _set_interrupt(signal.SIGINT)
            reached.append("after")
    assert reached == []


@pytest.mark.parametrize("seed", range(20))
def test_sigint_at_a_random_moment_of_50_tracked_steps_raises_and_leaves_no_trace(seed):
    with tempfile.TemporaryDirectory() as out:
        assert scenarios.interrupt_trial(seed, steps=50, out_dir=out) is None


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_a_script_sent_sigint_during_50_tracked_steps_ends_by_keyboard_interrupt_and_leaves_no_trace(seed):
    with tempfile.TemporaryDirectory() as out:
        assert scenarios.child_interrupt_trial(seed, out, steps=50) is None
