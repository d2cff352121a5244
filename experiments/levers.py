"""Each LLM lever alone and stacked (torchtune's table, redone on our models on this CPU): measured peak,
step time and the estimator's peak for every configuration.

    python experiments/levers.py [--reps 5] [--quick] [--default-malloc]

Models: a head-heavy nanoGPT-style GPT (vocab 32768, d=128, 4 layers, batch 4 x 256; tests/fixtures/
nanogpt_model.py, ``(logits, loss)``) and an HF transformers Llama from a config with a 32k vocabulary
(d=128, 4 layers, batch 2 x 256, ``labels=``). Levers: loss-head chunking
(memprof.policy.loss_head), full checkpointing of every block (memprof.apply), optimizer step in backward
(memprof.policy.step_in_backward), bf16 optimizer moments (memprof.policy.state_precision) and 2
micro-batches (memprof.policy.microbatch). Rows: the plain step, each lever alone, and the levers stacked
in torchtune's order (chunked loss, + checkpointing, + step in backward, + bf16 moments), and the stack
with micro-batches in place of the step in backward (the two do not combine).

Peak: the tracker's (the CPU allocator's, to the byte) over 2 steps of a fresh model. Estimate:
``memprof.estimate`` of the same configuration on fake tensors (device "cpu"). Time: untracked steps, each
configuration's median over ``--reps`` rounds, the configurations interleaved within each round; the
overhead is the median of per-round ratios against the plain step of the same round. Writes
results/levers.json and results/levers.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch  # noqa: I001
from _common import MALLOC_HELP, RESULTS, use_caching_malloc, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memprof  # noqa: E402
from memprof.policy.loss_head import chunk_loss_head  # noqa: E402
from memprof.policy.microbatch import microbatched  # noqa: E402
from memprof.policy.state_precision import low_precision_state  # noqa: E402
from memprof.policy.step_in_backward import step_in_backward  # noqa: E402
from memprof.policy.timing import uniform_plan  # noqa: E402
from memprof.training import default_step, make_optimizer  # noqa: E402
from tests.fixtures.nanogpt_model import GPT, GPTConfig  # noqa: E402

LEVERS = ("chunked-loss", "checkpoint", "step-in-backward", "bf16-moments", "micro-batches-2")
ROWS = {
    "plain": (),
    **{f"{lever} alone": (lever,) for lever in LEVERS},
    "stack: chunked-loss": ("chunked-loss",),
    "stack: + checkpoint": ("chunked-loss", "checkpoint"),
    "stack: + step-in-backward": ("chunked-loss", "checkpoint", "step-in-backward"),
    "stack: + bf16-moments": ("chunked-loss", "checkpoint", "step-in-backward", "bf16-moments"),
    "stack with micro-batches": ("chunked-loss", "checkpoint", "bf16-moments", "micro-batches-2"),
}


def nanogpt_case(quick: bool):
    cfg = GPTConfig(block_size=256, vocab_size=32768, n_layer=2 if quick else 4, n_head=4, n_embd=128,
                    dropout=0.0)

    def build():
        return GPT(cfg)

    def batch():
        g = torch.Generator().manual_seed(1)
        return (torch.randint(0, cfg.vocab_size, (4, 256), generator=g),
                torch.randint(0, cfg.vocab_size, (4, 256), generator=g))

    return build, batch, [f"transformer.h.{i}" for i in range(cfg.n_layer)]


def llama_case(quick: bool):
    import transformers

    layers = 2 if quick else 4
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=344,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"

    def build():
        return transformers.LlamaForCausalLM(cfg)

    def batch():
        ids = torch.randint(0, 32000, (2, 256), generator=torch.Generator().manual_seed(2))
        return {"input_ids": ids, "labels": ids}

    return build, batch, [f"model.layers.{i}" for i in range(layers)]


def configured(build, units, levers):
    """(build_model, step) for a configuration: model-side levers in the factory, loop-side in the step."""

    def build_model():
        model = build()
        if "chunked-loss" in levers:
            chunk_loss_head(model, chunk_tokens=256)
        if "checkpoint" in levers:
            memprof.apply(model, uniform_plan(units, "full"))
        return model

    inner = microbatched(2) if "micro-batches-2" in levers else default_step

    def step(model, batch, opt, precision="fp32", scaler=None, device_type="cpu"):
        if "step-in-backward" in levers and getattr(opt, "_memprof_step_in_backward", None) is None:
            step_in_backward(model, opt)
        if "bf16-moments" in levers and getattr(opt, "_memprof_state_precision", None) is None:
            low_precision_state(opt)
        return inner(model, batch, opt, precision, scaler, device_type)

    return build_model, step


def measured_peak(build_model, batch, step) -> int:
    torch.manual_seed(0)
    model, b = build_model(), batch()
    opt = make_optimizer("adamw", model.parameters())
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            step(model, b, opt)
    return tracker.profile.peak_bytes


def time_rows(configs, batch, reps: int) -> dict[str, dict]:
    """Untracked step times, the configurations interleaved in each round."""
    live = {}
    for name, (build_model, step) in configs.items():
        torch.manual_seed(0)
        model, b = build_model(), batch()
        opt = make_optimizer("adamw", model.parameters())
        for _ in range(2):  # warm-up: optimizer state made, allocator warmed
            step(model, b, opt)
        live[name] = (model, b, opt, step)
    times = {name: [] for name in configs}
    for _ in range(reps):
        for name, (model, b, opt, step) in live.items():
            t0 = time.perf_counter()
            step(model, b, opt)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ratios = [t / p for t, p in zip(ts, times["plain"])]
        out[name] = {"step_ms": round(statistics.median(ts), 2),
                     "overhead": round(statistics.median(ratios) - 1, 4)}
    return out


def run_case(label, case, reps, quick) -> list[dict]:
    build, batch, units = case(quick)
    configs = {name: configured(build, units, levers) for name, levers in ROWS.items()}
    timing = time_rows(configs, batch, reps)
    rows = []
    for name, levers in ROWS.items():
        build_model, step = configs[name]
        peak = measured_peak(build_model, batch, step)
        est = memprof.estimate(build_model, batch, step=step, device="cpu", blocks="all").peak_bytes
        rows.append({"model": label, "row": name, "levers": list(levers), "measured_peak_bytes": peak,
                     "estimated_peak_bytes": est, "estimate_error": round(est / peak - 1, 6), **timing[name]})
        print(f"{label:8s} {name:28s} peak {peak / 2**20:8.1f} MiB  est {est / 2**20:8.1f} MiB  "
              f"step {timing[name]['step_ms']:8.1f} ms  overhead {timing[name]['overhead']:+.1%}", flush=True)
    plain = rows[0]["measured_peak_bytes"]
    for r in rows:
        r["peak_vs_plain"] = round(r["measured_peak_bytes"] / plain - 1, 4)
    return rows


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        ax.scatter([r["overhead"] * 100 for r in mine], [r["measured_peak_bytes"] / 2**20 for r in mine])
        for r in mine:
            ax.annotate(r["row"], (r["overhead"] * 100, r["measured_peak_bytes"] / 2**20), fontsize=6)
        ax.set_xlabel("step-time overhead vs plain (%)")
        ax.set_ylabel("measured peak (MiB)")
        ax.set_title(model)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2-layer models, 3 rounds")
    ap.add_argument("--default-malloc", action="store_true", help=MALLOC_HELP)
    args = ap.parse_args()
    use_caching_malloc(args.default_malloc)
    reps = 3 if args.quick else args.reps
    t0 = time.time()
    rows = run_case("nanogpt", nanogpt_case, reps, args.quick) + run_case("hf-llama", llama_case, reps,
                                                                            args.quick)
    name = "levers-quick" if args.quick else "levers"
    plot(rows, RESULTS / f"{name}.png")
    write_result(name, {"description": __doc__.split("\n\n")[0], "reps": reps, "wall_s": round(time.time() - t0, 1),
                        "rows": rows,
                        "max_abs_estimate_error": max(abs(r["estimate_error"]) for r in rows)})


if __name__ == "__main__":
    main()
