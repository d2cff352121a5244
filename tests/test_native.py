"""The C++ allocation recorder (memprof.tracking.native) against torch.profiler's allocation events."""

import gc
import shutil

import pytest
import torch

from memprof.errors import MemprofError
from memprof.tracking import native, scratch
from memprof.tracking.groundtruth import allocator_peak
from memprof.zoo import GPTConfig
from tests.common import gpt_adamw_step

if native._compiler() is None:
    pytest.skip("no C++ compiler on this machine: the recorder cannot be built", allow_module_level=True)

SMALL = GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=97)


def _profiler_allocations(fn):
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return [e[1:] for e in sorted(events)]


@pytest.fixture
def gpt_step():
    _, _, step = gpt_adamw_step(SMALL)
    step()
    step()
    return step


def test_it_builds_here():
    assert native.available(), native.unavailable_reason()


def test_recorder_sees_every_allocation_and_free_the_profiler_sees(gpt_step):
    with native.AllocationRecorder() as rec:
        gpt_step()
    mine = [(size, dev) for _, size, dev in rec.events()]
    theirs = [size for _, size in _profiler_allocations(gpt_step)]
    # the same step again allocates the same sizes in the same order (a steady AdamW step)
    assert [s for s, _ in mine] == theirs
    assert {dev for _, dev in mine} == {"cpu"}
    assert sum(s for s, _ in mine) == 0  # a steady step gives back all it takes
    # pointers pair up: every free is of a block allocated earlier and not yet freed
    live = set()
    for ptr, size, _ in rec.events():
        if size > 0:
            assert ptr not in live
            live.add(ptr)
        else:
            live.remove(ptr)
    assert not live


def test_raw_reads_match_the_events_in_chunks_and_from_any_index(gpt_step, monkeypatch):
    monkeypatch.setattr(native, "_CHUNK", 7)  # several reads per call
    with native.AllocationRecorder() as rec:
        gpt_step()
    events = rec.events()
    assert rec.count() == len(events) > 100
    for first in (0, 1, len(events) - 5, len(events)):
        raw = rec.raw(first)
        flat = [(raw[i], raw[i + 1], native.device_name(raw[i + 2])) for i in range(0, len(raw), 3)]
        assert flat == events[first:]


def test_peak_equals_the_allocators_peak(gpt_step):
    expected, _ = allocator_peak(gpt_step)
    with native.AllocationRecorder() as rec:
        gpt_step()
    peak, end = rec.peak()
    assert peak == expected
    assert end == 0
    run = top = 0
    for _, size, _ in rec.events():
        run += size
        top = max(top, run)
    assert top == peak  # the C++ running maximum and the Python one over the copied events agree


def test_only_the_block_is_recorded():
    # Earlier tests' cyclic garbage may hold tensors allocated under an earlier recorder; the CPU allocator
    # knows their sizes, so a garbage collection inside the block would report their frees. Collect it first
    # and keep the collector off while the block runs.
    gc.collect()
    gc.disable()
    try:
        older = torch.empty(1000)
        with native.AllocationRecorder() as rec:
            a = torch.empty(256)
            del older  # allocated before the recorder: the CPU allocator does not report its free (a known limit)
        b = torch.empty(512)
        del a, b
    finally:
        gc.enable()
    assert [size for _, size, _ in rec.events()] == [1024]


def test_the_slot_is_given_back_also_after_an_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with native.AllocationRecorder():
            torch.empty(10)
            raise RuntimeError("inside")
    # torch.profiler uses the same thread-local slot: it records allocations again
    sizes = [s for _, s in _profiler_allocations(lambda: torch.empty(300))]
    assert 1200 in sizes
    with native.AllocationRecorder() as rec:  # and a new recorder can start
        torch.empty(7)
    assert [s for _, s, _ in rec.events()] == [28, -28]


def test_cannot_start_under_torch_profiler_nor_twice():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        with pytest.raises(native.NativeUnavailable, match="torch.profiler"):
            native.AllocationRecorder().start()
    rec = native.AllocationRecorder().start()
    try:
        with pytest.raises(native.NativeUnavailable):
            native.AllocationRecorder().start()
        with pytest.raises(MemprofError, match="only once"):
            rec.start()
    finally:
        rec.stop()


def test_inside_a_recorder_torch_says_no_profiler_runs_and_refuses_to_start_one():
    """torch reads the thread's profiler slot as a profiler state (``_profiler_enabled``, a profiler starting):
    the recorder must read as a disabled one, not as memory of another type."""
    from torch.profiler import ProfilerActivity, profile

    assert not torch.autograd._profiler_enabled()
    with native.AllocationRecorder() as rec:
        torch.empty(10)
        assert not torch.autograd._profiler_enabled()
        with pytest.raises(RuntimeError, match="already enabled"):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
                pass
        torch.empty(20)
    assert [s for _, s, _ in rec.events()] == [40, -40, 80, -80]
    assert not torch.autograd._profiler_enabled()
    assert 1200 in [s for _, s in _profiler_allocations(lambda: torch.empty(300))]


def _conv_backward():
    x = torch.randn(4, 32, 48, 48)
    w = torch.randn(32, 32, 3, 3)
    g = torch.randn(4, 32, 48, 48)
    args = (g, x, w, [32], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    return torch.ops.aten.convolution_backward.default, args


def test_scratch_measured_natively_equals_a_profiler_session():
    func, args = _conv_backward()
    out, excess = scratch.cpu_measure(func, args, {})
    del out
    out, by_profiler = scratch._kineto_measure(func, args, {})
    assert excess == by_profiler
    assert excess > 1 << 20  # oneDNN's convolution backward works in memory it frees before returning


def test_turned_off_it_says_why_and_scratch_falls_back(monkeypatch):
    monkeypatch.setenv("MEMPROF_NATIVE", "0")
    native._reset_for_tests()
    try:
        assert not native.available()
        assert "MEMPROF_NATIVE=0" in native.unavailable_reason()
        with pytest.raises(native.NativeUnavailable, match="MEMPROF_NATIVE=0"):
            native.AllocationRecorder()
        func, args = _conv_backward()
        _, excess = scratch.cpu_measure(func, args, {})
        assert excess > 1 << 20
    finally:
        native._reset_for_tests()


def test_a_failed_build_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    with pytest.raises(native.NativeUnavailable, match="failed"):
        native.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeUnavailable, match="could not run"):
        native.build(tmp_path)


def test_an_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(native.NativeUnavailable, match="MEMPROF_CACHE_DIR"):
        native.build(blocker / "cache")


@pytest.mark.slow
def test_build_is_cached_per_torch_build(tmp_path):
    first = native.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
