"""Tracker behaviour: shared storage, in-place ops, grads, resizes, steps, timeline, and leaving no trace."""

import copy

import pytest
import torch
import torch.nn as nn

import memprof
from memprof.errors import DeviceMemoryExceeded, TrackingError
from memprof.tracking.groundtruth import allocator_peak, live_bytes
from tests.common import CASES, hook_registries, make_optimizer, train_step


def _peaks(case, step, opt_name="adamw"):
    """(tracker peak, allocator peak) of ``step(model, opt)`` run on two identical copies."""
    model, opt = case.model, make_optimizer(opt_name, case.model.parameters())
    ref = copy.deepcopy(model)
    ref_opt = make_optimizer(opt_name, ref.parameters())

    def live(m, o):
        tensors = list(m.parameters()) + list(m.buffers()) + case.batch
        tensors += [v for st in o.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        return live_bytes(tensors + [p.grad for p in m.parameters()])

    expected, _ = allocator_peak(lambda: step(ref, ref_opt), live(ref, ref_opt))
    with memprof.track(model, opt) as tracker:
        step(model, opt)
    return tracker.profile, expected


def test_gradient_accumulation_over_micro_batches_matches_allocator():
    case = CASES["gpt"]()

    def step(m, o):
        for _ in range(3):
            (case.loss(m) / 3).backward()
        o.step()
        o.zero_grad(set_to_none=True)

    prof, expected = _peaks(case, step)
    assert prof.peak_bytes == pytest.approx(expected, rel=1e-3)
    assert prof.steps[0].micro_batches == 3
    grads = live_bytes(p.grad for p in case.model.parameters())  # None after zero_grad: hand count instead
    assert grads == 0
    assert prof.modules[""].grad_bytes == live_bytes(case.model.parameters())


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_modes_match_allocator(set_to_none):
    case = CASES["tied-inplace"]()

    def step(m, o):
        for _ in range(2):
            case.loss(m).backward()
            o.step()
            o.zero_grad(set_to_none=set_to_none)

    prof, expected = _peaks(case, step, "sgd-momentum")
    assert prof.peak_bytes == pytest.approx(expected, rel=1e-3)
    assert len(prof.steps) == 2
    end_grads = prof.steps[-1].end_bytes - prof.steps[-1].start_bytes
    assert end_grads == 0  # steady state: a step leaves memory where it found it


def test_views_and_in_place_ops_count_each_storage_once():
    def block():
        y = torch.empty(1024, 256)  # 1 MiB
        v = y.view(256, 1024).t()  # views: no new memory
        v.add_(1.0)  # in place: no new memory
        w = v.contiguous()  # a copy: 1 MiB more (plus the copy kernel's own scratch)
        del v, y, w

    expected, _ = allocator_peak(block)
    with memprof.track() as tracker:
        block()
    prof = tracker.profile
    assert prof.peak_bytes == expected
    storages = [t for t in prof.peak.tensors if t.label != "clone workspace"]
    assert sorted(t.bytes for t in storages) == [1 << 20, 1 << 20]
    assert prof.steps[-1].end_bytes == 0


def test_storages_resized_in_place_are_followed():
    t = torch.empty(1 << 20, dtype=torch.uint8)
    storage = t.untyped_storage()
    with memprof.track() as tracker:
        t.add_(0)  # touches t: found live
        storage.resize_(0)  # FSDP frees unsharded parameters like this
        a = torch.empty(1 << 19, dtype=torch.uint8)
        storage.resize_(1 << 21)  # ... and all-gathers back into them like this
        storage.resize_(0)
        del a
    prof = tracker.profile
    assert prof.peak_bytes == (1 << 21) + (1 << 19)
    assert prof.steps[-1].end_bytes == 0


def test_untouched_live_memory_is_not_counted_but_touched_memory_is():
    outside = torch.randn(1000)
    used = torch.randn(1000)
    with memprof.track() as tracker:
        used.add_(used)
    assert tracker.profile.peak_bytes == used.nbytes
    assert tracker.profile.peak.by_category["other"] == used.nbytes
    del outside


def test_memory_first_seen_through_a_view_is_found_live_once():
    # View ops take a short path (op_kinds.ALIAS): the viewed storage is found through the output, also for
    # ops returning several views (split), and labelled like any other storage met as an op's input.
    whole = torch.randn(1 << 16)
    parts = torch.randn(1 << 16)
    with memprof.track() as tracker:
        v = whole.view(256, 256).t()
        a, b = parts.split(1 << 15)
        (v.sum() + a.sum() + b.sum()).item()
    prof = tracker.profile
    found = sorted((t.bytes, t.label, t.shape) for t in prof.peak.tensors if t.label == "found live")
    assert found == [(whole.nbytes, "found live", (1 << 16,)), (parts.nbytes, "found live", (1 << 16,))]
    assert prof.peak.by_category["other"] == whole.nbytes + parts.nbytes


def test_timeline_is_bounded_and_keeps_the_peak():
    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    with memprof.track(model, opt, max_samples=120) as tracker:
        for _ in range(6):
            train_step(case, model, opt)
    prof = tracker.profile
    assert len(prof.steps) == 6
    assert len(prof.timeline) <= 120 + 6 * 5  # buckets, plus the 5 phase changes of each step
    assert max(s.total_bytes for s in prof.timeline) == prof.peak_bytes
    for s in prof.timeline:
        assert sum(s.by_category) == s.total_bytes
    indices = [s.index for s in prof.timeline]
    assert indices == sorted(indices)
    assert {s.phase for s in prof.timeline} == {"forward", "backward", "optimizer", "other"}


def test_steps_and_phase_peaks():
    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            train_step(case, model, opt)
    prof = tracker.profile
    assert [s.index for s in prof.steps] == [0, 1]
    for s in prof.steps:
        assert s.peak_bytes == max(s.phase_peak_bytes.values())
    assert prof.peak_bytes == max(s.peak_bytes for s in prof.steps)
    # Step 0 creates AdamW's state (2 moments + a step counter per parameter) inside optimizer.step();
    # after it: parameters, optimizer state and the batch, hand-counted.
    state = [v for st in opt.state.values() for v in st.values()]
    assert prof.steps[0].end_bytes == live_bytes(list(model.parameters()) + state + case.batch)
    assert prof.steps[1].start_bytes == prof.steps[0].end_bytes == prof.steps[1].end_bytes
    assert prof.peak.tensors and prof.peak.tensors[0].bytes == max(t.bytes for t in prof.peak.tensors)


def test_peak_explained_names_phase_module_and_tensors():
    model = nn.Sequential(nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 256))
    x = torch.randn(512, 256)
    with memprof.track(model) as tracker:
        model(x).sum().backward()
    prof = tracker.profile
    assert prof.peak.phase in ("forward", "backward")
    top = prof.peak.tensors[0]
    assert top.bytes == 512 * 4096 * 4
    assert top.shape == (512, 4096) and top.dtype == "float32"
    assert top.module in ("0", "1", "2")
    assert sum(prof.peak.by_category.values()) == prof.peak_bytes
    assert prof.peak.by_device == {"cpu": prof.peak_bytes}


