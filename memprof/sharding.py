"""FSDP2 sharding as memprof plans and estimates it: one function used by both, so they cannot disagree.

Strategies (per rank, world size N):

    none           every rank holds the whole model, its grads and optimizer state (data parallel)
    full           FSDP2 ``fully_shard(reshard_after_forward=True)``: params/grads/state sharded N ways;
                   each unit's parameters are all-gathered for its forward and again for its backward
    shard-grad-op  ``reshard_after_forward=False``: as full, but units stay unsharded from forward to
                   backward (less communication, more memory)
    hybrid         HSDP: shard within groups of ``shard_group_size`` ranks, replicate across groups

CPU offload (``offload=True``, any strategy but "none") is FSDP2's ``CPUOffloadPolicy``: each rank's shards
of the parameters live on the host, are copied to the device for every all-gather, gradients are
reduce-scattered on the device and copied to the host, and the optimizer step (and so its state) runs on
the CPU. It also works at world size 1 (FSDP on a one-rank mesh: nothing is split, but parameters,
gradients and optimizer state stay on the host and only the units being computed are on the device); the
model's parameters must be on the CPU when it is sharded. Offload needs FSDP: with strategy "none" it is
an error.

Every repeated unit (see :mod:`memprof.structure`) is its own FSDP group, then the root. Mixed precision
goes to ``fully_shard`` as ``MixedPrecisionPolicy`` (bf16/fp16 parameters for compute, fp32 reductions).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import MemprofError
from .vocab import SHARDING_STRATEGIES

__all__ = ["check_strategy", "check_offload", "build_mesh", "shard_model"]


def check_strategy(strategy: str | None) -> str:
    strategy = strategy or "none"
    if strategy not in SHARDING_STRATEGIES:
        raise MemprofError(f"unknown sharding {strategy!r}; choose one of {', '.join(SHARDING_STRATEGIES)}")
    return strategy


def check_offload(strategy: str, offload: bool) -> bool:
    if not isinstance(offload, bool):
        raise MemprofError(f"offload must be True or False, got {offload!r}")
    if offload and strategy == "none":
        raise MemprofError("CPU offload is an FSDP feature: use sharding 'full', 'shard-grad-op' or 'hybrid' with "
                           "it (at world size 1, 'full' shards over a one-rank mesh)")
    return offload


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


def _pin_memory(model: nn.Module, device_type: str) -> bool:
    """Pin the host shards when real CUDA tensors are in use (faster, overlappable copies); never for fake
    tensors or CPU training."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not any(isinstance(p, FakeTensor) for p in model.parameters())


def shard_model(model: nn.Module, strategy: str, units: list[str], *, precision: str = "fp32", mesh=None,
                device_type: str = "cpu", shard_group_size: int | None = None, offload: bool = False,
                pin_memory: bool | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (each unit, then the root). Needs an initialised process group.

    ``offload``: FSDP2 ``CPUOffloadPolicy`` (see the module doc); ``pin_memory`` (default: when real CUDA
    tensors are in use) pins the host shards.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    strategy = check_strategy(strategy)
    check_offload(strategy, offload)
    if strategy == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise MemprofError(f"sharding {strategy!r} needs an initialised torch.distributed process group "
                           "(launch with torchrun)")
    if mesh is None:
        mesh = build_mesh(device_type, dist.get_world_size(), strategy, shard_group_size)
    reshard = strategy != "shard-grad-op"
    mp = _mp_policy(precision)
    if offload:
        pin = _pin_memory(model, device_type) if pin_memory is None else pin_memory
        policy = CPUOffloadPolicy(pin_memory=pin)
    else:
        policy = OffloadPolicy()
    for fqn in units:
        fully_shard(model.get_submodule(fqn), mesh=mesh, reshard_after_forward=reshard, mp_policy=mp,
                    offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=policy)
    return model
