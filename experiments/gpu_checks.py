"""CUDA checks for a machine with a GPU; writes results/gpu-accuracy.json, gpu-estimate.json, gpu-apply.json,
gpu-overhead.json.

    python experiments/gpu_checks.py [--only accuracy,estimate,apply,overhead]

1. Tracker vs the caching allocator (``active_bytes.all.peak``) on GPT models, first and steady step.
   Ground truth: the bytes live before the step (hand-counted, rounded as the allocator rounds) plus the
   allocator's own rise during the step (``reset_peak_memory_stats`` before, ``active_bytes.all.peak`` minus
   the level before, after). The step runs on an identical copy of the model, just before the tracked one.
2. Estimate (fake tensors, device="cuda") vs measured peak for gpt2 and a ~1B Llama config.
3. Plans at several budgets applied to the demo GPT and the ~1B Llama, measured again.
4. Tracking overhead of a GPT-2-small step on the GPU (with/without the tracker, interleaved), best run in a
   process of its own (``--only overhead``): a heap grown by the other parts makes the garbage collector's
   full passes, which the tracker's objects set off, cost more.

cuBLAS makes a workspace per (handle, stream) the first time a matrix product runs on a thread, through the
caching allocator but outside any tensor op; the forward and the backward (autograd's device thread) each get
one. ``_warm_libraries`` makes them before anything is measured, as any training job has after its first step.

Each part runs on its own: one that fails prints its traceback and writes no result file, and the others go
on. Exits with a message (code 2) where there is no CUDA, 1 if a part failed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback

import torch
from _common import write_result

import memprof
from memprof.tracking.devices import cuda_available
from memprof.training import default_step, make_optimizer


def _warm_libraries() -> None:
    lin = torch.nn.Linear(64, 64, device="cuda")
    x = torch.randn(8, 16, 64, device="cuda", requires_grad=True)
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            q = lin(x).view(8, 16, 4, 16).transpose(1, 2)
            y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        y.float().sum().backward()
    torch.cuda.synchronize()


def _allocator_step_peak(model, opt, batch, precision="fp32"):
    """(active truth, requested truth): bytes live before the step (512-rounded, resp. as requested) plus the
    rise of ``active_bytes`` (resp. ``requested_bytes``) during it."""
    from memprof.tracking.groundtruth import live_bytes

    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.is_cuda]
    tensors += list(batch.values()) if isinstance(batch, dict) else list(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_stats()
    default_step(model, batch, opt, precision, device_type="cuda")
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    rise = {k: after[f"{k}.all.peak"] - before[f"{k}.all.current"] for k in ("active_bytes", "requested_bytes")}
    return (live_bytes(tensors, round_to=512) + rise["active_bytes"],
            live_bytes(tensors) + rise["requested_bytes"])


def accuracy():
    from memprof.zoo import DEMO_GPT, GPT, GPTConfig, gpt_batch

    rows = []
    gpt2 = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    for name, cfg, bs, precision in (("demo GPT", DEMO_GPT, 8, "fp32"),
                                     ("GPT-2 small shape", gpt2, 4, "fp32"),
                                     ("GPT-2 small shape", gpt2, 4, "bf16-autocast")):
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = gpt_batch(cfg, bs, device="cuda")
        ref = copy.deepcopy(model)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
        for step in ("first", "steady"):
            truth, requested = _allocator_step_peak(ref, ref_opt, batch, precision)
            with memprof.track(model, opt) as tracker:
                default_step(model, batch, opt, precision, device_type="cuda")
            prof = tracker.profile
            rows.append({"model": name, "batch": bs, "seq_len": cfg.block_size, "precision": precision,
                         "step": step, "tracker_peak_bytes": prof.peak_bytes,
                         "allocator_active_peak_bytes": truth, "error": prof.peak_bytes / truth - 1,
                         "allocator_requested_peak_bytes": requested,
                         "error_vs_requested": prof.peak_bytes / requested - 1,
                         "tracker_allocator_record": dict(prof.devices[0].allocator)})
        del model, opt, batch, ref, ref_opt
        torch.cuda.empty_cache()
    return "gpu-accuracy", {"device": torch.cuda.get_device_name(0), "rows": rows,
                            "ground_truth": "bytes live before the step (hand count, 512-byte rounding) + "
                                            "active_bytes.all.peak - active_bytes.all.current before the step, "
                                            "on an identical copy of the model and optimizer; "
                                            "allocator_requested_peak_bytes: the same with requested_bytes "
                                            "(sizes as asked for, before the allocator rounds them or hands out "
                                            "a larger cached block whole)",
                            "target": "within 0.5% of active_bytes.all.peak (fp32 training, as on CPU)",
                            "target_met": all(abs(r["error"]) <= 0.005 for r in rows if r["precision"] == "fp32"),
                            "bf16_autocast_within_half_a_percent": all(
                                abs(r["error"]) <= 0.005 for r in rows if r["precision"] != "fp32")}


def estimates():
    from memprof.estimation import get_architecture

    rows = []
    for name, seq, bs in (("gpt2", 1024, 4), ("llama-3.2-1b", 1024, 2)):
        arch = get_architecture(name)
        t0 = time.perf_counter()
        est = memprof.estimate(arch.build_model, lambda a=arch, b=bs, s=seq: a.make_batch(b, s), device="cuda",
                               precision="bf16-autocast")
        est_s = time.perf_counter() - t0
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = arch.build_model()
        opt = make_optimizer("adamw", model.parameters())
        batch = {k: v.cuda() for k, v in arch.make_batch(bs, seq).items()}
        with memprof.track(model, opt) as tracker:
            for _ in range(2):
                default_step(model, batch, opt, "bf16-autocast", device_type="cuda")
        prof = tracker.profile
        rows.append({"model": name, "seq_len": seq, "batch": bs, "precision": "bf16-autocast", "optimizer": "adamw",
                     "estimated_peak_bytes": est.peak_bytes, "measured_peak_bytes": prof.peak_bytes,
                     "measured_active_peak_bytes": prof.devices[0].allocator.get("active_peak"),
                     "estimate_seconds": est_s, "error": est.peak_bytes / prof.peak_bytes - 1})
        del model, opt, batch
        torch.cuda.empty_cache()
    return "gpu-estimate", {"device": torch.cuda.get_device_name(0), "rows": rows,
                            "measured": "tracker peak over two steps (its accuracy: gpu-accuracy.json)",
                            "target": "within 1%", "target_met": all(abs(r["error"]) <= 0.01 for r in rows)}


def apply_verify():
    from memprof.estimation import get_architecture
    from memprof.zoo import DEMO_GPT, GPT, gpt_batch

    rows = []
    llama = get_architecture("llama-3.2-1b")
    # Budgets as fractions of the unplanned peak, inside what checkpointing alone can reach (fp32 AdamW on the
    # Llama keeps ~84% of its peak: parameters, gradients and the foreach optimizer step's state and temporaries).
    builds = {"demo GPT": (lambda: GPT(DEMO_GPT), lambda: gpt_batch(DEMO_GPT, 16, device="cuda"), (0.9, 0.75, 0.6)),
              "llama-3.2-1b": (llama.build_model,
                               lambda: {k: v.cuda() for k, v in llama.make_batch(2, 1024).items()},
                               (0.95, 0.9, 0.86))}
    for name, (build, make_batch, fractions) in builds.items():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = build()
        opt = make_optimizer("adamw", model.parameters())
        batch = make_batch()
        with memprof.track(model, opt) as tracker:
            for _ in range(3):
                default_step(model, batch, opt)
        prof = tracker.profile
        for fraction in fractions:
            budget = int(prof.peak_bytes * fraction)
            try:
                plan = memprof.plan(prof, budget)
            except memprof.MemprofError as e:
                rows.append({"model": name, "budget_fraction": fraction, "budget_bytes": budget, "no_plan": str(e)})
                continue
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with memprof.apply(model, plan):
                with memprof.track(model, opt) as t2:
                    for _ in range(2):
                        default_step(model, batch, opt)
            m = t2.profile.peak_bytes
            rows.append({"model": name, "unplanned_peak_bytes": prof.peak_bytes, "budget_fraction": fraction,
                         "budget_bytes": budget,
                         "precision": plan.precision, "checkpoint": plan.checkpoint_modes(),
                         "sharding": str(plan.sharding), "predicted_overhead": plan.predicted_overhead,
                         "predicted_peak_bytes": plan.predicted_peak_bytes, "measured_peak_bytes": m,
                         "allocator_active_peak_bytes": torch.cuda.memory_stats()["active_bytes.all.peak"],
                         "within_budget": m <= budget, "error": m / plan.predicted_peak_bytes - 1})
        del model, opt, batch
        torch.cuda.empty_cache()
    planned = [r for r in rows if "error" in r]
    return "gpu-apply", {"device": torch.cuda.get_device_name(0), "rows": rows,
                         "target": "under budget, within 2% of the predicted peak",
                         "target_met": bool(planned) and all(r["within_budget"] and abs(r["error"]) <= 0.02
                                                             for r in planned)}


def overhead(rounds: int = 15, multi: int = 10):
    """Wall time of a GPT-2-small step with and without a tracker, interleaved, at two batch sizes; the
    garbage collector runs before each timed step (outside the timing), as in experiments/overhead.py."""
    import cProfile
    import gc
    import io
    import pstats

    from memprof.zoo import GPT, GPTConfig, gpt_batch

    cfg = GPTConfig(n_layer=12, n_embd=768, n_head=12, block_size=1024, vocab_size=50257)
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = {}
    for bs in (8, 32):
        batch = gpt_batch(cfg, bs, device="cuda")
        parts = {"start": [], "stop": [], "build": []}

        def step(batch=batch):
            default_step(model, batch, opt, "bf16-autocast", device_type="cuda")

        def timed(tracked: bool, n: int = 1, parts=parts, step=step) -> float:
            gc.collect()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if tracked:
                tr = memprof.track(model, opt)
                tr.start()
                t1 = time.perf_counter()
                for _ in range(n):
                    step()
                t2 = time.perf_counter()
                tr.stop()
                t3 = time.perf_counter()
            else:
                for _ in range(n):
                    step()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if tracked:
                t4 = time.perf_counter()
                tr.profile  # noqa: B018 - built on first read, outside the step's time
                parts["start"].append(t1 - t0)
                parts["stop"].append(t3 - t2)
                parts["build"].append(time.perf_counter() - t4)
            return dt / n

        for tracked in (False, True, False, True):
            timed(tracked)
        ratios, multi_ratios, plain, tracked_ms = [], [], [], []
        for i in range(rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            t = {o: timed(o) for o in order}
            plain.append(t[False])
            tracked_ms.append(t[True])
            ratios.append(t[True] / t[False])
        for i in range(max(2, rounds // 3)):
            order = (False, True) if i % 2 == 0 else (True, False)
            t = {o: timed(o, multi) for o in order}
            multi_ratios.append(t[True] / t[False])
        ms = {k: 1e3 * statistics.median(v) for k, v in parts.items()}
        out[f"batch_{bs}"] = {
            "plain_step_ms_median": 1e3 * statistics.median(plain),
            "one_tracker_per_step": {"step_ms_median": 1e3 * statistics.median(tracked_ms),
                                     "ratio_median": statistics.median(ratios), "ratios": ratios},
            f"one_tracker_over_{multi}_steps": {"ratio_median": statistics.median(multi_ratios),
                                                "ratios": multi_ratios},
            "tracker_start_ms_median": ms["start"], "tracker_stop_ms_median": ms["stop"],
            "profile_build_ms_median": ms["build"]}
        del batch
    prof = cProfile.Profile()
    batch = gpt_batch(cfg, 8, device="cuda")
    gc.collect()
    prof.enable()
    for _ in range(3):
        with memprof.track(model, opt):
            default_step(model, batch, opt, "bf16-autocast", device_type="cuda")
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return "gpu-overhead", {"device": torch.cuda.get_device_name(0),
                            "setup": "GPT-2 small (12 layers, d=768), 1024 tokens per sequence, bf16 autocast, "
                                     "AdamW; wall time with synchronize, interleaved; gc.collect() before each "
                                     "timed step; the profile is read after each timing (its build not counted)",
                            "rounds": rounds, **out,
                            "cprofile_three_tracked_steps_batch_8": text.getvalue().splitlines()[:45]}


PARTS = {"accuracy": accuracy, "estimate": estimates, "apply": apply_verify, "overhead": overhead}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run")
    args = ap.parse_args()
    if not cuda_available():
        print("no CUDA here: run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    _warm_libraries()
    failed = []
    for part in args.only.split(","):
        t0 = time.perf_counter()
        try:
            name, data = PARTS[part]()
        except Exception:
            traceback.print_exc()
            failed.append(part)
            print(f"{part}: FAILED after {time.perf_counter() - t0:.1f} s", flush=True)
            torch.cuda.empty_cache()
            continue
        path = write_result(name, data)
        print(f"{part}: wrote {path.name} in {time.perf_counter() - t0:.1f} s; target met: "
              f"{data.get('target_met', '-')}", flush=True)
        for r in data.get("rows", []):
            print("   ", {k: v for k, v in r.items() if k not in ("tracker_allocator_record", "plan")}, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
