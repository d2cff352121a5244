"""FSDP2 sharding as memprof plans and estimates it: one function used by both, so they cannot disagree.

Strategies (per rank, world size N):

    none           every rank holds the whole model, its grads and optimizer state (data parallel)
    full           FSDP2 ``fully_shard(reshard_after_forward=True)``: params/grads/state sharded N ways;
                   each unit's parameters are all-gathered for its forward and again for its backward
    shard-grad-op  ``reshard_after_forward=False``: as full, but units stay unsharded from forward to
                   backward (less communication, more memory)
    hybrid         HSDP: shard within groups of ``shard_group_size`` ranks, replicate across groups

Every repeated unit (see :mod:`memprof.structure`) is its own FSDP group, then the root. Mixed precision
goes to ``fully_shard`` as ``MixedPrecisionPolicy`` (bf16/fp16 parameters for compute, fp32 reductions).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import MemprofError

__all__ = ["STRATEGIES", "check_strategy", "build_mesh", "shard_model"]

STRATEGIES = ("none", "full", "shard-grad-op", "hybrid")


def check_strategy(strategy: str | None) -> str:
    strategy = strategy or "none"
    if strategy not in STRATEGIES:
        raise MemprofError(f"unknown sharding {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


def build_mesh(device_type: str, world_size: int, strategy: str, shard_group_size: int | None = None):
    from torch.distributed.device_mesh import init_device_mesh

    if strategy == "hybrid":
        group = shard_group_size or world_size
        if group < 1 or world_size % group:
            raise MemprofError(f"hybrid sharding needs shard_group_size dividing the world size {world_size}, "
                               f"got {shard_group_size}")
        return init_device_mesh(device_type, (world_size // group, group), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,))


def _mp_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-autocast":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp16-autocast":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, strategy: str, units: list[str], *, precision: str = "fp32", mesh=None,
                device_type: str = "cpu", shard_group_size: int | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (each unit, then the root). Needs an initialised process group."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    strategy = check_strategy(strategy)
    if strategy == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise MemprofError(f"sharding {strategy!r} needs an initialised torch.distributed process group "
                           "(launch with torchrun)")
    if mesh is None:
        mesh = build_mesh(device_type, dist.get_world_size(), strategy, shard_group_size)
    reshard = strategy != "shard-grad-op"
    mp = _mp_policy(precision)
    for fqn in units:
        fully_shard(model.get_submodule(fqn), mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    return model
