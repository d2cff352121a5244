"""Sharded plans made from estimates (one process), applied on 2 and 4 gloo ranks under torchrun (CPU).

    python experiments/fsdp_apply.py

For each world size: estimate the model unsharded and under each strategy on a fake process group, plan
with the checkpoint and sharding levers for a budget below what one device can reach with checkpointing
alone, then launch ``torchrun --nproc-per-node N experiments/fsdp_worker.py PLAN`` and compare each rank's
measured peak with the plan's prediction. Writes results/fsdp-apply.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, write_result

sys.path.insert(0, str(ROOT))


def main() -> None:
    from memprof.estimation.sources import EstimateSource
    from memprof.policy.chain import chain_model
    from memprof.policy.engine import plan
    from memprof.policy.solver import min_peak
    from tests.distributed import fsdp_cases
    from tests.distributed.launch import free_port

    source = EstimateSource(fsdp_cases.build, fsdp_cases.batch, device="cpu")
    single = source.profile("fp32")
    cm = chain_model(single, single.peak_bytes)
    alone = max(cm.floor_bytes, min_peak(cm.problem).peak_bytes)
    rows = []
    for world_size in (2, 4):
        budget = int(alone * 0.99)  # below checkpointing alone: sharding needed
        the_plan = plan(single, budget, world_size=world_size, levers=("checkpoint", "sharding"), source=source)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "plan.toml"
            the_plan.save(path)
            out = Path(tmp) / "peak"
            env = dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="6")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
                            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                            "experiments/fsdp_worker.py", str(path), str(out)], cwd=ROOT, env=env, check=True,
                           capture_output=True)
            peaks = [json.loads(Path(f"{out}.rank{r}.json").read_text())["peak_bytes"] for r in range(world_size)]
        errors = [p / the_plan.predicted_peak_bytes - 1 for p in peaks]
        modes = [c.mode for c in the_plan.checkpoint]
        rows.append({"world_size": world_size, "budget_bytes": budget, "sharding": the_plan.sharding.strategy,
                     "checkpoint": {m: modes.count(m) for m in ("keep", "full", "selective")},
                     "predicted_peak_bytes": the_plan.predicted_peak_bytes, "measured_peak_bytes_per_rank": peaks,
                     "errors": errors, "within_budget": all(p <= budget for p in peaks)})
        print(f"world size {world_size}: {the_plan.sharding.strategy}, {rows[-1]['checkpoint']}, predicted "
              f"{the_plan.predicted_peak_bytes:,}, measured {peaks} ({', '.join(f'{100 * e:+.2f}%' for e in errors)})")
    path = write_result("fsdp-apply", {
        "model": f"GPT {fsdp_cases.CFG}, batch {fsdp_cases.BATCH}, AdamW, fp32",
        "device": "CPU, gloo on 127.0.0.1, torchrun, one process per rank", "rows": rows,
        "target": "per-rank peak within 3% of the prediction, under the budget",
        "target_met": all(r["within_budget"] and all(abs(e) <= 0.03 for e in r["errors"]) for r in rows),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
