"""A small GPT trained with FSDP2 on real gloo ranks, and the same step as the estimator sees it."""

from __future__ import annotations

from memprof.zoo import GPTConfig

# Activations dominate parameters here, as in real training: gloo frees some collective buffers on its worker
# threads at times that vary from run to run, which moves a rank's peak by up to one parameter group.
CFG = GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=256, vocab_size=256)
BATCH = 8


def build():
    from memprof.zoo import GPT

    return GPT(CFG)


def batch():
    from memprof.zoo import gpt_batch

    return gpt_batch(CFG, BATCH)


def measured_rank_peak(rank, world_size, strategy="full", steps=3):
    """Per-rank tracked peak of real FSDP2 steps on gloo (run inside a rank)."""
    import torch

    import memprof
    from memprof.sharding import shard_model
    from memprof.structure import repeated_units
    from memprof.training import default_step, make_optimizer

    torch.manual_seed(0)
    model = build()
    shard_model(model, strategy, repeated_units(model), device_type="cpu")
    opt = make_optimizer("adamw", model.parameters())
    b = batch()
    with memprof.track(model, opt) as tracker:
        for _ in range(steps):
            default_step(model, b, opt)
    return tracker.profile.peak_bytes
