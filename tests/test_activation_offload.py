"""Activation offload to host memory: numerics, remove(), the estimate on emulated CUDA against the plain
profile's per-unit bytes, the planner's prediction against the estimate of its plan applied, plan files, and
CPU plans that never offload. A GPU twin checks the real allocator (skipped without CUDA)."""

import dataclasses

import pytest
import torch

import memprof
from memprof.activation_offload import copies_used
from memprof.estimation.activation_offload import HostActivations
from memprof.estimation.sources import EstimateSource
from memprof.plans import CheckpointChoice, load_plan
from memprof.policy.engine import plan
from memprof.zoo import GPT, GPTConfig, gpt_batch

CFG = GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=64, vocab_size=1000)
UNITS = [f"blocks.{i}" for i in range(CFG.n_layer)]


def _build():
    torch.manual_seed(0)
    return GPT(CFG)


def _batch():
    torch.manual_seed(1)
    return gpt_batch(CFG, 4)


def _with_modes(the_plan, mode, units=UNITS):
    return dataclasses.replace(the_plan, checkpoint=tuple(CheckpointChoice(u, mode) for u in units))


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def cuda_estimates():
    """The plain estimate of emulated CUDA, a plan to edit, and the estimate with every block offloaded."""
    plain = memprof.estimate(_build, _batch, device="cuda")
    base = plan(plain, plain.peak_bytes)
    offload_plan = _with_modes(base, "offload")

    def build_offloaded():
        m = _build()
        memprof.apply(m, offload_plan)
        return m

    offloaded = memprof.estimate(build_offloaded, _batch, device="cuda")
    return plain, base, offloaded


def test_offloaded_units_compute_the_same_loss_and_grads_on_cpu_and_under_the_emulation(cuda_estimates):
    _, base, _ = cuda_estimates
    x, y = _batch()
    model = _build()
    want_loss, want = _loss_and_grads(model, x, y)
    with memprof.apply(model, _with_modes(base, "offload")):
        loss, grads = _loss_and_grads(model, x, y)  # CPU tensors: nothing moves
        copies = HostActivations(emulated=True)  # the estimator's copies, on real tensors: every saved tensor moves
        with copies_used(copies):
            e_loss, e_grads = _loss_and_grads(model, x, y)
    assert copies.copied_bytes > 0
    for got_loss, got in ((loss, grads), (e_loss, e_grads)):
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_remove_restores_the_units_exactly(cuda_estimates):
    _, base, _ = cuda_estimates
    model = _build()
    before = {n: (dict(m.__dict__.get("_forward_hooks", {})), "forward" in m.__dict__, type(m))
              for n, m in model.named_modules()}
    handle = memprof.apply(model, _with_modes(base, "offload"))
    assert handle.units == dict.fromkeys(UNITS, "offload")
    assert all("forward" in model.get_submodule(u).__dict__ for u in UNITS)
    handle.remove()
    after = {n: (dict(m.__dict__.get("_forward_hooks", {})), "forward" in m.__dict__, type(m))
             for n, m in model.named_modules()}
    assert after == before
    assert all(model.get_submodule(u).forward.__func__ is type(model.get_submodule(u)).forward for u in UNITS)


def test_estimate_counts_offloaded_activations_on_the_host_not_the_device(cuda_estimates):
    plain, _, offloaded = cuda_estimates
    acts = {u: plain.modules[u].activation_bytes for u in UNITS}
    outs = {u: plain.modules[u].output_bytes for u in UNITS}
    # each offloaded unit leaves on the device only its output (its inputs are never copied)
    assert {u: offloaded.modules[u].activation_bytes for u in UNITS} == outs
    moved = sum(acts[u] - outs[u] for u in UNITS)
    saved = plain.peak_bytes - offloaded.peak_bytes
    # the device saves what left it, less at most one unit's copies brought back in its backward
    assert moved - max(acts.values()) <= saved <= moved
    host = {d.device: d.peak_bytes for d in offloaded.devices}
    assert host["cpu"] == int(offloaded.assumptions["activation_host_peak_bytes"]) >= moved
    assert offloaded.peak.by_device == {"cuda:0": offloaded.peak_bytes}


def test_cpu_estimates_and_cpu_plans_never_offload():
    prof = memprof.estimate(_build, _batch, device="cpu")
    source = EstimateSource(_build, _batch, device="cpu")
    p = plan(prof, int(prof.peak_bytes * 0.9), levers=("checkpoint", "activation-offload"), source=source)
    assert "offload" not in [c.mode for c in p.checkpoint]
    assert any("activation offload not weighed: on a CPU" in note for note in p.assumptions.values())
    assert "activation_host_peak_bytes" not in prof.assumptions


@pytest.fixture(scope="module")
def planned(cuda_estimates):
    plain, _, offloaded = cuda_estimates
    source = EstimateSource(_build, _batch, device="cuda")
    saved = plain.peak_bytes - offloaded.peak_bytes
    budgets = [plain.peak_bytes - saved // 3, offloaded.peak_bytes]
    # recomputing this tiny model's blocks is cheaper than copying them over PCIe at H100 speeds: the
    # recompute modes are left out here so that the DP chooses between keep and offload
    return plain, source, [plan(plain, b, levers=("checkpoint", "activation-offload"), source=source,
                                modes=("keep", "offload")) for b in budgets], budgets


def test_planner_offloads_when_asked_and_predicts_the_estimate_of_its_plan(planned):
    plain, _, plans, budgets = planned
    for p, budget in zip(plans, budgets):
        assert p.predicted_peak_bytes <= budget
        modes = [c.mode for c in p.checkpoint]
        assert "offload" in modes, modes

        def build_applied(p=p):
            m = _build()
            memprof.apply(m, p)
            return m

        applied = memprof.estimate(build_applied, _batch, device="cuda")
        assert abs(applied.peak_bytes / p.predicted_peak_bytes - 1) <= 0.005, (applied.peak_bytes,
                                                                                 p.predicted_peak_bytes, modes)
        assert any("priced from the host link's bandwidth (modelled, PCIe), without overlap" in note
                   for note in p.assumptions.values())
        assert any(line.startswith("Activation offload of") and "PCIe" in line for line in p.explanation)


def test_without_the_lever_no_unit_is_offloaded(planned):
    plain, source, _, budgets = planned
    p = plan(plain, budgets[0], levers=("checkpoint",), source=source)
    assert "offload" not in [c.mode for c in p.checkpoint]


def test_plan_file_round_trips_the_offload_mode(planned, tmp_path):
    _, _, plans, _ = planned
    path = plans[0].save(tmp_path / "offload.toml")
    again = load_plan(path)
    assert again == plans[0]
    assert "offload" in [c.mode for c in again.checkpoint]


@pytest.mark.gpu
def test_offload_on_cuda_measures_as_estimated():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    plain = memprof.estimate(_build, _batch, device="cuda")
    p = _with_modes(plan(plain, plain.peak_bytes), "offload")

    def build_applied():
        m = _build()
        memprof.apply(m, p)
        return m

    est = memprof.estimate(build_applied, _batch, device="cuda")
    model = _build().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (t.cuda() for t in _batch())
    with memprof.apply(model, p):
        for _ in range(2):  # the first step makes the optimizer state
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    assert abs(measured / est.peak_bytes - 1) <= 0.02, (measured, est.peak_bytes)
