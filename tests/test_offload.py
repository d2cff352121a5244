"""CPU offload (FSDP2 CPUOffloadPolicy): the estimator's host/device split against hand counts, the planner's
choice, the step-time model, the plan file, and bad input.

The model is the small GPT of the gloo tests (2 blocks, 64 wide): every parameter's first dimension is even,
so rank 0's shard of a parameter is exactly half of it at world size 2.
"""

import math

import pytest
import torch

from memprof.errors import MemprofError
from memprof.estimation import EstimateError, estimate
from memprof.estimation.sources import EstimateSource
from memprof.plans import Plan, PlanValueError, Sharding, Source, load_plan
from memprof.policy.apply import ApplyError, apply
from memprof.policy.costs import CommModel, cpu_optimizer_ms, host_transfer_ms, offload_ms
from memprof.policy.engine import plan
from memprof.sharding import shard_model
from tests.distributed import fsdp_cases


def _round(n: int) -> int:  # the CUDA caching allocator's 512-byte blocks
    return -(-n // 512) * 512


def _shards(world_size: int) -> list[int]:
    """Rank 0's shard of each parameter in bytes (fp32, dim 0 split in ``world_size`` chunks, the first padded),
    each parameter once (the tied embedding / head weight is one parameter)."""
    model = fsdp_cases.build()
    return [math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0]) * 4 for p in model.parameters()]


@pytest.fixture(scope="module")
def source():
    return EstimateSource(fsdp_cases.build, fsdp_cases.batch, device="cuda", step=None)


def test_host_holds_the_ranks_shards_grads_and_adamw_state_and_the_device_drops_them(source):
    dense = source.profile("fp32", "full", 2)
    off = source.profile("fp32", "full", 2, offload=True)
    shards = _shards(2)
    n = len(shards)
    # Host, per rank, when the optimizer step starts: the parameter shards, as much gradient, AdamW's two states
    # and its 0-d fp32 step counter per parameter. Exact: the host does not round like the CUDA allocator.
    assert int(off.assumptions["host_bytes"]) == 4 * sum(shards) + 4 * n
    host = {d.device: d.peak_bytes for d in off.devices}["cpu"]
    assert host >= int(off.assumptions["host_peak_bytes"]) >= 4 * sum(shards) + 4 * n  # + the step's temporaries
    assert off.assumptions["sharding"] == "full + cpu offload" and "CPUOffloadPolicy" in off.assumptions["offload"]
    # Device: between steps only the batch is left (8 x 256 int64 ids and targets).
    assert off.steps[-1].start_bytes == _round(2 * 8 * 256 * 8)
    assert off.peak.by_category["optimizer"] == off.peak.by_category["grad"] == 0
    # The peak (in backward, before the first gradient is reduced) drops by what the device held for the whole
    # step without offload: the shards and AdamW's state as the device rounds them, and the step counters
    # (host tensors in a real run; the emulation counts each as one 512-byte CUDA block).
    resident = dense.steps[-1].start_bytes - off.steps[-1].start_bytes
    assert resident == 3 * sum(_round(s) for s in shards) + 512 * n
    assert dense.peak_bytes - off.peak_bytes == resident


def test_offload_at_world_size_1_is_fsdp_on_one_rank_with_everything_on_the_host(source):
    dense = source.profile("fp32")
    off = source.profile("fp32", "full", 1, offload=True)
    assert off.environment.world_size == 1
    params = sum(_shards(1))
    assert int(off.assumptions["host_bytes"]) == 4 * params + 4 * len(_shards(1))
    # Without offload the device holds every parameter and all of AdamW's state through backward; with it, only
    # the unit being computed (and the root's, which FSDP keeps from forward to backward).
    assert off.peak_bytes < dense.peak_bytes - 2 * params
    assert off.peak.by_category["param"] < dense.peak.by_category["param"]


def test_estimate_leaves_fsdp_unpatched():
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    before = FSDPParam.__dict__["all_gather_inputs"]
    estimate(fsdp_cases.build, fsdp_cases.batch, device="cuda", world_size=2, sharding="full", offload=True)
    assert FSDPParam.__dict__["all_gather_inputs"] is before
    assert not torch.distributed.is_initialized()


