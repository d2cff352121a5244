"""One rank of experiments/fsdp_apply.py (run by torchrun): apply a sharded plan, train, record the peak."""

import json
import sys

import torch
import torch.distributed as dist

import memprof
from memprof.training import default_step, make_optimizer

sys.path.insert(0, ".")
from tests.distributed import fsdp_cases  # noqa: E402


def main(plan_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = fsdp_cases.build()
    memprof.apply(model, memprof.load(plan_path))  # before the optimizer: FSDP replaces the parameters
    opt = make_optimizer("adamw", model.parameters())
    batch = fsdp_cases.batch()
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            default_step(model, batch, opt)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "peak_bytes": tracker.profile.peak_bytes}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
