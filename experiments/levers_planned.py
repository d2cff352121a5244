"""The planner's own choice with the loss-head lever, applied and measured: plans at 50% and 70% of the peak.

    python experiments/levers_planned.py [--reps 7] [--default-malloc]

Models: those of experiments/levers.py (a head-heavy nanoGPT-style GPT, vocab 32768, d=128, 4 layers,
batch 4 x 256, ``(logits, loss)``; an HF Llama from a config, vocab 32000, d=128, 4 layers, batch 2 x 256,
``labels=``). For each: the plain step measured by the tracker (the CPU allocator's peak, to the byte);
``memprof.plan(profile, budget, levers=("checkpoint", "loss-head"), source=EstimateSource(...))`` at 50%
and 70% of that peak (loss head chunked by 256 tokens when the planner chooses it); the plan applied with
``memprof.apply`` to a fresh model and measured again: its peak (2 tracked steps) against the plan's
prediction and the budget, and its untracked step time against the plain step's, interleaved round by round
(median of per-round ratios). Targets (issue 18, acceptance 1): measured <= budget, within 1% of the
prediction, overhead <= 40%. A budget these two levers cannot reach is recorded with the planner's refusal
(the least peak they reach). Writes results/levers-planned.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch  # noqa: I001
from _common import MALLOC_HELP, use_caching_malloc, write_result
from levers import llama_case, measured_peak, nanogpt_case, time_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memprof  # noqa: E402
from memprof.estimation.sources import EstimateSource  # noqa: E402
from memprof.policy.chain_problem import InfeasibleBudget  # noqa: E402
from memprof.training import default_step, make_optimizer  # noqa: E402

FRACTIONS = (0.5, 0.7)
CHUNK = 256


def planned_build(build, plan):
    def build_model():
        model = build()
        memprof.apply(model, plan)
        return model
    return build_model


def run_case(label, case, reps) -> list[dict]:
    build, batch, _units = case(False)
    plain_peak = measured_peak(build, batch, default_step)  # a fresh model's first two steps
    torch.manual_seed(0)  # the profile planned from: two steady steps
    model, b = build(), batch()
    opt = make_optimizer("adamw", model.parameters())
    default_step(model, b, opt)
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            default_step(model, b, opt)
    prof = tracker.profile
    source = EstimateSource(build, batch, device="cpu")
    plans, refused = {}, []
    for f in FRACTIONS:
        try:
            plans[f] = memprof.plan(prof, int(f * prof.peak_bytes), levers=("checkpoint", "loss-head"),
                                    source=source, loss_head_chunk_tokens=CHUNK)
        except InfeasibleBudget as e:  # these two levers cannot reach it: say how far they get
            refused.append({"model": label, "budget_fraction": f, "budget_bytes": e.budget_bytes,
                            "profile_peak_bytes": prof.peak_bytes, "refused": str(e),
                            "min_peak_bytes": e.min_peak_bytes,
                            "min_peak_fraction": round(e.min_peak_bytes / prof.peak_bytes, 4)})
            print(f"{label:8s} {int(f * 100)}%: refused, the least peak is {e.min_peak_bytes / 2**20:.1f} MiB "
                  f"({e.min_peak_bytes / prof.peak_bytes:.0%} of the peak)", flush=True)
    configs = {"plain": (build, default_step)}
    configs.update({f"{int(f * 100)}%": (planned_build(build, p), default_step) for f, p in plans.items()})
    timing = time_rows(configs, batch, reps)
    rows = []
    for f, p in plans.items():
        name = f"{int(f * 100)}%"
        peak = measured_peak(planned_build(build, p), batch, default_step)
        row = {"model": label, "budget_fraction": f, "budget_bytes": p.budget_bytes,
               "plain_peak_bytes": plain_peak, "profile_peak_bytes": prof.peak_bytes,
               "loss_head_chunk_tokens": p.loss_head_chunk_tokens,
               "checkpointed_units": sum(c.mode != "keep" for c in p.checkpoint),
               "checkpoint": {c.unit: c.mode for c in p.checkpoint if c.mode != "keep"},
               "predicted_peak_bytes": p.predicted_peak_bytes, "measured_peak_bytes": peak,
               "peak_error": round(peak / p.predicted_peak_bytes - 1, 6),
               "predicted_overhead": round(p.predicted_overhead, 4), "measured_overhead": timing[name]["overhead"],
               "step_ms": timing[name]["step_ms"], "plain_step_ms": timing["plain"]["step_ms"],
               "within_budget": peak <= p.budget_bytes,
               "within_1pct": abs(peak / p.predicted_peak_bytes - 1) <= 0.01,
               "overhead_at_most_40pct": timing[name]["overhead"] <= 0.40}
        rows.append(row)
        print(f"{label:8s} {name:4s} chunk {p.loss_head_chunk_tokens:4d}, {row['checkpointed_units']} blocks: "
              f"peak {peak / 2**20:7.1f} MiB (predicted {p.predicted_peak_bytes / 2**20:7.1f}, budget "
              f"{p.budget_bytes / 2**20:7.1f}), overhead {timing[name]['overhead']:+.1%} (predicted "
              f"{p.predicted_overhead:+.1%})", flush=True)
    return rows + refused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    args = ap.parse_args()
    use_caching_malloc(args.default_malloc)
    rows = run_case("nanogpt", nanogpt_case, args.reps) + run_case("hf-llama", llama_case, args.reps)
    path = write_result("levers-planned", {
        "description": __doc__.split("\n\n")[2].replace("\n", " "),
        "reps": args.reps, "rows": rows,
        "planned_targets_met": all(r["within_budget"] and r["within_1pct"] and r["overhead_at_most_40pct"]
                                   for r in rows if "refused" not in r),
        "refused": [f"{r['model']} at {r['budget_fraction']:.0%}" for r in rows if "refused" in r],
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
