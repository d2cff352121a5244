"""Selective (op-level) activation checkpointing: which ops' outputs are kept, which are recomputed.

Matmuls and attention are expensive to recompute and their outputs are what most of backward needs, so they
are kept; everything else in a checkpointed unit (pointwise ops, norms, activations, dropout) is recomputed
in backward. The planner reads a unit's activation bytes by the op that made them (``activation_by_op``),
and ``memprof.apply`` hands the same list to ``torch.utils.checkpoint.create_selective_checkpoint_contexts``.
"""

from __future__ import annotations

import torch

__all__ = ["SAVE_OP_NAMES", "save_ops", "policy_fn", "context_fn"]

# Names as the tracker records them (``OpOverloadPacket.__name__``).
SAVE_OP_NAMES = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "cudnn_convolution", "mkldnn_convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
})


def save_ops() -> set:
    """The OpOverloadPackets of :data:`SAVE_OP_NAMES` that this PyTorch build has."""
    return {getattr(torch.ops.aten, n) for n in SAVE_OP_NAMES if hasattr(torch.ops.aten, n)}


def policy_fn(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    packet = getattr(op, "overloadpacket", op)
    if getattr(packet, "__name__", "") in SAVE_OP_NAMES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(policy_fn)
