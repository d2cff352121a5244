"""What checkpointing one block costs, alone and in sets: do the demo GPT's block costs add up? (CPU)

    python experiments/checkpoint_costs.py [--reps 21] [--default-malloc]

The demo GPT (6 identical blocks, batch 8 x 256, AdamW) is profiled, then untracked steps are timed with
each checkpoint mode (full, selective) on: the first block alone, a middle one, the last one, the first
three, the last three, all but the last, and all six; every configuration once per round next to a plain
step (memprof.policy.timing's same-round timing), --reps rounds. For each configuration the result gives
the measured extra time and what measure_costs's model predicts for it from the last-alone and all-six
points (the last block what it cost alone, the others an equal share of the rest), and what the earlier
model (a once-per-mode surcharge plus a uniform per-block slope, from the same two points) predicted.
Writes results/checkpoint-costs.json.

Committed runs (21 rounds, +-1 to 3 ms): under the caching malloc the costs nearly add up (full: the first,
a middle and the last block alone 15.7, 15.3 and 17.6 ms; all but the last 69.4 ms, as the model says;
the first three 47.0 against 41.6), and under glibc's default they do not (full: 7.4, 4.0 and 11.1 ms alone,
all six 52.6 ms against 87.1 with the caching malloc: fewer activations also mean fewer fresh pages).

Allocator. The process re-runs itself with glibc's malloc keeping freed memory (experiments/_common.py
CACHING_MALLOC), as CUDA's caching allocator does. Under glibc's default every large tensor is a fresh
mapping whose pages the kernel zeroes on first touch, a third of a CPU step, and checkpointing changes that
as well as adding recomputation; ``--default-malloc`` times that way and writes
results/checkpoint-costs-default-malloc.json.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch  # noqa: I001
from _common import MALLOC_HELP, use_caching_malloc, write_result

import memprof
from memprof.policy import timing
from memprof.policy.chain import find_units
from memprof.training import default_step
from memprof.zoo import DEMO_GPT, GPT, gpt_batch

SETS = {"first": [0], "middle": [2], "last": [5], "first three": [0, 1, 2], "last three": [3, 4, 5],
        "all but last": [0, 1, 2, 3, 4], "all": [0, 1, 2, 3, 4, 5]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=21, help="rounds")
    ap.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    args = ap.parse_args()
    use_caching_malloc(args.default_malloc)
    torch.manual_seed(0)
    model, batch = GPT(DEMO_GPT), gpt_batch(DEMO_GPT, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        default_step(model, batch, opt)

    with memprof.track(model, opt) as t:
        for _ in range(3):
            step()
    units = find_units(t.profile)
    assert len(units) == 6, units
    keep = timing.uniform_plan(units, "keep")
    configs = {(mode, name): replace(keep, checkpoint=tuple(replace(c, mode=mode) if i in idx else c
                                                           for i, c in enumerate(keep.checkpoint)))
               for mode in ("full", "selective") for name, idx in SETS.items()}
    timing._warm(model, step, configs.values())
    ratios, plain = timing._rounds(model, step, configs, args.reps, None, None)
    base_ms = statistics.median(plain) * 1e3
    rows = []
    for mode in ("full", "selective"):
        ms = {name: (statistics.median(ratios[(mode, name)]) - 1) * base_ms for name in SETS}
        se = {name: timing.median_stderr(ratios[(mode, name)]) * base_ms for name in SETS}
        alone, total = min(ms["last"], ms["all"]), ms["all"]
        other = (total - alone) / 5
        slope = (ms["all"] - ms["last"]) / 5
        first = max(0.0, ms["last"] - slope)
        for name, idx in SETS.items():
            model_ms = sum(alone if i == 5 else other for i in idx)
            surcharge_ms = first + slope * len(idx)
            rows.append({"mode": mode, "blocks": name, "measured_ms": ms[name], "stderr_ms": se[name],
                         "last_unit_model_ms": model_ms, "surcharge_model_ms": surcharge_ms})
            print(f"{mode:9s} {name:13s} measured {ms[name]:6.1f} ms +-{se[name]:4.1f}   last-unit model "
                  f"{model_ms:6.1f}   surcharge model {surcharge_ms:6.1f}")
    path = write_result("checkpoint-costs" + ("-default-malloc" if args.default_malloc else ""), {
        "device": "CPU (2 cores)", "model": "demo GPT (6 blocks, batch 8 x 256, AdamW)", "rounds": args.reps,
        "base_step_ms": base_ms, "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
