"""Plans applied and measured again: predicted vs measured peak and step-time overhead (CPU).

    python experiments/apply_verify.py [--cost-reps 11] [--reps 21] [--stderr 0.1] [--max-reps 61] [--default-malloc]

Models: the demo GPT (6 blocks, batch 8 x 256) and an HF transformers Llama-style model (8 layers, GQA,
SDPA, batch 4 x 256). Each is profiled for 3 steps; plans are made for budgets at 90/80/70% of the
measured peak and just above the smallest feasible peak (checkpoint lever). Each plan is applied and
measured three ways: the tracker's peak, the allocator's peak (torch.profiler allocation events, an
independent ground truth), and the step time with and without the plan, untracked (median of paired
ratios; all timing before any profiler session).

Time. The planner's times come from measure_costs (--cost-reps pairs per configuration): untracked steps
with every block kept, and fully and selectively checkpointed on every block and on the last block alone
(the last block's cost, and the rest shared by the others); the plans mix modes per block, so their
overheads are predictions. Under glibc's default malloc this machine drifted over minutes (every block fully
checkpointed measured 13.9% in one run and 17.4% in the next), more than the 25% band on few-percent overheads
allows, so the verification times the cost configurations and all of a model's plans in the same rounds (verify_overheads: each configuration once per
round, next to a plain step), and each plan's measured overhead is compared with what the costs of those
same rounds predict for it (``predicted_overhead_same_rounds``, the target) as well as with the plan's own
prediction (``predicted_overhead``, from costs timed minutes earlier, shown for comparison). Rounds go on
until every configuration has --reps pairs and its median ratio's standard error is --stderr of its
overhead, at most --max-reps rounds. Writes results/apply-verify.json and .png.

Allocator. The process re-runs itself with glibc's malloc keeping freed memory (experiments/_common.py
CACHING_MALLOC), as CUDA's caching allocator does. Under glibc's default every large tensor is a fresh
mapping whose pages the kernel zeroes on first touch, a third of a CPU step, and checkpointing changes that
as well as adding recomputation; ``--default-malloc`` times that way and writes
results/apply-verify-default-malloc.json and .png.
"""

from __future__ import annotations

import argparse

import torch  # noqa: I001
from _common import MALLOC_HELP, RESULTS, use_caching_malloc, write_result

import memprof
from memprof.policy.chain import chain_model
from memprof.policy.solver import min_peak
from memprof.policy.timing import measure_costs, predicted_overhead, verify_overheads
from memprof.tracking.groundtruth import allocator_peak, live_bytes
from memprof.training import default_step
from memprof.zoo import DEMO_GPT, GPT, gpt_batch


def demo_gpt():
    torch.manual_seed(0)
    return GPT(DEMO_GPT), gpt_batch(DEMO_GPT, 8)


def hf_llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (4, 256))
    return transformers.LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids}


