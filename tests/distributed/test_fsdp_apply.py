"""A plan that shards with FSDP2, made from estimates in one process, applied on 2 real gloo ranks."""

import pytest

from tests.distributed import fsdp_cases
from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed


def _apply_and_measure(rank, world_size, plan_path):
    import torch

    import memprof
    from memprof.training import default_step, make_optimizer

    torch.manual_seed(0)
    model = fsdp_cases.build()
    plan = memprof.load(plan_path)
    handle = memprof.apply(model, plan)
    opt = make_optimizer("adamw", model.parameters())  # after apply: FSDP replaced the parameters
    batch = fsdp_cases.batch()
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            default_step(model, batch, opt)
    handle.remove()
    return tracker.profile.peak_bytes, handle.irreversible


def _sharded_plan(tmp_path, levers):
    from memprof.estimation.sources import EstimateSource
    from memprof.policy.chain import chain_model
    from memprof.policy.engine import plan
    from memprof.policy.solver import min_peak

    source = EstimateSource(fsdp_cases.build, fsdp_cases.batch, device="cpu")
    single = source.profile("fp32")
    sharded = source.profile("fp32", "full", 2)
    if "checkpoint" in levers:  # below what checkpointing alone can reach on one device: both levers needed
        model = chain_model(single, single.peak_bytes)
        budget = int(0.995 * max(model.floor_bytes, min_peak(model.problem).peak_bytes))
    else:
        budget = sharded.peak_bytes
    assert budget < single.peak_bytes
    the_plan = plan(single, budget, world_size=2, levers=levers, source=source)
    path = tmp_path / "plan.toml"
    the_plan.save(path)
    return the_plan, path


@pytest.mark.parametrize("levers", [("sharding",), ("checkpoint", "sharding")])
def test_sharded_plan_on_two_gloo_ranks_meets_its_prediction_within_3_percent(tmp_path, levers):
    the_plan, path = _sharded_plan(tmp_path, levers)
    assert the_plan.sharding.strategy in ("full", "shard-grad-op")
    for peak, irreversible in run_ranks(_apply_and_measure, world_size=2, args=(str(path),)):
        assert irreversible  # FSDP stays on after remove(), and says so
        assert peak <= the_plan.budget_bytes
        assert abs(peak - the_plan.predicted_peak_bytes) <= 0.03 * the_plan.predicted_peak_bytes, (
            peak, the_plan.predicted_peak_bytes)
