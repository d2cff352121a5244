"""CUDA checks for a machine with a GPU; writes results/gpu-accuracy.json, gpu-estimate.json, gpu-apply.json.

    python experiments/gpu_checks.py

1. Tracker vs the caching allocator (``active_bytes.all.peak``) on GPT models, first and steady step.
2. Estimate (fake tensors, device="cuda") vs measured peak for gpt2 and a ~1B Llama config.
3. Plans at several budgets applied to the demo GPT and the ~1B Llama, measured again.
Exits with a message (code 2) where there is no CUDA.
"""

from __future__ import annotations

import copy
import sys

import torch
from _common import write_result

import memprof
from memprof.tracking.devices import cuda_available
from memprof.training import default_step, make_optimizer


def _allocator_step_peak(model, opt, batch):
    from memprof.tracking.groundtruth import live_bytes

    tensors = list(model.parameters()) + [v for st in opt.state.values() for v in st.values()]
    tensors += list(batch.values()) if isinstance(batch, dict) else list(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_stats()["active_bytes.all.current"]
    default_step(model, batch, opt)
    torch.cuda.synchronize()
    return live_bytes(tensors, round_to=512), torch.cuda.memory_stats()["active_bytes.all.peak"] - before


def accuracy():
    from memprof.zoo import DEMO_GPT, GPT, GPTConfig, gpt_batch

    rows = []
    for name, cfg, bs in (("demo GPT", DEMO_GPT, 8),
                          ("GPT-2 small shape",
                           GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768), 4)):
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = gpt_batch(cfg, bs, device="cuda")
        ref = copy.deepcopy(model)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
        for step in ("first", "steady"):
            live, rise = _allocator_step_peak(ref, ref_opt, batch)
            with memprof.track(model, opt) as tracker:
                default_step(model, batch, opt)
            prof = tracker.profile
            truth = live + rise
            rows.append({"model": name, "step": step, "tracker_peak_bytes": prof.peak_bytes,
                         "allocator_active_peak_bytes": truth, "error": prof.peak_bytes / truth - 1,
                         "allocator": dict(prof.devices[0].allocator)})
    write_result("gpu-accuracy", {"device": torch.cuda.get_device_name(0), "rows": rows,
                                  "target": "within 0.5% of active_bytes.all.peak",
                                  "target_met": all(abs(r["error"]) <= 0.005 for r in rows)})


def estimates():
    from memprof.estimation import get_architecture

    rows = []
    for name, seq, bs in (("gpt2", 1024, 4), ("llama-3.2-1b", 1024, 2)):
        arch = get_architecture(name)
        est = memprof.estimate(arch.build_model, lambda a=arch, b=bs, s=seq: a.make_batch(b, s), device="cuda",
                               precision="bf16-autocast")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = arch.build_model()
        opt = make_optimizer("adamw", model.parameters())
        batch = {k: v.cuda() for k, v in arch.make_batch(bs, seq).items()}
        with memprof.track(model, opt) as tracker:
            for _ in range(2):
                default_step(model, batch, opt, "bf16-autocast", device_type="cuda")
        prof = tracker.profile
        rows.append({"model": name, "seq_len": seq, "batch": bs, "estimated_peak_bytes": est.peak_bytes,
                     "measured_peak_bytes": prof.peak_bytes,
                     "measured_active_peak_bytes": prof.devices[0].allocator.get("active_peak"),
                     "error": est.peak_bytes / prof.peak_bytes - 1})
        del model, opt, batch
        torch.cuda.empty_cache()
    write_result("gpu-estimate", {"device": torch.cuda.get_device_name(0), "rows": rows,
                                  "target": "within 1%", "target_met": all(abs(r["error"]) <= 0.01 for r in rows)})


def apply_verify():
    from memprof.estimation import get_architecture
    from memprof.zoo import DEMO_GPT, GPT, gpt_batch

    rows = []
    builds = {"demo GPT": (lambda: GPT(DEMO_GPT), lambda: gpt_batch(DEMO_GPT, 16, device="cuda")),
              "llama-3.2-1b": (get_architecture("llama-3.2-1b").build_model,
                               lambda: {k: v.cuda() for k, v in get_architecture("llama-3.2-1b").make_batch(2, 1024).items()})}
    for name, (build, make_batch) in builds.items():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = build()
        opt = make_optimizer("adamw", model.parameters())
        batch = make_batch()
        with memprof.track(model, opt) as tracker:
            for _ in range(3):
                default_step(model, batch, opt)
        prof = tracker.profile
        for fraction in (0.9, 0.75, 0.6):
            budget = int(prof.peak_bytes * fraction)
            try:
                plan = memprof.plan(prof, budget)
            except memprof.MemprofError as e:
                rows.append({"model": name, "budget_bytes": budget, "error": str(e)})
                continue
            with memprof.apply(model, plan):
                with memprof.track(model, opt) as t2:
                    for _ in range(2):
                        default_step(model, batch, opt)
            m = t2.profile.peak_bytes
            rows.append({"model": name, "budget_bytes": budget, "predicted_peak_bytes": plan.predicted_peak_bytes,
                         "measured_peak_bytes": m, "within_budget": m <= budget,
                         "error": m / plan.predicted_peak_bytes - 1})
        del model, opt, batch
        torch.cuda.empty_cache()
    write_result("gpu-apply", {"device": torch.cuda.get_device_name(0), "rows": rows})


def main() -> int:
    if not cuda_available():
        print("no CUDA here: run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    accuracy()
    estimates()
    apply_verify()
    print("wrote results/gpu-accuracy.json, gpu-estimate.json, gpu-apply.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