def test_planner_offloads_only_when_nothing_else_fits(source, tmp_path):
    base = source.profile("fp32")
    full = source.profile("fp32", "full", 2)
    off = source.profile("fp32", "full", 2, offload=True)
    comm = CommModel(host_bandwidth_gbs=20.0)
    tight = plan(base, off.peak_bytes, world_size=2, levers=("sharding",), source=source, comm=comm)
    assert tight.sharding == Sharding("full", True, offload_optimizer=True, shard_group_size=2)
    assert tight.predicted_peak_bytes == off.peak_bytes < full.peak_bytes
    why = "\n".join(tight.explanation)
    assert "CPU offload (FSDP2 CPUOffloadPolicy, full sharding)" in why and "less per device" in why
    assert "host needs" in why and "optimizer step on the CPU" in why
    assert "20.0 GB/s host memory bandwidth (given)" in tight.assumptions["offload"]
    assert any("CPU offload" in f.description for f in tight.frontier)

    roomy = plan(base, full.peak_bytes, world_size=2, levers=("sharding",), source=source, comm=comm)
    assert roomy.sharding.offload_optimizer is False and roomy.sharding.strategy in ("full", "shard-grad-op")
    assert roomy.predicted_step_ms < tight.predicted_step_ms  # the CPU optimizer step is what offload costs
    assert any(line.startswith("CPU offload weighed") for line in roomy.explanation)

    # (c) the plan file keeps it
    assert load_plan(tight.save(tmp_path / "offload.toml")) == tight
    assert "offload_optimizer = true" in (tmp_path / "offload.toml").read_text()


