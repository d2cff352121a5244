"""The training-step ingredients memprof varies: precision modes, optimizers, and the default step.

Precision modes (what each implies for memory):

    fp32           parameters, grads and optimizer state in float32
    bf16-autocast  float32 parameters/grads/state; forward ops in bfloat16 under ``torch.autocast``
    fp16-autocast  as bf16-autocast with float16, plus a ``GradScaler`` (loss scaling, inf checks)
    bf16           parameters (hence grads and Adam moments) in bfloat16; no autocast

Optimizers: ``adamw``/``adam`` in the for-loop (``-forloop``), ``-foreach`` and ``-fused`` variants (the plain
name lets PyTorch pick, as a user's code would), and ``sgd`` (momentum 0.9, a momentum buffer per parameter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .errors import MemprofError
from .vocab import OPTIMIZERS, PRECISIONS

__all__ = [
    "PRECISIONS",
    "check_precision",
    "check_optimizer",
    "autocast",
    "make_scaler",
    "make_optimizer",
    "cast_floating",
    "default_step",
    "find_loss",
    "loss_of",
    "call_model",
    "CallArgs",
]



def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise MemprofError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise MemprofError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return name


def autocast(precision: str, device_type: str):
    """The autocast context of a precision mode (a no-op context for fp32 and bf16)."""
    if precision == "bf16-autocast":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16-autocast":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def make_scaler(precision: str, device_type: str):
    """A ``GradScaler`` for fp16-autocast, else ``None``."""
    if precision != "fp16-autocast":
        return None
    return torch.amp.GradScaler(device_type)


def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating-point parameters and buffers to ``dtype`` in place, keeping each Parameter object (so
    tied weights stay tied and existing references stay valid). ``Module.to`` cannot do this for fake tensors.
    """
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in mod._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)
    return model


def make_optimizer(name: str, params, lr: float = 1e-4):
    check_optimizer(name)
    params = list(params)
    family, _, variant = name.partition("-")
    if family == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    cls = torch.optim.AdamW if family == "adamw" else torch.optim.Adam
    kwargs = {}
    if variant == "forloop":
        kwargs["foreach"] = False
    elif variant == "foreach":
        kwargs["foreach"] = True
    elif variant == "fused":
        kwargs["fused"] = True
    return cls(params, lr=lr, **kwargs)


class CallArgs(NamedTuple):
    """A batch that is positional and keyword arguments together: ``model(*args, **kwargs)``."""

    args: tuple
    kwargs: dict


def find_loss(output) -> tuple[torch.Tensor, str]:
    """The loss to backpropagate from a model's output, and which one it is (said in an estimate's assumptions).

    The model's own loss when its output carries one: a ``loss`` attribute or key (Hugging Face outputs), or
    a scalar (0-dim) tensor among the elements of a returned tuple or list (nanoGPT's ``(logits, loss)``),
    the first such; a scalar output is its own loss. Otherwise the sum of the output (of its first tensor),
    as a stand-in with the same backward through the model but none of a real loss head's memory.
    """
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss, "output.loss (the model's own loss)"
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"], "output['loss'] (the model's own loss)"
    if isinstance(output, torch.Tensor):
        if output.dim() == 0:
            return output, "the model's output (a scalar: its own loss)"
        return output.float().sum(), "output.sum() (the model returned no loss)"
    if isinstance(output, (tuple, list)):
        for i, x in enumerate(output):
            if isinstance(x, torch.Tensor) and x.dim() == 0:
                return x, f"the model's own loss (element {i} of its output {type(output).__name__})"
        for i, x in enumerate(output):
            if isinstance(x, torch.Tensor):
                return x.float().sum(), f"output[{i}].sum() (the model returned no loss)"
    if isinstance(output, Mapping):
        for k, x in output.items():
            if isinstance(x, torch.Tensor):
                return x.float().sum(), f"output[{k!r}].sum() (the model returned no loss)"
    raise MemprofError(f"cannot find a loss in the model's output of type {type(output).__name__}; pass step= "
                       "(a function that runs one training step)")


def loss_of(output) -> torch.Tensor:
    """The loss :func:`find_loss` picks from a model's output."""
    return find_loss(output)[0]


def call_model(model, batch):
    if isinstance(batch, CallArgs):
        return model(*batch.args, **batch.kwargs)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_step(model, batch, optimizer, precision: str = "fp32", scaler=None, device_type: str = "cpu") -> str:
    """Forward (under the precision's autocast), the loss (:func:`find_loss`), backward, optimizer step,
    ``zero_grad``. Returns which loss it backpropagated.

    The model's whole output stays referenced until the step ends, as in training scripts that keep it
    (nanoGPT's ``logits, loss = model(X, Y)``, Hugging Face's ``outputs = model(**batch)``): the logits are
    then live through backward, which is where a language model's peak usually is.
    """
    with autocast(precision, device_type):
        output = call_model(model, batch)
        loss, which = find_loss(output)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del output, loss
    return which
