"""Micro-batching with gradient accumulation: one optimizer step over ``k`` slices of the batch, so that
only one slice's activations exist at a time.

``microbatched(k)`` is a training step with the signature of :func:`memprof.training.default_step`
(``step(model, batch, optimizer, precision, scaler, device_type)``): it slices the batch along its first
dimension (views: no copy), runs forward and backward on each slice with the slice's share of the loss,
then steps the optimizer once. Give it to ``memprof.estimate(..., step=...)`` to see the peak it
reaches, or call it in a loop.

The accumulated gradient equals the full batch's when the loss is a mean over the batch's items:
* Hugging Face models called with ``labels=``: each slice's loss is the sum over its tokens divided by the
  whole batch's number of predicted tokens (``num_items_in_batch``, as the HF ``Trainer`` does), exact
  also with ignored (``-100``) labels;
* other models (nanoGPT's ``(logits, loss)``, a scalar output): each slice's mean loss is weighted by its
  share of the batch's items, exact when every item counts equally in the model's mean (no ignored tokens).
Dropout draws its masks slice by slice, so with dropout on the masks (not the expectation) differ from the
full batch's. A script that owns its loop gets the same effect from its own accumulation setting (HF
``gradient_accumulation_steps``, nanoGPT ``gradient_accumulation_steps``): a plan says so instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import MemprofError
from ..training import CallArgs, autocast, call_model, default_step, find_loss

__all__ = ["microbatched", "split_batch", "MicrobatchError"]

_IGNORE = -100  # Hugging Face's ignored label


class MicrobatchError(MemprofError):
    """The batch cannot be sliced into the requested number of micro-batches."""


def _batch_size(batch) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, CallArgs):
        return _batch_size((batch.args, batch.kwargs))
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for x in batch:
            n = _batch_size(x)
            if n is not None:
                return n
    return None


def _split(x, n: int, k: int):
    """``x`` as ``k`` slices: tensors whose first dimension is the batch's are sliced, the rest repeated."""
    if isinstance(x, torch.Tensor):
        if x.dim() and x.shape[0] == n:
            return list(torch.tensor_split(x, k))
        return [x] * k
    if isinstance(x, CallArgs):
        args, kwargs = _split(x.args, n, k), _split(x.kwargs, n, k)
        return [CallArgs(a, kw) for a, kw in zip(args, kwargs)]
    if isinstance(x, Mapping):  # a plain dict per slice: the model is called with **slice
        cols = {key: _split(v, n, k) for key, v in x.items()}
        return [{key: cols[key][i] for key in x} for i in range(k)]
    if isinstance(x, (tuple, list)):
        cols = [_split(v, n, k) for v in x]
        return [type(x)(c[i] for c in cols) for i in range(k)]
    return [x] * k


def split_batch(batch, k: int) -> list:
    """The batch as ``k`` micro-batches (views of its tensors along the first dimension)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MicrobatchError(f"the number of micro-batches must be a positive integer, got {k!r}")
    n = _batch_size(batch)
    if n is None:
        raise MicrobatchError("the batch holds no tensor with a batch dimension to slice")
    if n < k:
        raise MicrobatchError(f"a batch of {n} cannot be sliced into {k} micro-batches")
    return _split(batch, n, k)


def _labels(batch):
    if isinstance(batch, CallArgs):
        batch = batch.kwargs
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
            return labels
    return None


def _predicted_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens a causal LM's loss counts: HF shifts the labels by one and ignores -100."""
    return (labels[..., 1:] != _IGNORE).sum()


def _with_items(batch, items):
    if isinstance(batch, CallArgs):
        return CallArgs(batch.args, {**batch.kwargs, "num_items_in_batch": items})
    return {**batch, "num_items_in_batch": items}


def microbatched(k: int):
    """A training step that accumulates gradients over ``k`` micro-batches (see the module docstring)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MicrobatchError(f"the number of micro-batches must be a positive integer, got {k!r}")

    def step(model, batch, optimizer, precision: str = "fp32", scaler=None, device_type: str = "cpu") -> str:
        if k == 1:
            return default_step(model, batch, optimizer, precision, scaler, device_type)
        parts = split_batch(batch, k)
        labels = _labels(batch)
        items = _predicted_tokens(labels) if labels is not None else None
        n = _batch_size(batch)
        which = ""
        for part in parts:
            with autocast(precision, device_type):
                if items is not None:
                    output = call_model(model, _with_items(part, items))
                    loss, which = find_loss(output)
                else:
                    output = call_model(model, part)
                    loss, which = find_loss(output)
                    loss = loss * (_batch_size(part) / n)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            del output, loss
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return f"{which}, over {k} micro-batches"

    step.__qualname__ = step.__name__ = f"microbatched({k})"
    step.micro_batches = k
    return step
