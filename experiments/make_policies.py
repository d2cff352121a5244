"""The example plans committed under policies/, made by the committed code.

    python experiments/make_policies.py

* demo-gpt-cpu.toml: the demo GPT (memprof demo's model, batch 8), measured on this CPU, for 80% of its peak.
* llama-2-7b-1xH100-80GB.toml and llama-2-7b-8xH100-80GB.toml: full fine-tuning of llama-2-7b (AdamW,
  batch 1 x 4096 tokens) planned from fake-tensor estimates, with the checkpoint, precision and sharding
  levers (on one GPU sharding is CPU offload: FSDP on one rank; for 8 GPUs, keeping fp32 master weights: fp32
  or bf16-autocast, FSDP strategies with and without CPU offload).
* llama-2-7b-1xH100-80GB-fp32-master.toml: the same on one GPU keeping fp32 master weights (fp32 or
  bf16-autocast): only CPU offload makes it fit.
"""

from __future__ import annotations

import sys

from _common import ROOT

import memprof  # noqa: I001

sys.path.insert(0, str(ROOT))


def demo() -> None:
    import torch

    from memprof.training import default_step
    from memprof.zoo import DEMO_GPT, GPT, gpt_batch

    torch.manual_seed(0)
    model = GPT(DEMO_GPT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batch = gpt_batch(DEMO_GPT, 8)
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            default_step(model, batch, opt)
    prof = tracker.profile
    plan = memprof.plan(prof, int(prof.peak_bytes * 0.8))
    plan.save(ROOT / "policies" / "demo-gpt-cpu.toml")
    print(f"demo GPT: peak {prof.peak_bytes / 2**20:.1f} MiB -> plan {plan.predicted_peak_bytes / 2**20:.1f} MiB")


def llama(world_size: int, master_weights: bool = False) -> None:
    from memprof.estimation import get_architecture
    from memprof.estimation.sources import EstimateSource

    arch = get_architecture("llama-2-7b")
    source = EstimateSource(arch.build_model, lambda: arch.make_batch(1, 4096), device="cuda",
                            device_memory="H100-80GB", description="llama-2-7b, batch 1 x 4096")
    base = source.profile("fp32")
    levers = ("checkpoint", "precision", "sharding")
    # One GPU: bf16 parameters, or CPU offload of parameters, gradients and AdamW state (FSDP on one rank), make
    # AdamW fine-tuning fit. Eight: keep fp32 master weights (the usual choice when sharding can make room), so
    # the planner weighs FSDP strategies, with and without offload, against each other.
    # With master_weights on one GPU, fp32 master weights too: then only CPU offload makes AdamW fit.
    precisions = None if world_size == 1 and not master_weights else ("fp32", "bf16-autocast")
    plan = memprof.plan(base, "H100-80GB", world_size=world_size, levers=levers, source=source,
                        precisions=precisions)
    name = f"llama-2-7b-{world_size}xH100-80GB{'-fp32-master' if master_weights else ''}.toml"
    plan.save(ROOT / "policies" / name)
    offload = " + CPU offload" if plan.sharding.offload_optimizer else ""
    print(f"{name}: {plan.precision}, {plan.sharding.strategy}{offload}, "
          f"{sum(c.mode != 'keep' for c in plan.checkpoint)} of {len(plan.checkpoint)} layers checkpointed, "
          f"predicted {plan.predicted_peak_bytes / 2**30:.1f} GiB per GPU, {plan.predicted_overhead:+.1%}")


if __name__ == "__main__":
    demo()
    llama(1)
    llama(1, master_weights=True)
    llama(8)