def test_save_and_load_round_trip_exactly(tmp_path):
    case = CASES["cnn-batchnorm"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    with memprof.track(model, opt) as tracker:
        train_step(case, model, opt)
    prof = tracker.profile
    path = tmp_path / "p.json"
    prof.save(path)
    loaded = memprof.load(path)
    assert loaded == prof
    assert loaded.modules["features.0.0"].param_bytes == prof.modules["features.0.0"].param_bytes
    assert loaded.environment.torch_version == torch.__version__
    assert loaded.schema == "memprof.profile/1"


def test_exception_inside_block_leaves_no_trace():
    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    before = hook_registries(model, opt)
    state = copy.deepcopy(model.state_dict())

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with memprof.track() as tracker:
            loss = case.loss(model)
            loss.backward()
            raise Boom()
    assert hook_registries(model, opt) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert tracker.profile.peak_bytes > 0  # the partial profile is still there for forensics


def test_out_of_memory_inside_block_leaves_no_trace():
    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    before = hook_registries(model, opt)
    with pytest.raises(RuntimeError, match="(?i)alloc|memory"):
        with memprof.track(model, opt):
            case.loss(model).backward()
            torch.empty(1 << 62, dtype=torch.uint8)  # the real CPU allocator refuses this
    assert hook_registries(model, opt) == before
    train_step(case, model, opt)  # training goes on untouched
    assert hook_registries(model, opt) == before


def test_device_memory_rehearsal_stops_with_a_partial_profile():
    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    with memprof.track(model, opt) as tracker:
        train_step(case, model, opt)
    real = tracker.profile.peak_bytes
    before = hook_registries(model, opt)
    with pytest.raises(DeviceMemoryExceeded) as info:
        with memprof.track(model, opt, device_memory=real - 1):
            train_step(case, model, opt)
    assert info.value.profile is not None
    assert info.value.profile.peak_bytes > real - 1
    assert hook_registries(model, opt) == before


def test_track_rejects_what_it_cannot_track():
    with pytest.raises(TrackingError, match="model must be a Module"):
        memprof.track(model="gpt2")
    with pytest.raises(TrackingError, match="optimizer must be a Optimizer"):
        memprof.track(optimizer=[torch.randn(2)])
    with pytest.raises(TrackingError, match="only after tracking stops"):
        _ = memprof.track().profile
    assert issubclass(TrackingError, memprof.MemprofError)


def test_functional_model_without_modules_gets_activation_category():
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(256, 512)
    with memprof.track() as tracker:
        h = torch.tanh(x @ w)  # no nn.Module anywhere
        (h @ w).sum().backward()
    by_phase = tracker.profile.steps[0].phase_peak_bytes
    assert by_phase["backward"] > 0
    act = next(s for s in tracker.profile.timeline if s.phase == "backward").category("activation")
    assert act >= h.nbytes  # tanh's output is saved for backward


def test_with_an_accelerator_host_memory_is_counted_on_its_device_only():
    """``device_as`` stands in for a GPU: CPU storages count as "cuda:0", meta storages as the host."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 256)
    host_bytes = 3 * 2**20

    def step(with_host):
        h = torch.empty(host_bytes, dtype=torch.uint8, device="meta") if with_host else None
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        del h

    step(False)  # momentum buffers made
    profiles = {}
    for with_host in (False, True):
        with memprof.track(model, opt, device_as={"cpu": "cuda:0", "meta": "cpu"}, calibrate=False,
                           optimizer_replay=False) as tracker:
            step(with_host)
        profiles[with_host] = tracker.profile
    plain, mixed = profiles[False], profiles[True]
    assert mixed.peak_bytes == plain.peak_bytes  # the host tensor is not device memory
    assert [s.total_bytes for s in mixed.timeline] == [s.total_bytes for s in plain.timeline]
    devices = {d.device: d.peak_bytes for d in mixed.devices}
    assert devices == {"cuda:0": plain.peak_bytes, "cpu": host_bytes}
    assert any("host memory is given per device only" in n for n in mixed.notes)


def test_a_finished_tracker_is_freed_without_the_garbage_collector():
    # Thousands of records a step: left in reference cycles they would wait for a full collection, whose
    # cost would land on some later step.
    import gc

    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    train_step(case, model, opt)
    gc.collect()
    train_step(case, model, opt)
    assert gc.collect() == 0  # the untracked step itself leaves no cycles
    with memprof.track(model, opt) as tracker:
        train_step(case, model, opt)
    profile = tracker.profile
    del tracker
    assert gc.collect() == 0
    assert profile.peak_bytes > 0


def test_profile_is_built_on_first_read_from_records_alone():
    # stop() keeps plain records; the profile built later matches one built at once, and the tracker kept
    # neither the model nor anything that waits for the garbage collector.
    import gc
    import weakref

    def run(read_now):
        case = CASES["gpt"]()
        model, opt = case.model, make_optimizer("adamw", case.model.parameters())
        train_step(case, model, opt)
        with memprof.track(model, opt) as tracker:
            train_step(case, model, opt)
        prof = tracker.profile if read_now else None
        alive = weakref.ref(model)
        del model, opt, case
        gc.collect()
        return tracker, prof, alive

    _, now, _ = run(read_now=True)
    tracker, _, alive = run(read_now=False)
    assert alive() is None
    assert tracker._profile is None  # not built yet
    later = tracker.profile
    assert later is tracker.profile
    assert later.peak.bytes == now.peak.bytes and later.peak.by_category == now.peak.by_category
    assert later.peak.module == now.peak.module and later.peak.phase == now.peak.phase
    assert {k: (m.param_bytes, m.activation_bytes) for k, m in later.modules.items()} == {
        k: (m.param_bytes, m.activation_bytes) for k, m in now.modules.items()}
    assert [s.peak_bytes for s in later.steps] == [s.peak_bytes for s in now.steps]

    tracker, _, _ = run(read_now=False)
    del tracker
    assert gc.collect() == 0


def _untimed(obj):
    """A saved profile without its clock readings (times, dates and what derives from them differ from run
    to run): floats become None; bytes are integers and stay."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if "ms" not in k and k != "created"}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return None if isinstance(obj, float) else obj


def test_steps_kept_and_replayed_at_the_end_give_the_step_by_step_profile(monkeypatch, tmp_path):
    # A finished step is kept, not replayed, until the profile is built (or the kept log grows too long):
    # the profile is the one a replay after each step gives, per-op figures of each step included.
    import json

    import memprof.tracking.phases as phases_mod

    def run(cap, name):
        monkeypatch.setattr(phases_mod, "BACKLOG_EVENTS", cap)
        torch.manual_seed(0)
        case = CASES["gpt"]()
        model, opt = case.model, make_optimizer("adamw", case.model.parameters())
        replayed_while_running = []
        with memprof.track(model, opt) as tracker:
            for _ in range(4):
                train_step(case, model, opt)
                replayed_while_running.append(len(tracker.replay.steps))
        tracker.profile.save(tmp_path / name)
        return _untimed(json.loads((tmp_path / name).read_text())), replayed_while_running

    each, replayed_each = run(-1, "each.json")
    kept, replayed_kept = run(10**9, "kept.json")
    assert replayed_each == [0, 1, 2, 3] and replayed_kept == [0, 0, 0, 0]
    assert kept == each
    assert len(kept["steps"]) == 4 and kept["modules"][""]["forward_op_bytes"]


def test_a_failed_profile_build_is_reported_when_read_and_on_stop_builds_at_stop(monkeypatch):
    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    before = hook_registries(model, opt)
    seen = []
    with memprof.track(model, opt, on_stop=lambda t: seen.append(t._profile)):
        train_step(case, model, opt)
    assert seen and seen[0] is not None and seen[0].peak_bytes > 0

    def boom(self):
        raise ValueError("broken build")

    monkeypatch.setattr(memprof.tracking.tracker.Tracker, "_build_profile", boom)
    with memprof.track(model, opt) as tracker:
        train_step(case, model, opt)
    with pytest.raises(TrackingError, match="broken build"):
        _ = tracker.profile
    assert hook_registries(model, opt) == before


def test_cuda_initialised_inside_the_block_switches_on_the_allocator_counters(monkeypatch):
    # A script run under `memprof run` initialises CUDA after the tracker started: the first CUDA storage
    # the ledger sees sets up the allocator's peak counters and the CUDA op calibration from then on.
    # (No GPU here: fake CUDA tensors, and a stand-in for the counters that records what it is asked.)
    from torch._subclasses.fake_tensor import FakeTensorMode

    import memprof.tracking.device_watch as device_watch_mod

    calls = []

    class Folder:
        def start(self, index):
            calls.append(("start", index))

        def measure(self, func, args, kwargs, device):
            calls.append(("measure", func.__name__))
            return func(*args, **kwargs), 0

        def summary(self, index):
            return {}

    monkeypatch.setattr(device_watch_mod, "CudaPeakFolder", Folder)
    monkeypatch.setattr(device_watch_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(device_watch_mod, "cuda_device_facts", lambda i: {"name": "fake GPU", "capacity_bytes": 1 << 30})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with FakeTensorMode():
        with memprof.track() as tracker:
            a = torch.ones(256, 256)  # host memory: no CUDA yet
            assert tracker._devices.cuda_folder is None and not calls
            b = torch.ones(256, 256, device="cuda")
            c = b * 2
    assert calls[0] == ("start", 0)
    assert ("measure", "mul.Tensor") in calls
    prof = tracker.profile
    assert {d.device for d in prof.devices} == {"cpu", "cuda:0"}
    assert prof.peak_bytes == 2 * 256 * 256 * 4  # the CUDA device's bytes (b and c); the host's apart
    assert any("CUDA was initialised inside the tracked block" in n for n in prof.notes)
    del a, c


def test_device_memory_limit_counts_the_cuda_device_alone(monkeypatch):
    # Rehearsing a GPU's memory: host storages (a model built on the CPU, a host batch) do not count
    # against the device limit. Fake CUDA tensors (no GPU here).
    from torch._subclasses.fake_tensor import FakeTensorMode

    import memprof.tracking.device_watch as device_watch_mod

    mib = 1 << 20
    with FakeTensorMode():
        with memprof.track(device_memory=3 * mib, calibrate=False) as tracker:
            dev = torch.empty(2 * mib, dtype=torch.uint8, device="cuda")
            host = torch.empty(4 * mib, dtype=torch.uint8)  # over the limit, but on the host
            assert tracker.ledger.limited_total() == 2 * mib and tracker.ledger.total == 6 * mib
            with pytest.raises(DeviceMemoryExceeded, match="would reach 4.00 MiB"):
                torch.empty(2 * mib, dtype=torch.uint8, device="cuda")
    del host, dev
    # without CUDA the host is the device: the same host tensor is over the limit ...
    with pytest.raises(DeviceMemoryExceeded):
        with memprof.track(device_memory=3 * mib, calibrate=False):
            torch.empty(4 * mib, dtype=torch.uint8)
    # ... and where CUDA is available, the GPU is the device from the start (a model built on the host first)
    monkeypatch.setattr(device_watch_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(device_watch_mod.torch.cuda, "is_initialized", lambda: False)
    with memprof.track(device_memory=3 * mib, calibrate=False) as tracker:
        host = torch.empty(4 * mib, dtype=torch.uint8)
    assert tracker.profile.peak_bytes == 4 * mib  # not stopped: the host's bytes are not the device's
    del host


def test_torch_compile_inside_the_block_never_compiles_the_trackers_own_frames():
    # The ledger's __torch_dispatch__ is marked for dynamo to skip with everything it calls (in place of
    # TorchDispatchMode's per-op wrapper). Unmarked, dynamo traces into them here and fails on perf_counter.
    import torch._dynamo
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()

    def g(x):
        y = x.sin().exp()  # no Python scalars: those become tensors the dispatcher never sees
        return y.cos()

    f = torch.compile(g, backend=counter)
    x = torch.randn(1 << 18, requires_grad=True)

    def block(fn):
        fn(x).sum().backward()
        x.grad = None

    expected, _ = allocator_peak(lambda: block(g))  # run eagerly, x not counted (live before)
    torch._dynamo.reset()
    try:
        with memprof.track() as tracker:
            block(f)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 0  # the mode makes dynamo skip the user's frames too: all ran eagerly
    assert tracker.profile.peak_bytes == expected + (1 << 20)  # x is found live: its MiB counts, unlike above


def test_a_hooks_own_time_is_counted_once_when_hooks_nest():
    """The clock leaves out memprof's own time; a hook run inside another must not be subtracted twice (a
    clock that stalls would give steps of 0 ms)."""
    import time

    from memprof.tracking.ledger import Ledger

    led = Ledger()
    inner = led.own_time(lambda: time.sleep(0.02))

    def outer_work():
        led.overhead += 0.5  # what an op inside the hook adds as its own overhead
        inner()

    t0 = time.perf_counter()
    led.own_time(outer_work)()
    elapsed = time.perf_counter() - t0
    assert 0.02 <= led.overhead <= elapsed
