"""The planner against the usual checkpointing recipes, at every budget (CPU, measured profiles).

    python experiments/planner_frontier.py

Models: the demo GPT (6 blocks) and a 24-block GPT, each profiled for 3 real training steps on this CPU.
Baselines, priced by the same chain model the planner uses: checkpoint every block, every other block, and
Chen et al.'s sqrt(n) segments ("Training Deep Nets with Sublinear Memory Cost", 2016: keep only each
segment's output, recompute a whole segment in its backward). For budgets from the smallest feasible peak
to the no-checkpointing peak, the planner's recompute time must be <= each baseline's wherever that
baseline's peak fits the same budget. Writes results/planner-frontier.json and .png.
"""

from __future__ import annotations

import math

import torch  # noqa: I001
from _common import RESULTS, write_result

import memprof
from memprof.policy.chain import chain_model
from memprof.policy.solver import frontier, peak_of
from memprof.zoo import DEMO_GPT, GPT, GPTConfig, gpt_batch

MODELS = {
    "demo GPT (6 blocks)": (DEMO_GPT, 8),
    "GPT, 24 blocks": (GPTConfig(n_layer=24, n_embd=192, n_head=6, block_size=128, vocab_size=4096), 8),
}


def measure(cfg, batch_size):
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = gpt_batch(cfg, batch_size)
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracker.profile


def chen_segments(cm) -> tuple[int, float]:
    """Peak and recompute time of sqrt(n) segments, each checkpointed as one region."""
    units, p = cm.units, cm.problem
    n = len(units)
    k = max(1, round(math.sqrt(n)))
    segments = [list(range(i, min(n, i + k))) for i in range(0, n, k)]
    retained_before = 0
    prefix = 0  # activations of the units before, as measured with everything kept (the levels' reference)
    peak = 0
    for seg in segments:
        for j in seg:  # forward of each unit: same bound as the planner's options use
            forward_base = units[j].forward_entry_bytes - prefix
            peak = max(peak, forward_base + retained_before + units[j].forward_peak_bytes)
            prefix += units[j].activation_bytes
        # backward of the segment: everything retained before it + its whole recomputation
        last = seg[-1]
        local = sum(units[j].activation_bytes for j in seg) + max(units[j].backward_peak_bytes for j in seg)
        peak = max(peak, p.units[last].base_bytes + retained_before + local)
        retained_before += units[last].output_bytes
    peak = max(peak, p.forward_base_bytes + retained_before, cm.floor_bytes)
    return peak, sum(u.forward_ms for u in units)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, axes = plt.subplots(1, len(MODELS), figsize=(12, 4.5))
    for ax, (name, (cfg, bs)) in zip(axes, MODELS.items()):
        prof = measure(cfg, bs)
        cm = chain_model(prof, prof.peak_bytes)
        n = len(cm.problem.units)
        ms = {u.name: {o.name: o.extra_ms for o in u.options} for u in cm.problem.units}

        def evaluate(choices, cm=cm, ms=ms):
            return max(cm.floor_bytes, peak_of(cm.problem, choices)), sum(
                ms[u.name][c] for u, c in zip(cm.problem.units, choices))

        baselines = {
            "every block": evaluate(["full"] * n),
            "every other block": evaluate(["full" if i % 2 == 0 else "keep" for i in range(n)]),
            "sqrt(n) segments (Chen)": chen_segments(cm),
        }
        points = [(max(cm.floor_bytes, s.peak_bytes), s.extra_ms, s.choices) for s in frontier(cm.problem)]
        smallest, largest = min(p[0] for p in points), prof.peak_bytes
        budgets = [smallest + (largest - smallest) * i // 24 for i in range(25)]
        rows = []
        ok = True
        for b in budgets:
            best = min((p for p in points if p[0] <= b), key=lambda p: p[1])
            row = {"budget_bytes": b, "planner_peak_bytes": best[0], "planner_recompute_ms": best[1]}
            for bname, (bpeak, bms) in baselines.items():
                fits = bpeak <= b
                row[bname] = {"peak_bytes": bpeak, "recompute_ms": bms, "fits": fits}
                if fits and best[1] > bms + 1e-9:
                    ok = False
            rows.append(row)
        out[name] = {"blocks": n, "measured_peak_bytes": prof.peak_bytes, "rows": rows,
                     "baselines": {k: {"peak_bytes": v[0], "recompute_ms": v[1]} for k, v in baselines.items()},
                     "planner_never_slower": ok}
        mib = 1024**2
        ax.step([p[0] / mib for p in points], [p[1] for p in points], where="post", label="memprof planner (frontier)")
        for (bname, (bpeak, bms)), marker in zip(baselines.items(), "os^"):
            ax.plot([bpeak / mib], [bms], marker=marker, ls="", ms=9, label=bname)
        ax.set_title(f"{name}: peak {prof.peak_bytes / mib:.0f} MiB unplanned")
        ax.set_xlabel("predicted peak (MiB)")
        ax.set_ylabel("recompute time per step (ms, measured on CPU)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        print(f"{name}: {len(points)} frontier points, planner never slower than a baseline that fits: {ok}")
    fig.tight_layout()
    fig.savefig(RESULTS / "planner-frontier.png", dpi=110)
    path = write_result("planner-frontier", {"device": "CPU (2 cores), measured profiles", "models": out})
    print(f"wrote {path} and planner-frontier.png")


if __name__ == "__main__":
    main()
