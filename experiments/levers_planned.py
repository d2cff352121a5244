"""The planner's joint choice of the LLM levers, applied and measured, against the levers stacked by hand.

    python experiments/levers_planned.py [--reps 7] [--default-malloc]

Models: those of experiments/levers.py (a head-heavy nanoGPT-style GPT, vocab 32768, d=128, 4 layers,
batch 4 x 256, ``(logits, loss)``; an HF Llama from a config, vocab 32000, d=128, 4 layers, batch 2 x 256,
``labels=``). For each model: the plain step measured by the tracker (the CPU allocator's peak, to the
byte); the time costs measured on this CPU as a user would before planning (checkpoint modes:
``memprof.policy.timing.measure_costs``; every step variant the levers allow:
``memprof.policy.variant_timing.measure_variant_ratios``); then ``memprof.plan(profile, budget,
levers=all but precision and sharding, source=EstimateSource(...), costs=..., variant_ratios=...)`` at 80%,
65% and 50% of the peak (loss head chunked by 256 tokens). Each plan is applied with ``memprof.apply(model,
plan, optimizer=opt)`` to a fresh model and run with the handle's step (its micro-batches, if any): its
peak (2 tracked steps) against the prediction and the budget. The hand-stacked rows of levers.py (each
lever alone, torchtune's stack, the stack with micro-batches) are measured the same way, and all plans and
rows are timed in the same interleaved rounds (untracked; median of per-round ratios to the plain step).

Targets (issue 18): acceptance 1 — at 50%, measured <= budget, within 1% of the prediction, overhead <= 40%;
acceptance 2 — at each budget the plan is never slower than the fastest hand-stacked row whose measured
peak fits the same budget: the median over rounds of the plan's step time over that row's is at most 1 plus
twice its standard error, or the plan is that row's very combination (then the two differ only by the model
instance they run on, which the JSON records as this comparison's noise). Writes
results/levers-planned.json and results/levers-planned.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch  # noqa: I001
from _common import MALLOC_HELP, RESULTS, use_caching_malloc, write_result
from levers import ROWS, configured, llama_case, measured_peak, nanogpt_case

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memprof  # noqa: E402
from memprof.estimation.sources import EstimateSource  # noqa: E402
from memprof.policy.chain_problem import InfeasibleBudget  # noqa: E402
from memprof.policy.timing import measure_costs, median_stderr  # noqa: E402
from memprof.policy.variant_timing import measure_variant_ratios  # noqa: E402
from memprof.policy.variants import weighed_variants  # noqa: E402
from memprof.training import default_step, make_optimizer  # noqa: E402

FRACTIONS = (0.8, 0.65, 0.5)
CHUNK = 256
LEVERS = ("checkpoint", "loss-head", "micro-batches", "optimizer-in-backward", "bf16-moments")


def planned(build, plan):
    """(build_model, step) running ``plan``: applied at the model's first step, with its optimizer."""
    handles = {}

    def step(model, batch, opt, precision="fp32", scaler=None, device_type="cpu"):
        if id(model) not in handles:
            handles[id(model)] = memprof.apply(model, plan, optimizer=opt)
        return handles[id(model)].step(model, batch, opt, precision, scaler, device_type)
    return build, step


def timed_rounds(configs, batch, reps: int) -> dict[str, dict]:
    """Untracked step times, every configuration once per round (rotating order); ratios to the plain step."""
    live = {}
    for name, (build_model, step) in configs.items():
        torch.manual_seed(0)
        model, b = build_model(), batch()
        opt = make_optimizer("adamw", model.parameters())
        for _ in range(2):  # warm-up: the plan applied, optimizer state made, allocator warmed
            step(model, b, opt)
        live[name] = (model, b, opt, step)
    import time

    times = {name: [] for name in configs}
    order = list(live)
    for r in range(reps):
        for name in order[r % len(order):] + order[:r % len(order)]:
            model, b, opt, step = live[name]
            t0 = time.perf_counter()
            step(model, b, opt)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def hand_config(levers, units) -> tuple:
    """A hand-stacked row of levers.py as (chunk, micro-batches, step in backward, bf16 moments, checkpointed)."""
    return (CHUNK if "chunked-loss" in levers else 0, 2 if "micro-batches-2" in levers else 1,
            "step-in-backward" in levers, "bf16-moments" in levers,
            tuple(sorted(units)) if "checkpoint" in levers else ())