def test_planner_offloads_on_one_gpu_when_the_model_does_not_fit_otherwise(source):
    base = source.profile("fp32")
    off = source.profile("fp32", "full", 1, offload=True)
    p = plan(base, off.peak_bytes, levers=("sharding",), source=source)
    assert (p.world_size, p.sharding) == (1, Sharding("full", True, offload_optimizer=True, shard_group_size=1))
    with pytest.raises(MemprofError, match="shard over more ranks"):
        plan(base, off.peak_bytes // 2, levers=("sharding",), source=source)
    with pytest.raises(MemprofError, match=r"allow sharding \(FSDP over more ranks, or CPU offload\)"):
        plan(base, 1 << 20, levers=("checkpoint",), source=source)


def test_offload_step_time_model_by_hand():
    comm = CommModel(host_link_gbs=50.0, host_bandwidth_gbs=100.0, overlap=0.5)
    # full: two all-gathers (H2D of the shard) and the gradients' D2H per step: 3 x 8 GB / 8 ranks at 50 GB/s.
    assert host_transfer_ms("full", 8, 8 * 10**9, comm) == pytest.approx(60.0)
    assert host_transfer_ms("shard-grad-op", 8, 8 * 10**9, comm) == pytest.approx(40.0)
    assert host_transfer_ms("hybrid", 16, 8 * 10**9, comm, shard_group_size=8) == pytest.approx(60.0)
    assert host_transfer_ms("full", 1, 10**9, comm) == pytest.approx(60.0)
    # CPU AdamW reads and writes every host byte once; 8 ranks share the host's 100 GB/s.
    assert cpu_optimizer_ms(10**9, 8, comm) == pytest.approx(160.0)
    assert cpu_optimizer_ms(10**9, 1, comm) == pytest.approx(20.0)
    # The copies hide behind compute that the collectives leave free: here 100 ms of compute hides 50 ms, the
    # collectives (full, 8 ranks, 7/8 x 3 x 8 GB at NVLink 350 GB/s = 60 ms) take it all.
    copies, cpu = offload_ms("full", 8, 8 * 10**9, 8 * 10**9, 8 * 10**9, 10**9, 100.0, comm)
    assert copies == pytest.approx(60.0) and cpu == pytest.approx(160.0)
    copies, _ = offload_ms("full", 8, 8 * 10**9, 8 * 10**9, 8 * 10**9, 10**9, 1000.0, comm)
    assert copies == 0.0  # 500 ms of overlap hides both


@pytest.mark.parametrize("call, message", [
    (lambda: estimate(fsdp_cases.build, fsdp_cases.batch, offload=True), "CPU offload is an FSDP feature"),
    (lambda: estimate(fsdp_cases.build, fsdp_cases.batch, sharding="full", offload="yes"),
     "offload must be True or False"),
    (lambda: estimate(fsdp_cases.build, fsdp_cases.batch, sharding="full"), r"needs world_size > 1 \(or offload"),
    (lambda: shard_model(fsdp_cases.build(), "none", [], offload=True), "CPU offload is an FSDP feature"),
    (lambda: Sharding("none", offload_optimizer=True), "offload_optimizer: CPU offload needs FSDP"),
    (lambda: CommModel(host_link_gbs=0), "host_link_gbs must be positive"),
    (lambda: CommModel(host_bandwidth_gbs=-1.0), "host_bandwidth_gbs must be positive"),
    (lambda: host_transfer_ms("none", 2, 1, CommModel()), "needs an FSDP sharding strategy"),
])
def test_bad_offload_settings_are_clear_errors(call, message):
    with pytest.raises(MemprofError, match=message):
        call()
    assert issubclass(EstimateError, MemprofError) and issubclass(PlanValueError, MemprofError)


def _offload_plan(world_size=2):
    return Plan(
        budget_bytes=1 << 30, world_size=world_size, predicted_peak_bytes=1 << 20, baseline_step_ms=0.0,
        predicted_step_ms=0.0, predicted_overhead=0.0, levers=("sharding",),
        sharding=Sharding("full", True, offload_optimizer=True, shard_group_size=world_size),
        source=Source("", "", True))


def test_apply_needs_the_model_on_the_cpu_and_a_process_group():
    model = fsdp_cases.build()
    with pytest.raises(ApplyError, match=r"parameters are on meta: apply it to the model on the CPU"):
        apply(model.to("meta"), _offload_plan())
    with pytest.raises(ApplyError, match=r"no torch.distributed process group .*--nproc-per-node 1"):
        apply(fsdp_cases.build(), _offload_plan(world_size=1))


def build_model():  # --model for the command-line test
    return fsdp_cases.build()


def make_batch(batch_size, seq_len):  # --batch for the command-line test
    from memprof.zoo import gpt_batch

    return gpt_batch(fsdp_cases.CFG, batch_size, seq_len)


def test_cli_estimates_offload_and_plans_it_on_one_gpu(source, tmp_path):
    from click.testing import CliRunner

    from memprof.cli import main

    model = ["--model", "tests.test_offload:build_model", "--batch", "tests.test_offload:make_batch",
             "--batch-size", str(fsdp_cases.BATCH)]
    r = CliRunner().invoke(main, ["estimate", *model, "--sharding", "full", "--offload", "--device-memory", "1GiB"])
    assert r.exit_code == 0, r.output
    off = source.profile("fp32", "full", 1, offload=True)
    assert "CPU offload: " in r.output and "of host memory per rank" in r.output
    bad = CliRunner().invoke(main, ["estimate", *model, "--offload"])
    assert bad.exit_code == 2 and "CPU offload is an FSDP feature" in bad.output

    est = tmp_path / "est.json"
    assert CliRunner().invoke(main, ["estimate", *model, "--out", str(est)]).exit_code == 0
    # the profile names its factory, but memprof never imports code named in a file: the model is named again
    r = CliRunner().invoke(main, ["plan", str(est), "--budget", str(off.peak_bytes), "--levers", "sharding",
                                  "--out", str(tmp_path / "p.toml")])
    assert r.exit_code == 2 and "never imports code named in a file" in r.output
    r = CliRunner().invoke(main, ["plan", str(est), "--budget", str(off.peak_bytes), "--levers", "sharding",
                                  *model, "--out", str(tmp_path / "p.toml")])
    assert r.exit_code == 0, r.output
    assert "sharding full + CPU offload (parameter shards, gradients, optimizer state on the host)" in r.output
    assert "CPU offload (FSDP2 CPUOffloadPolicy" in r.output and "FSDP full + CPU offload" in r.output
    assert load_plan(tmp_path / "p.toml").sharding.offload_optimizer
