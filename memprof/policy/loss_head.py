"""Loss-head chunking: the output projection and cross-entropy computed a chunk of tokens at a time.

On a language model the head's logits (tokens × vocab), their float copy under autocast, the
log-softmax and the logits' gradient are often the largest tensors of the step. ``chunk_loss_head(model)``
replaces the head's ``forward`` (an instance attribute over the class's method, as checkpointing does) by
one that returns a *deferred* logits tensor: a 1-element placeholder expanded to the logits' shape that
remembers the head's input, weight and bias and the autocast and grad mode of the call. When
``F.cross_entropy`` (the functional or ``nn.CrossEntropyLoss``, called inside the model's forward as
nanoGPT and Hugging Face causal LMs do, or by the training loop) receives it, possibly after ``.float()``
and a ``.view(-1, vocab)``, the loss is computed chunk by chunk by an autograd function: the loss is the
step's last op, so each chunk's gradients are computed with its loss and kept until backward scales them
(Liger's fused linear cross-entropy does the same: no recomputation), or with ``recompute=True`` each
chunk's logits are recomputed in backward (one more head matmul; the gradients of the head's weight and
input are not held from the loss to backward). The full logits and their gradient never exist at once:
about ``chunk × vocab`` elements do.

Any other use of the deferred logits (sampling, metrics, ``repr``) materialises them: the head runs as
it would have, under the recorded autocast and grad mode, once per placeholder, and the handle counts it
in ``materialised``; the step is then correct but saves nothing, which is how a plan learns that the
caller needs the full logits (the lever is not applicable there).

Known limits: ``cross_entropy`` with ``weight=`` or ``label_smoothing`` materialises; double backward is
not supported; the head must be an ``nn.Linear`` (found as an HF model's output embeddings, a module
named ``lm_head``, or given by name).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._C import DisableTorchFunctionSubclass

from ..errors import MemprofError
from ..tracking.forward_grads import grads_in_forward
from . import overrides

__all__ = ["chunk_loss_head", "LossHeadHandle", "LossHeadError", "find_head", "DEFAULT_CHUNK_TOKENS",
           "MIN_CHUNK_TOKENS", "chunk_tokens_for"]

DEFAULT_CHUNK_TOKENS = 1024


MIN_CHUNK_TOKENS = 64  # below this the head's matmuls get too small to run at speed


def chunk_tokens_for(prof) -> int:
    """The chunk for a step like ``prof``'s: :data:`DEFAULT_CHUNK_TOKENS`, halved while the step's tokens (its
    loss head's logits rows, :func:`memprof.peak_words.loss_head`) are fewer than four chunks, not below
    :data:`MIN_CHUNK_TOKENS`; a chunk that holds the whole step's logits saves little (nanoGPT at 4 x 256
    tokens: a 1024-token chunk measured 79% of the plain peak, a 256-token chunk 36%)."""
    import math

    from ..peak_words import loss_head

    chunk = DEFAULT_CHUNK_TOKENS
    head = loss_head(prof, min_share=0.0) if prof is not None else None
    if head is None:
        return chunk
    tokens = math.prod(head.logits_shape[:-1])
    while chunk > MIN_CHUNK_TOKENS and 4 * chunk > tokens:
        chunk //= 2
    return chunk


class LossHeadError(MemprofError):
    """The model has no head this lever can chunk, or it is chunked already."""


def find_head(model: nn.Module, head: str | None = None) -> tuple[str, nn.Linear]:
    """(FQN, module) of the model's output projection: ``head`` if given, else an HF model's output
    embeddings, else the module named ``lm_head``."""
    named = dict(model.named_modules())
    if head is None:
        get = getattr(model, "get_output_embeddings", None)
        found = get() if callable(get) else None
        if found is not None:
            head = next((n for n, m in named.items() if m is found), None)
        if head is None:
            head = next((n for n in named if n == "lm_head" or n.endswith(".lm_head")), None)
        if head is None:
            raise LossHeadError("no output head found (no get_output_embeddings() and no module named "
                                "'lm_head'): name it with head=FQN")
    module = named.get(head)
    if module is None:
        raise LossHeadError(f"the model has no module {head!r}")
    if not isinstance(module, nn.Linear):
        raise LossHeadError(f"{head!r} is a {type(module).__name__}; loss-head chunking needs an nn.Linear head")
    return head, module


class _Source:
    """One head call: its input, parameters and the modes it ran under; materialises the logits once."""

    __slots__ = ("hidden", "weight", "bias", "autocast", "grad", "handle", "_logits")

    def __init__(self, hidden, weight, bias, handle):
        self.hidden, self.weight, self.bias, self.handle = hidden, weight, bias, handle
        device_type = hidden.device.type
        self.autocast = (device_type, torch.is_autocast_enabled(device_type),
                         torch.get_autocast_dtype(device_type))
        self.grad = torch.is_grad_enabled()
        self._logits = None

    def linear(self, hidden):
        device_type, enabled, dtype = self.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return F.linear(hidden, self.weight, self.bias)

    def out_dtype(self) -> torch.dtype:
        device_type, enabled, dtype = self.autocast
        return dtype if enabled and self.hidden.dtype.is_floating_point else self.hidden.dtype

    def logits(self):
        if self._logits is None:
            self.handle.materialised += 1
            with torch.set_grad_enabled(self.grad):
                self._logits = self.linear(self.hidden)
        return self._logits


# Calls answered from the placeholder's metadata (shape, dtype, device, strides): they neither need the
# values nor make the logits exist. ``requires_grad`` answers False (the placeholder is in no graph).
_METADATA = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.element_size,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.get_device,
    torch.Tensor.__len__, torch.Tensor.stride, torch.Tensor.is_contiguous, torch.Tensor.nbytes.__get__,
}
_METADATA_ATTRS = ("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_meta", "layout",
                   "is_sparse", "is_quantized", "is_nested", "grad_fn", "is_leaf", "itemsize")
_METADATA |= {getattr(torch.Tensor, a).__get__ for a in _METADATA_ATTRS if hasattr(torch.Tensor, a)}


class DeferredLogits(torch.Tensor):
    """Logits not computed yet: see the module docstring. ``shape``/``dtype`` are the real ones."""

    _source: _Source
    _view: tuple[int, ...]

    @staticmethod
    def __new__(cls, source: _Source, shape: tuple[int, ...], dtype: torch.dtype):
        # A wrapper subclass: shape, dtype and device without storage, under fake tensors as on real ones.
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=source.hidden.device,
                                                requires_grad=False)
        t._source = source
        t._view = tuple(shape)
        return t

    def __tensor_flatten__(self):
        return [], (self._source, self._view, self.dtype)  # no inner tensors: it holds no memory of its own

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        source, view, dtype = ctx
        return DeferredLogits(source, view, dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by ATen calls made below torch functions (every torch function is answered above):
        # they get the real logits, without autograd (dispatch runs below it).
        args, kwargs = _materialise((args, kwargs or {}))
        return func(*args, **kwargs)

    def __init__(self, *args, **kwargs):
        pass

    def real(self) -> torch.Tensor:
        """The logits this stands for, computed (once per head call) as the head would have."""
        logits = self._source.logits()
        if logits.dtype != self.dtype:
            logits = logits.to(self.dtype)
        return logits if tuple(logits.shape) == self._view else logits.reshape(self._view)

    def _like(self, shape=None, dtype=None) -> DeferredLogits:
        return DeferredLogits(self._source, tuple(self._view if shape is None else shape),
                              self.dtype if dtype is None else dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if args and isinstance(args[0], DeferredLogits):
            done = _deferred_op(func, args[0], args[1:], kwargs)
            if done is not NotImplemented:
                return done
        if func is F.cross_entropy:
            done = _chunked_cross_entropy(*args, **kwargs)
            if done is not NotImplemented:
                return done
        args, kwargs = _materialise((args, kwargs))
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _materialise(tree):
    if isinstance(tree, DeferredLogits):
        return tree.real()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_materialise(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _materialise(v) for k, v in tree.items()}
    return tree


def _shape_arg(args) -> tuple[int, ...] | None:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        args = tuple(args[0])
    if all(isinstance(a, int) for a in args):
        return tuple(args)
    return None


def _deferred_op(func, t: DeferredLogits, args, kwargs):
    """The logits-preserving calls a loss makes before cross-entropy: float/to(dtype), view/reshape that
    keep the vocabulary as the last dimension, contiguous. Anything else: NotImplemented."""
    vocab = t._view[-1]
    if func in (torch.Tensor.view, torch.Tensor.reshape) and not kwargs:
        shape = _shape_arg(args)
        if shape is None or not shape or shape[-1] not in (vocab, -1):
            return NotImplemented
        numel = t.numel()
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape = tuple(numel // known if s == -1 else s for s in shape)
        if shape[-1] != vocab or known == 0 or int(torch.Size(shape).numel()) != numel:
            return NotImplemented
        return t._like(shape=shape)
    if func is torch.Tensor.contiguous and not args and not kwargs:
        return t
    if func is torch.Tensor.float and not args and not kwargs:
        return t._like(dtype=torch.float32)
    if func is torch.Tensor.to:
        dtype = kwargs.get("dtype", args[0] if len(args) == 1 else None)
        extra = {k: v for k, v in kwargs.items() if k != "dtype"}
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and not extra and len(args) <= 1:
            return t._like(dtype=dtype)
    return NotImplemented


def _chunked_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                           reduction="mean", label_smoothing=0.0):
    if not isinstance(input, DeferredLogits) or isinstance(target, DeferredLogits):
        return NotImplemented
    if weight is not None or label_smoothing or size_average is not None or reduce is not None:
        return NotImplemented
    if input.dim() != 2 or target.dim() != 1 or target.is_floating_point() or reduction not in ("mean", "sum"):
        return NotImplemented
    src = input._source
    hidden = src.hidden.reshape(-1, src.hidden.shape[-1])
    if hidden.shape[0] != input.shape[0]:
        return NotImplemented
    target = target.to(hidden.device)
    device_type = hidden.device.type
    ce_autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    chunk = src.handle.chunk_tokens
    loss = _ChunkedCrossEntropy.apply(hidden, src.weight, src.bias, target, src, input.dtype, ce_autocast,
                                      ignore_index, chunk)
    if reduction == "mean":
        loss = loss / (target != ignore_index).sum()
    src.handle.chunked += 1
    return loss


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``linear(hidden)`` against ``target``, ``chunk`` rows at a time, so that only
    one chunk's logits (and their gradient) exist at a time.

    The loss is the step's last op, so its gradients are known up to the scalar backward brings: by
    default they are computed in forward, chunk by chunk, and kept until backward scales them (as Liger's
    fused linear cross-entropy does: no recomputation; the head's weight gradient and the input's gradient
    live from the loss to backward). With ``recompute`` forward computes the loss alone and backward
    recomputes each chunk's logits (least memory, one more head matmul)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, src, logits_dtype, ce_autocast, ignore_index, chunk):
        needs = ctx.needs_input_grad[:3]
        ctx.src, ctx.logits_dtype, ctx.ce_autocast = src, logits_dtype, ce_autocast
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        ctx.bias_given = bias is not None
        ctx.grads = None
        if any(needs) and not src.handle.recompute:
            total, ctx.grads = _chunked_grads(hidden, target, src, ctx, None)
            return total
        total = None
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk):
                part = _chunk_loss(hidden[s:s + chunk], target[s:s + chunk], src, logits_dtype, ce_autocast,
                                   ignore_index)
                total = part if total is None else total + part
        ctx.save_for_backward(hidden, target)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss)
        else:
            hidden, target = ctx.saved_tensors
            _, grads = _chunked_grads(hidden, target, ctx.src, ctx, grad_loss)
        return (*grads, None, None, None, None, None, None)


def _chunked_grads(hidden, target, src, ctx, grad_loss):
    """(summed loss, (grad of hidden, of weight, of bias)) chunk by chunk, scaled by ``grad_loss`` if given."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = torch.empty_like(hidden) if need_h else None
    weight = src.weight.detach().requires_grad_(need_w)
    bias = src.bias.detach().requires_grad_(need_b) if ctx.bias_given else None
    leaf = _Leaves(src, weight, bias)
    total = None
    for s in range(0, hidden.shape[0], ctx.chunk):
        h = hidden[s:s + ctx.chunk].detach().requires_grad_(need_h)
        with torch.enable_grad():
            part = _chunk_loss(h, target[s:s + ctx.chunk], leaf, ctx.logits_dtype, ctx.ce_autocast,
                               ctx.ignore_index)
        inputs = [x for x, need in ((h, need_h), (weight, need_w), (bias, need_b)) if need and x is not None]
        with grads_in_forward() if grad_loss is None else contextlib.nullcontext():  # forward: not a backward phase
            grads = torch.autograd.grad(part, inputs, grad_loss)
        part = part.detach()
        total = part if total is None else total + part
        it = iter(grads)
        if need_h:
            grad_h[s:s + ctx.chunk] = next(it)
        if need_w:
            g = next(it)
            if weight.grad is None:
                weight.grad = g
            else:
                weight.grad += g
        if need_b and bias is not None:
            g = next(it)
            bias.grad = g if bias.grad is None else bias.grad + g
    return total, (grad_h, weight.grad if need_w else None, bias.grad if need_b and bias is not None else None)


