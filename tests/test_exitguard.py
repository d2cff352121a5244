"""The exit guard of tracked distributed processes (memprof.tracking.exitguard).

The abort it prevents (a gloo worker thread killed in a C++ destructor while Python finalizes) is a race
seen in about 1 of 15 two-rank launches, too rare for a test to show; tests/distributed/test_run_torchrun.py
runs the launch itself. These tests check when the guard is registered and what it does at exit.
"""

import gc
import threading
import weakref

import pytest
import torch

import memprof
from memprof.tracking import exitguard


@pytest.fixture
def registry(monkeypatch):
    calls = []
    register = exitguard.atexit.register

    def record(fn, *args, **kwargs):
        if fn is exitguard.drain:
            calls.append(fn)
            return fn
        return register(fn, *args, **kwargs)  # torch registers its own exit handlers as it imports

    monkeypatch.setattr(exitguard, "_registered", False)
    monkeypatch.setattr(exitguard.atexit, "register", record)
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_registered_once_under_torchrun_and_not_in_a_single_process(registry, monkeypatch):
    assert not torch.distributed.is_initialized()
    assert exitguard.guard_distributed_exit() is False and registry == []
    with memprof.track():
        torch.ones(2) + 1
    assert registry == []  # a plain tracked process gets no exit handler
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with memprof.track():
        torch.ones(2) + 1
    assert registry == [exitguard.drain]
    assert exitguard.guard_distributed_exit() is True and registry == [exitguard.drain]  # once


def test_drain_collects_cycles_and_lets_other_threads_run():
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    freed = []
    weakref.finalize(a, freed.append, "a")
    del a, b
    gc.disable()
    try:
        ran = threading.Event()
        worker = threading.Thread(target=ran.set)
        worker.start()
        exitguard.drain(0.05)
        assert freed == ["a"] and ran.is_set()
        worker.join()
    finally:
        gc.enable()
