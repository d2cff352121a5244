"""Estimated vs measured per-rank peak under real FSDP2 on 2 and 4 gloo processes (CPU).

    python experiments/fsdp_estimate.py

The estimate runs in this process on a fake process group; the measurement starts N processes on
127.0.0.1 and tracks 3 real training steps on each. Writes results/fsdp-estimate.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import ROOT, write_result

sys.path.insert(0, str(ROOT))

from tests.distributed import fsdp_cases  # noqa: E402
from tests.distributed.launch import run_ranks  # noqa: E402


def main() -> None:
    from memprof.estimation import estimate

    rows = []
    for world_size in (2, 4):
        for strategy in ("full", "shard-grad-op"):
            est = estimate(fsdp_cases.build, fsdp_cases.batch, device="cpu", world_size=world_size,
                           sharding=strategy, steps=3).peak_bytes
            measured = run_ranks(fsdp_cases.measured_rank_peak, world_size=world_size, args=(strategy,))
            worst = max(abs(m - est) / est for m in measured)
            rows.append({"world_size": world_size, "sharding": strategy, "estimated_peak_bytes": est,
                         "measured_peak_bytes_per_rank": measured, "max_relative_error": worst})
            print(f"world size {world_size} {strategy:14s} estimate {est:,} measured {measured} "
                  f"max error {100 * worst:.3f}%")
    path = write_result("fsdp-estimate", {
        "model": f"GPT {fsdp_cases.CFG}, batch {fsdp_cases.BATCH}, AdamW, fp32, 3 steps",
        "device": "CPU (gloo on 127.0.0.1, one process per rank)",
        "target": "measured per-rank peak within 1% of the estimate",
        "rows": rows,
        "target_met": all(r["max_relative_error"] <= 0.01 for r in rows),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    Path(__file__)
    main()
