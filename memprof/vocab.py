"""The words memprof's options take: precisions, sharding strategies, checkpoint modes and levers, each once.

Every module that checks, plans, applies or renders one of these reads it from here; the CLI's choices and
the plan file's allowed values are these tuples. Each is a ``Literal`` type for annotations and a tuple of
its values in a fixed order (the order the planner tries them and the CLI lists them). Categories and phases
of memory are in :mod:`memprof.categories`. Torch-free.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "Precision", "PRECISIONS", "AUTOCAST_PRECISIONS",
    "Strategy", "SHARDING_STRATEGIES",
    "CheckpointMode", "CHECKPOINT_MODES", "RECOMPUTE_MODES",
    "Lever", "LEVERS", "STEP_LEVERS",
    "Optimizer", "OPTIMIZERS",
    "FinetuneMethod", "FINETUNE_METHODS", "DpoReference", "DPO_REFERENCES",
]

Precision = Literal["fp32", "bf16-autocast", "fp16-autocast", "bf16"]
"""How a step computes and stores:

* ``fp32``: everything in float32;
* ``bf16-autocast`` / ``fp16-autocast``: float32 parameters, gradients and optimizer state; matmuls and the
  activations they save in 16 bits under ``torch.autocast`` (fp16 adds a gradient scaler);
* ``bf16``: parameters, gradients and optimizer state in bfloat16 (``model.to(torch.bfloat16)``)."""
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
AUTOCAST_PRECISIONS: tuple[Precision, ...] = ("bf16-autocast", "fp16-autocast")

Strategy = Literal["none", "full", "shard-grad-op", "hybrid"]
"""FSDP2 sharding per rank (see :mod:`memprof.sharding`): ``none`` (data parallel), ``full`` (ZeRO-3,
``reshard_after_forward=True``), ``shard-grad-op`` (ZeRO-2, units stay gathered from forward to backward),
``hybrid`` (HSDP: shard within groups, replicate across them)."""
SHARDING_STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

CheckpointMode = Literal["keep", "full", "selective", "offload"]
"""What happens to one unit's activations: ``keep`` (stored, as without memprof), ``full`` (the unit is
recomputed in backward), ``selective`` (cheap ops recomputed, matmul and attention outputs kept),
``offload`` (its saved tensors kept in host memory until backward: CUDA only,
:mod:`memprof.activation_offload`)."""
CHECKPOINT_MODES: tuple[CheckpointMode, ...] = get_args(CheckpointMode)
RECOMPUTE_MODES: tuple[CheckpointMode, ...] = ("full", "selective")

Lever = Literal["checkpoint", "precision", "sharding", "loss-head", "micro-batches", "optimizer-in-backward",
                "bf16-moments", "activation-offload"]
"""What the planner may change: activation checkpointing per unit, the precision, FSDP sharding (with CPU
offload), and the step levers (:mod:`memprof.policy.variants`): loss-head chunking (the output projection
and cross-entropy a chunk of tokens at a time, :mod:`memprof.policy.loss_head`), micro-batches with gradient
accumulation (:mod:`memprof.policy.microbatch`), the optimizer step in backward
(:mod:`memprof.policy.step_in_backward`), bf16 Adam moments (:mod:`memprof.policy.state_precision`), and
activation offload to host memory, a per-unit mode beside checkpointing ("offload", CUDA profiles only,
:mod:`memprof.activation_offload`)."""
LEVERS: tuple[Lever, ...] = get_args(Lever)
STEP_LEVERS: tuple[Lever, ...] = ("loss-head", "micro-batches", "optimizer-in-backward", "bf16-moments")

Optimizer = Literal["adamw", "adamw-forloop", "adamw-foreach", "adamw-fused",
                    "adam", "adam-forloop", "adam-foreach", "adam-fused", "sgd"]
"""The optimizers an estimate can build (``torch.optim``; ``-forloop``/``-foreach``/``-fused`` pick the
implementation, whose step temporaries differ; no suffix: torch's default for the device)."""
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)

FinetuneMethod = Literal["sft", "dpo"]
"""What a fine-tuning estimate trains: ``sft`` (next-token loss) or ``dpo`` (a chosen and a rejected answer
per prompt, against a reference)."""
FINETUNE_METHODS: tuple[FinetuneMethod, ...] = get_args(FinetuneMethod)

DpoReference = Literal["model", "precomputed"]
"""Where DPO's reference log-probabilities come from: a frozen copy of the model run in each step, or
precomputed ones in the batch."""
DPO_REFERENCES: tuple[DpoReference, ...] = get_args(DpoReference)
