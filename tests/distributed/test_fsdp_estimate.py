"""Estimate (one process, fake process group) against real FSDP2 on 2 gloo processes, per rank."""

import pytest

from tests.distributed import fsdp_cases
from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("strategy", ["full", "shard-grad-op"])
def test_fsdp2_per_rank_peak_on_two_gloo_ranks_equals_the_estimate_within_1_percent(strategy):
    from memprof.estimation import estimate

    est = estimate(fsdp_cases.build, fsdp_cases.batch, device="cpu", world_size=2, sharding=strategy, steps=3)
    measured = run_ranks(fsdp_cases.measured_rank_peak, world_size=2, args=(strategy,))
    for peak in measured:
        assert abs(peak - est.peak_bytes) <= 0.01 * est.peak_bytes, (peak, est.peak_bytes)
    # Sharding is real: per-rank parameter memory at the start is half the model's (plus padding).
    full = sum(p.numel() * 4 for p in fsdp_cases.build().parameters())
    assert full / 2 <= est.timeline[0].category("param") <= full / 2 * 1.05
