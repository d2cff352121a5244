"""A CPU-offload plan (FSDP2 CPUOffloadPolicy) applied on real gloo ranks (2, and 1: FSDP on a one-rank mesh),
against the estimate it came from.

On the CPU the host is the device, so the whole of a rank's memory is compared: the tracker's peak and the
allocator's own (profiler allocation events of the caller's thread: gloo's workers free their copies of
collective buffers at times that vary from run to run) against the CPU estimate of the offload configuration.
"""

import pytest

from tests.distributed import fsdp_cases
from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed


def _apply_train_and_measure(rank, world_size, plan_path):
    import torch
    from torch.distributed.fsdp import FSDPModule

    import memprof
    from memprof.tracking.groundtruth import allocator_peak, live_bytes
    from memprof.training import default_step, make_optimizer

    torch.manual_seed(0)
    model = fsdp_cases.build()
    handle = memprof.apply(model, memprof.load(plan_path))
    policies = {type(m._get_fsdp_state()._fsdp_param_group.offload_policy) for m in model.modules()
                if isinstance(m, FSDPModule)}
    opt = make_optimizer("adamw", model.parameters())  # after apply: FSDP replaced the parameters
    batch = fsdp_cases.batch()
    before = [p.detach().to_local().clone() for p in model.parameters()]
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            default_step(model, batch, opt)
    trained = any(not torch.equal(b, p.detach().to_local()) for b, p in zip(before, model.parameters()))
    del before

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    live = [local(p) for p in model.parameters()] + list(batch)
    live += [local(v) for st in opt.state.values() for v in st.values()]
    allocator, _ = allocator_peak(lambda: default_step(model, batch, opt), live_bytes(live),
                                  caller_thread_only=True)
    handle.remove()
    return {"tracked": tracker.profile.peak_bytes, "allocator": allocator, "policies": policies,
            "trained": trained, "irreversible": handle.irreversible,
            "device": {p.device.type for p in model.parameters()}}


def _offload_plan(world_size: int, tmp_path):
    """(the estimate, a plan file) for CPU offload at this world size."""
    from memprof.estimation.sources import EstimateSource
    from memprof.plans import CheckpointChoice, Plan, Sharding, Source
    from memprof.policy.engine import plan

    source = EstimateSource(fsdp_cases.build, fsdp_cases.batch, device="cpu")
    offload = source.profile("fp32", "full", world_size, offload=True)
    assert offload.assumptions["sharding"] == "full + cpu offload"
    if world_size > 1:  # planned from the two profiles at hand: only the offload configuration fits this budget
        the_plan = plan(source.profile("fp32"), offload.peak_bytes, world_size=world_size, levers=("sharding",),
                        profiles={("fp32", "full", True): offload})
        assert the_plan.sharding.offload_optimizer and the_plan.sharding.strategy == "full"
        assert the_plan.predicted_peak_bytes == offload.peak_bytes
    else:  # on one CPU, offload needs more memory than no FSDP at all: the planner never picks it; write it by hand
        units = tuple(CheckpointChoice(f"blocks.{i}", "keep") for i in range(fsdp_cases.CFG.n_layer))  # FSDP units
        the_plan = Plan(budget_bytes=offload.peak_bytes, world_size=1, levers=("sharding",),
                        predicted_peak_bytes=offload.peak_bytes, baseline_step_ms=0.0, predicted_step_ms=0.0,
                        predicted_overhead=0.0, sharding=Sharding("full", True, True, 1), checkpoint=units,
                        source=Source("", "", True))
    path = tmp_path / "offload.toml"
    the_plan.save(path)
    return offload, path


@pytest.mark.parametrize("world_size", [2, 1])
def test_offload_plan_trains_on_gloo_ranks_within_3_percent_of_its_estimate(tmp_path, world_size):
    from torch.distributed.fsdp import CPUOffloadPolicy

    offload, path = _offload_plan(world_size, tmp_path)
    for r in run_ranks(_apply_train_and_measure, world_size=world_size, args=(str(path),)):
        assert r["policies"] == {CPUOffloadPolicy} and r["trained"] and r["device"] == {"cpu"}
        assert r["irreversible"] == ["FSDP2 full sharding with CPU offload"]
        for measured in (r["tracked"], r["allocator"]):
            assert abs(measured - offload.peak_bytes) <= 0.03 * offload.peak_bytes, (measured, offload.peak_bytes)
