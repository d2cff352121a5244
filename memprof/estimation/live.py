"""Estimating a model that already exists in memory, from its first forward's real arguments.

``@memprof.auto`` and ``memprof run --budget`` must decide before the first step whether it would fit. They
see the real model and the real batch at the root's first forward; :func:`estimate_live` copies the model
into fake tensors (a deep copy whose memo maps every parameter and buffer to a fake twin: nothing is
allocated) and estimates one training step of it with the real batch, converted to fake tensors with real
shadows, so data-dependent reads (padding masks) answer as they will in the real step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..training import CallArgs
from .calls import current_fake_mode
from .sources import EstimateSource

__all__ = ["fake_copy", "estimate_live", "live_source"]


def fake_copy(model: nn.Module) -> nn.Module:
    """A structural deep copy of ``model`` whose tensors are fake (call under a FakeTensorMode)."""
    mode = current_fake_mode()
    memo: dict[int, object] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = mode.from_tensor(b)
    for m in model.modules():  # tensors kept as plain attributes (rotary caches, masks)
        for v in m.__dict__.values():
            if isinstance(v, torch.Tensor) and id(v) not in memo:
                memo[id(v)] = mode.from_tensor(v)
    return copy.deepcopy(model, memo)


def _batch(args, kwargs):
    """The default step's batch for these forward arguments."""

    kwargs = dict(kwargs or {})
    if not kwargs:
        return tuple(args)
    if not args:
        return kwargs
    return CallArgs(tuple(args), kwargs)


def live_source(model: nn.Module, args=(), kwargs=None, *, optimizer: str = "adamw", device_memory=None):
    """An :class:`~memprof.estimation.sources.EstimateSource` for this live model and batch (any precision)."""

    batch = _batch(args, kwargs)
    device = "cuda" if any(p.device.type == "cuda" for p in model.parameters()) else "cpu"
    return EstimateSource(lambda: fake_copy(model), lambda: batch, optimizer=optimizer, device=device,
                          device_memory=device_memory, description=f"live {type(model).__name__}")


def estimate_live(model: nn.Module, args=(), kwargs=None, *, optimizer: str = "adamw", precision: str = "fp32",
                  device_memory=None):
    """Estimate a training step of ``model`` on this batch (the real tensors of its first forward)."""
    return live_source(model, args, kwargs, optimizer=optimizer, device_memory=device_memory).profile(precision)