def plan_config(p) -> tuple:
    return (p.loss_head_chunk_tokens, p.micro_batches, p.optimizer_in_backward, p.bf16_moments,
            tuple(sorted(c.unit for c in p.checkpoint if c.mode == "full")))


def run_case(label, case, reps) -> list[dict]:
    build, batch, units = case(False)
    plain_peak = measured_peak(build, batch, default_step)  # a fresh model's first two steps
    torch.manual_seed(0)  # the profile planned from: two steady steps
    model, b = build(), batch()
    opt = make_optimizer("adamw", model.parameters())
    default_step(model, b, opt)
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            default_step(model, b, opt)
    prof = tracker.profile
    costs = measure_costs(model, lambda: default_step(model, b, opt), prof, reps=reps)
    variants, _ = weighed_variants(LEVERS, chunk_tokens=CHUNK, custom_step=False, optimizer="adamw")
    timing = measure_variant_ratios(build, batch, variants, rounds=reps)
    print(f"{label}: variant ratios " + ", ".join(f"{v.describe()} x{r:.3f}" for v, r in timing.ratios.items()),
          flush=True)
    source = EstimateSource(build, batch, device="cpu")
    plans, refused = {}, []
    for f in FRACTIONS:
        try:
            plans[f] = memprof.plan(prof, int(f * prof.peak_bytes), levers=LEVERS, source=source, costs=costs,
                                    variant_ratios=timing, loss_head_chunk_tokens=CHUNK)
        except InfeasibleBudget as e:
            refused.append({"model": label, "budget_fraction": f, "budget_bytes": e.budget_bytes,
                            "refused": str(e), "min_peak_fraction": round(e.min_peak_bytes / prof.peak_bytes, 4)})
            print(f"{label} {f:.0%}: refused: {e}", flush=True)
    configs = {"plain": (build, default_step)}
    configs.update({f"plan {f:.0%}": planned(build, p) for f, p in plans.items()})
    hand = {f"hand: {name}": configured(build, units, levers) for name, levers in ROWS.items() if levers}
    configs.update(hand)
    times = timed_rounds(configs, batch, reps)
    ratio = {n: [t / p for t, p in zip(ts, times["plain"])] for n, ts in times.items()}
    peaks = {n: measured_peak(bm, batch, st) if n.startswith("hand") else None for n, (bm, st) in configs.items()}
    rows = []
    for f, p in plans.items():
        name = f"plan {f:.0%}"
        torch.manual_seed(0)
        m, bb = build(), batch()
        o = make_optimizer("adamw", m.parameters())
        handle = memprof.apply(m, p, optimizer=o)
        with memprof.track(m, o) as tr:
            for _ in range(2):
                handle.step(m, bb, o)
        handle.remove()
        peak = tr.profile.peak_bytes
        fitting = [n for n in hand if peaks[n] <= p.budget_bytes]
        best_hand = min(fitting, key=lambda n: statistics.median(times[n])) if fitting else None
        margin = ([t / h for t, h in zip(times[name], times[best_hand])] if best_hand else None)
        # the plan is that very combination: the time difference is between two model instances, not levers
        same = best_hand is not None and plan_config(p) == hand_config(ROWS[best_hand.removeprefix("hand: ")], units)
        overhead = statistics.median(ratio[name]) - 1
        row = {"model": label, "budget_fraction": f, "budget_bytes": p.budget_bytes, "plain_peak_bytes": plain_peak,
               "levers_chosen": {"loss_head_chunk_tokens": p.loss_head_chunk_tokens, "micro_batches": p.micro_batches,
                                 "optimizer_in_backward": p.optimizer_in_backward, "bf16_moments": p.bf16_moments,
                                 "checkpoint": {c.unit: c.mode for c in p.checkpoint if c.mode != "keep"}},
               "predicted_peak_bytes": p.predicted_peak_bytes, "measured_peak_bytes": peak,
               "peak_error": round(peak / p.predicted_peak_bytes - 1, 6),
               "predicted_overhead": round(p.predicted_overhead, 4), "measured_overhead": round(overhead, 4),
               "overhead_round_spread": [round(min(ratio[name]) - 1, 4), round(max(ratio[name]) - 1, 4)],
               "step_ms": round(statistics.median(times[name]), 2),
               "within_budget": peak <= p.budget_bytes, "within_1pct": abs(peak / p.predicted_peak_bytes - 1) <= 0.01,
               "overhead_at_most_40pct": overhead <= 0.40,
               "fastest_fitting_hand_row": best_hand and best_hand.removeprefix("hand: "),
               "hand_step_ms": best_hand and round(statistics.median(times[best_hand]), 2),
               "hand_overhead": best_hand and round(statistics.median(ratio[best_hand]) - 1, 4),
               "plan_over_hand": margin and round(statistics.median(margin), 4),
               "plan_over_hand_round_spread": margin and [round(min(margin), 4), round(max(margin), 4)],
               "plan_over_hand_stderr": margin and round(median_stderr(margin), 4),
               "same_configuration_as_hand_row": same,
               "not_slower_than_hand": (margin is None or same
                                        or statistics.median(margin) <= 1 + 2 * median_stderr(margin)),
               "explanation": list(p.explanation)}
        rows.append(row)
        print(f"{label} {f:.0%}: {row['levers_chosen']} peak {peak / 2**20:.1f} MiB (predicted "
              f"{p.predicted_peak_bytes / 2**20:.1f}, budget {p.budget_bytes / 2**20:.1f}); overhead {overhead:+.1%} "
              f"(predicted {p.predicted_overhead:+.1%}); fastest fitting hand row {best_hand} x{row['plan_over_hand']}",
              flush=True)
    hand_rows = [{"model": label, "row": n.removeprefix("hand: "), "measured_peak_bytes": peaks[n],
                  "step_ms": round(statistics.median(times[n]), 2),
                  "overhead": round(statistics.median(ratio[n]) - 1, 4)} for n in hand]
    return rows + refused, hand_rows, {str(v.describe()): round(r, 4) for v, r in timing.ratios.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from results/levers-planned.json")
    args = ap.parse_args()
    if args.plot_only:
        import json

        rows = json.loads((RESULTS / "levers-planned.json").read_text())["rows"]
        plot([r for r in rows if "refused" not in r], RESULTS / "levers-planned.png")
        return
    use_caching_malloc(args.default_malloc)
    rows, hand, ratios = [], [], {}
    for label, case in (("nanogpt", nanogpt_case), ("hf-llama", llama_case)):
        r, h, vr = run_case(label, case, args.reps)
        rows += r
        hand += h
        ratios[label] = vr
    planned_rows = [r for r in rows if "refused" not in r]
    path = write_result("levers-planned", {
        "description": __doc__.split("\n\n")[2].replace("\n", " "),
        "targets": __doc__.split("\n\n")[3].replace("\n", " "),
        "reps": args.reps, "rows": rows, "hand_rows": hand, "variant_ratios": ratios,
        "acceptance_1_met": all(r["within_budget"] and r["within_1pct"] and r["overhead_at_most_40pct"]
                                for r in planned_rows if r["budget_fraction"] == 0.5)
        and sum(r["budget_fraction"] == 0.5 for r in planned_rows) == 2,
        "plans_never_slower_than_fastest_fitting_hand_row": all(r["not_slower_than_hand"] for r in planned_rows),
        "refused": [f"{r['model']} at {r['budget_fraction']:.0%}" for r in rows if "refused" in r],
    })
    plot(planned_rows, RESULTS / "levers-planned.png")
    print(f"wrote {path}")


def plot(rows, path: Path) -> None:
    """Per model and budget: the plan's step time over the fastest fitting hand-stacked row's, paired round by
    round (median, with twice its standard error), and the plan's measured overhead over the plain step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["plan_over_hand"] is not None]
        xs = list(range(len(mine)))
        ax.bar(xs, [100 * (r["plan_over_hand"] - 1) for r in mine], 0.5,
               yerr=[200 * r["plan_over_hand_stderr"] for r in mine], capsize=4, color="tab:blue")
        for x, r in zip(xs, mine):
            words = "same combination" if r["same_configuration_as_hand_row"] else r["fastest_fitting_hand_row"]
            ax.annotate(f"vs {words}\nplan {r['measured_overhead']:+.1%} over plain", (x, 0), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 4), textcoords="offset points")
        ax.set_xticks(xs, [f"{r['budget_fraction']:.0%} of peak" for r in mine])
        ax.set_ylabel("plan / fastest fitting hand row - 1 (%)")
        ax.set_title(f"{model}: the planner's choice against the levers stacked by hand")
        ax.axhline(0, color="black", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