class _Leaves:
    """A :class:`_Source` stand-in whose weight and bias are backward's detached leaves."""

    def __init__(self, src: _Source, weight, bias):
        self.autocast, self.weight, self.bias = src.autocast, weight, bias

    linear = _Source.linear


def _chunk_loss(h, t, src, logits_dtype, ce_autocast, ignore_index):
    logits = src.linear(h)
    if logits.dtype != logits_dtype:
        logits = logits.to(logits_dtype)
    enabled, dtype = ce_autocast
    with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
        return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")


class LossHeadHandle(overrides.Undoable):
    """What :func:`chunk_loss_head` changed; ``remove()`` (or leaving ``with``) restores the head's forward.

    ``chunked`` counts losses computed in chunks, ``materialised`` the head calls whose full logits a caller
    needed (the lever saved nothing there)."""

    def __init__(self, model: nn.Module, fqn: str, head: nn.Linear, chunk_tokens: int, recompute: bool = False):
        self.model, self.head_name, self.head, self.chunk_tokens = model, fqn, head, chunk_tokens
        self.recompute = recompute
        self.chunked = 0
        self.materialised = 0
        self._removed = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        overrides.pop(self.head, "forward", self)
        del self.head._memprof_loss_head

    def __repr__(self) -> str:
        return (f"LossHeadHandle({self.head_name!r}, chunk_tokens={self.chunk_tokens}, chunked={self.chunked}, "
                f"materialised={self.materialised})")


def chunk_loss_head(model: nn.Module, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    head: str | None = None, recompute: bool = False) -> LossHeadHandle:
    """Make the model's head return deferred logits that ``cross_entropy`` consumes in chunks of
    ``chunk_tokens`` tokens (see the module docstring): gradients computed in the loss's forward, or with
    ``recompute`` recomputed in backward. Undo with ``handle.remove()``."""
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise LossHeadError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    fqn, module = find_head(model, head)
    if getattr(module, "_memprof_loss_head", None) is not None:
        raise LossHeadError(f"{fqn!r} is chunked already: remove the first handle before applying again")
    handle = LossHeadHandle(model, fqn, module, chunk_tokens, bool(recompute))
    original = module.forward

    def forward(x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return original(x)
        src = _Source(x, module.weight, module.bias, handle)
        return DeferredLogits(src, (*x.shape[:-1], module.out_features), src.out_dtype())

    overrides.push(module, "forward", handle, forward)
    module._memprof_loss_head = handle
    return handle