MODELS = {"demo GPT": demo_gpt, "HF Llama (8 layers, GQA)": hf_llama}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cost-reps", type=int, default=11, help="pairs per configuration for the planner's costs")
    ap.add_argument("--reps", type=int, default=21, help="least verification rounds")
    ap.add_argument("--stderr", type=float, default=0.1, help="relative standard error to reach (0: --reps only)")
    ap.add_argument("--max-reps", type=int, default=61, help="most verification rounds")
    ap.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    args = ap.parse_args()
    use_caching_malloc(args.default_malloc)
    rows = []
    measured_costs = {}
    for name, build in MODELS.items():
        model, batch = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, batch=batch, opt=opt):
            default_step(model, batch, opt)

        with memprof.track(model, opt) as tracker:
            for _ in range(3):
                step()
        prof = tracker.profile
        cm = chain_model(prof, prof.peak_bytes)
        smallest = max(cm.floor_bytes, min_peak(cm.problem).peak_bytes)
        costs = measure_costs(model, step, prof, reps=args.cost_reps)
        budgets = {f"{int(f * 100)}% of peak": int(prof.peak_bytes * f) for f in (0.9, 0.8, 0.7)}
        budgets["smallest feasible + 1%"] = int(smallest * 1.01)
        plans = {label: memprof.plan(prof, budget, costs=costs) for label, budget in budgets.items()}
        # Time first (untracked, interleaved), then memory: profiler sessions do not precede any timing.
        same_rounds, timings = verify_overheads(model, step, prof, plans, reps=args.reps,
                                                stderr=args.stderr or None, max_reps=args.max_reps)
        measured_costs[name] = {"plan time": _costs_row(costs), "verification rounds": _costs_row(same_rounds)}
        for label, plan in plans.items():
            budget = budgets[label]
            with memprof.apply(model, plan):
                with memprof.track(model, opt) as t2:
                    step()
                    step()
                tensors = list(model.parameters()) + [v for s in opt.state.values() for v in s.values()]
                tensors += list(batch.values()) if isinstance(batch, dict) else list(batch)
                allocator, _ = allocator_peak(step, live_bytes(tensors))
            timing = timings[label]
            measured_overhead = timing.overhead
            predicted_now = predicted_overhead(same_rounds, plan)
            modes = [c.mode for c in plan.checkpoint]
            row = {
                "model": name, "budget": label, "budget_bytes": budget,
                "checkpoint": {m: modes.count(m) for m in ("keep", "full", "selective")},
                "predicted_peak_bytes": plan.predicted_peak_bytes, "tracker_peak_bytes": t2.profile.peak_bytes,
                "allocator_peak_bytes": allocator,
                "peak_error_vs_allocator": allocator / plan.predicted_peak_bytes - 1,
                "within_budget": allocator <= budget and t2.profile.peak_bytes <= budget,
                "predicted_overhead": plan.predicted_overhead, "predicted_overhead_same_rounds": predicted_now,
                "measured_overhead": measured_overhead,
                "measured_overhead_stderr": timing.stderr, "timed_pairs": timing.pairs,
                "base_step_ms_untracked": timing.base_ms,
            }
            rows.append(row)
            print(f"{name:26s} {label:22s} peak pred {plan.predicted_peak_bytes / 2**20:7.1f} MiB, allocator "
                  f"{allocator / 2**20:7.1f} MiB ({100 * row['peak_error_vs_allocator']:+.2f}%), overhead pred "
                  f"{100 * plan.predicted_overhead:5.1f}% (same rounds {100 * predicted_now:5.1f}%) "
                  f"meas {100 * measured_overhead:5.1f}% "
                  f"(+-{100 * timing.stderr:.2f}, {timing.pairs} pairs)")
    out_name = "apply-verify" + ("-default-malloc" if args.default_malloc else "")
    _figure(rows, out_name)
    path = write_result(out_name, {
        "device": "CPU (2 cores)", "cost_reps": args.cost_reps, "reps": args.reps, "stderr": args.stderr,
        "max_reps": args.max_reps,
        "targets": "measured peak <= budget and within 2% of predicted; overhead within 25% of the overhead "
                   "predicted from costs timed in the same rounds",
        "rows": rows,
        "measured_costs": measured_costs,
        "peaks_met": all(r["within_budget"] and abs(r["peak_error_vs_allocator"]) <= 0.02 for r in rows),
        "overheads_met": all(abs(r["measured_overhead"] - r["predicted_overhead_same_rounds"])
                             <= 0.25 * r["predicted_overhead_same_rounds"]
                             for r in rows if r["predicted_overhead_same_rounds"] > 0),
        "overheads_met_by_plan_time_prediction": sum(
            abs(r["measured_overhead"] - r["predicted_overhead"]) <= 0.25 * r["predicted_overhead"]
            for r in rows if r["predicted_overhead"] > 0),
    })
    print(f"wrote {path}")


def _costs_row(costs) -> dict:
    n_units = len(next(iter(costs.extra_ms.values())))
    return {
        "base_step_ms": costs.base_step_ms, "units": n_units, "pairs_and_stderr": costs.pairs,
        **{mode: {"last_unit_ms": list(per.values())[-1],
                  "other_units_mean_ms": (sum(per.values()) - list(per.values())[-1]) / max(1, n_units - 1),
                  "all_units_ms": sum(per.values())}
           for mode, per in costs.extra_ms.items()},
    }


def _figure(rows, out_name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        a.plot([r["predicted_peak_bytes"] / 2**20 for r in rs], [r["allocator_peak_bytes"] / 2**20 for r in rs],
               "o", label=name)
        b.plot([100 * r["predicted_overhead_same_rounds"] for r in rs], [100 * r["measured_overhead"] for r in rs],
               "o", label=name)
    for ax, title, unit in ((a, "peak: plan vs allocator", "MiB"),
                            (b, "step-time overhead (costs timed in the same rounds)", "%")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
        ax.set_title(title)
        ax.set_xlabel(f"predicted ({unit})")
        ax.set_ylabel(f"measured ({unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out_name}.png", dpi=110)


if __name__ == "__main__":
    main()
