"""CUDA checks (skipped without a GPU): tracker vs the caching allocator, estimate vs measurement, apply.

The ground truth mirrors the CPU tests: the bytes live before the step (hand-counted) plus the allocator's
own rise during the step (``reset_peak_memory_stats``, then ``memory_stats()`` peaks minus the level
before), so memory the step never touches (cuBLAS workspaces made earlier) is left out of both sides.
"""

import copy

import pytest
import torch

import memprof
from memprof.tracking.groundtruth import live_bytes
from memprof.training import default_step
from memprof.zoo import GPT, GPTConfig, gpt_batch

pytestmark = pytest.mark.gpu

CFG = GPTConfig(n_layer=6, n_embd=512, n_head=8, block_size=512, vocab_size=8192)


@pytest.fixture(autouse=True, scope="module")
def _warm_libraries():
    """cuBLAS makes a workspace per thread and stream at its first product, outside any tensor op; make the
    forward's and the backward's (autograd's thread) before anything is measured, as after any first step."""
    lin = torch.nn.Linear(64, 64, device="cuda")
    x = torch.randn(8, 16, 64, device="cuda", requires_grad=True)
    q = lin(x).view(8, 16, 4, 16).transpose(1, 2)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    torch.cuda.synchronize()


def _allocator_step_peak(model, opt, batch, key="active_bytes.all"):
    live = list(model.parameters()) + [v for st in opt.state.values() for v in st.values() if v.is_cuda] + list(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_stats()[f"{key}.current"]
    default_step(model, batch, opt)
    torch.cuda.synchronize()
    peak = torch.cuda.memory_stats()[f"{key}.peak"]
    return live_bytes(live, round_to=512) + peak - before


def _gpt_step_setup():
    """The GPT, its AdamW and a batch on the GPU (seeded)."""
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), gpt_batch(CFG, 8, device="cuda")


def _twin(model):
    """An identical copy with its own AdamW: the ground truth's runs."""
    ref = copy.deepcopy(model)
    return ref, torch.optim.AdamW(ref.parameters(), lr=1e-4)


def test_tracker_peak_matches_active_bytes_peak_within_half_a_percent():
    model, opt, batch = _gpt_step_setup()
    ref, ref_opt = _twin(model)
    for _ in range(2):  # first and steady step
        expected = _allocator_step_peak(ref, ref_opt, batch)
        with memprof.track(model, opt) as tracker:
            default_step(model, batch, opt)
        got = tracker.profile.peak_bytes
        assert abs(got - expected) <= 0.005 * expected, (got, expected)
    dev = tracker.profile.devices[0]
    assert dev.device.startswith("cuda") and dev.allocator["active_peak"] > 0 and dev.capacity_bytes


def test_one_tracker_over_several_steps_matches_the_allocator_in_each():
    # Steps are replayed when the profile is built, not as each ends (no wait for the GPU at step ends);
    # each step's peak still matches the allocator's, and module times are CUDA events' times.
    model, opt, batch = _gpt_step_setup()
    ref, ref_opt = _twin(model)
    expected = [_allocator_step_peak(ref, ref_opt, batch) for _ in range(3)]
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            default_step(model, batch, opt)
    steps = tracker.profile.steps
    assert len(steps) == 3
    for step, want in zip(steps, expected):
        assert abs(step.peak_bytes - want) <= 0.005 * want, (step.peak_bytes, want)
    assert tracker.profile.modules["blocks.0"].forward_ms > 0


def test_estimate_matches_cuda_measurement_within_one_percent():
    est = memprof.estimate(lambda: GPT(CFG), lambda: gpt_batch(CFG, 8), device="cuda")
    model, opt, batch = _gpt_step_setup()
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            default_step(model, batch, opt)
    real = tracker.profile.peak_bytes
    assert abs(est.peak_bytes - real) <= 0.01 * real, (est.peak_bytes, real)


def test_plan_applied_on_cuda_meets_budget_and_prediction():
    model, opt, batch = _gpt_step_setup()
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            default_step(model, batch, opt)
    prof = tracker.profile
    plan = memprof.plan(prof, int(prof.peak_bytes * 0.8))
    with memprof.apply(model, plan):
        with memprof.track(model, opt) as t2:
            for _ in range(2):
                default_step(model, batch, opt)
    measured = t2.profile.peak_bytes
    assert measured <= plan.budget_bytes
    assert abs(measured - plan.predicted_peak_bytes) <= 0.02 * plan.predicted_peak_bytes
    assert live_bytes(model.parameters()) > 0


def test_module_times_follow_the_current_stream():
    # Module times are CUDA events recorded on the stream current at each mark: a step run on a side
    # stream is timed there (events on the default stream would time nothing of it).
    model, opt, batch = _gpt_step_setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with memprof.track(model, opt) as tracker:
            default_step(model, batch, opt)
    torch.cuda.synchronize()
    mods = tracker.profile.modules
    assert mods["blocks.0"].forward_ms > 0 and mods["blocks.0"].backward_ms > 0
    assert mods[""].forward_ms >= mods["blocks.0"].forward_ms


def test_profile_records_the_drivers_view_and_memprof_gpus_lists_the_device():
    from click.testing import CliRunner

    from memprof.cli import main

    model, opt, batch = _gpt_step_setup()
    with memprof.track(model, opt) as tracker:
        default_step(model, batch, opt)
    dev = tracker.profile.devices[0]
    # NVML counts the whole device (torch's total leaves out what the driver reserves) and this process's use
    assert dev.nvml_total_bytes >= dev.capacity_bytes > 0
    assert dev.nvml_used_bytes >= torch.cuda.memory_reserved()
    result = CliRunner().invoke(main, ["gpus"])
    assert result.exit_code == 0 and torch.cuda.get_device_name(0) in result.output


CUDA_SCRIPT = '''
import torch
import torch.nn as nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(64, 256, device="cuda")
for _ in range(3):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print("trained")
'''


def test_memprof_run_tracks_an_unmodified_cuda_script(tmp_path):
    from click.testing import CliRunner

    from memprof.cli import main

    script = tmp_path / "train_cuda.py"
    script.write_text(CUDA_SCRIPT)
    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["run", "--steps", "2", "--out", str(out), str(script)])
    assert result.exit_code == 0, result.output
    prof = memprof.load(out)
    # the model is built on the host and moved: both devices are listed, the totals are the GPU's
    gpu = next(d for d in prof.devices if d.device.startswith("cuda"))
    assert gpu.allocator["active_peak"] > 0  # CUDA was initialised inside the block: counters from then on
    params = (256 * 1024 + 1024 + 1024 * 256 + 256) * 4
    # steady step: params, grads and two AdamW moments are all live at the optimizer step
    assert prof.peak.by_category["param"] == params and prof.peak_bytes >= 4 * params
    assert prof.peak_bytes == gpu.peak_bytes
