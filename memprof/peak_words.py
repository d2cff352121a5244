"""The peak in words a user acts on: when a language model's loss head holds most of it, say so.

:func:`loss_head` reads a profile's tensors at the peak. The head is the ``Linear`` module whose output at
the peak has the widest last dimension (the vocabulary), at least :data:`MIN_VOCAB` and four times the
widest last dimension of any other activation. Its logits, their float copies and log-softmax, and the
backward's temporaries of the logits' size (their gradients: a recorded backward keeps sizes, not shapes)
are the loss head's share of the peak. When that share is at least ``min_share``, :class:`LossHead` gives
the sentence the report prints and the lever that removes it (:mod:`memprof.policy.loss_head`).

Known limits: a temporary of exactly the logits' byte size that is not theirs would be counted; a head that
is not an ``nn.Linear`` (a tied ``F.linear`` in the root's forward) is not found. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .units import format_bytes

__all__ = ["LossHead", "loss_head", "shape_text", "MIN_VOCAB", "MIN_SHARE"]

MIN_VOCAB = 1024
MIN_SHARE = 0.25
_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class LossHead:
    """The loss head's part of the peak."""

    module: str  # the head's FQN
    logits_shape: tuple[int, ...]
    dtype: str
    logits_bytes: int
    bytes_at_peak: int  # the logits and every tensor at the peak of their width or size
    tensors: int
    peak_bytes: int

    @property
    def share(self) -> float:
        return self.bytes_at_peak / self.peak_bytes if self.peak_bytes else 0.0

    def sentence(self) -> str:
        shape = "×".join(map(str, self.logits_shape))
        more = self.tensors - 1
        others = (f" and {more} more of their width or size (float copies, log-softmax, gradients)"
                  if more else "")
        return (f"the loss head: {self.module}'s logits {shape} {self.dtype} ({format_bytes(self.logits_bytes)})"
                f"{others}, {format_bytes(self.bytes_at_peak)} = {self.share:.0%} of the peak; chunking the "
                "loss head (memprof.policy.loss_head) keeps one chunk of them at a time")


def shape_text(t) -> str:
    """A tensor's shape as the tables print it: ``4×128×64``, ``scalar``, or ``(not recorded)`` for memory a
    recorded backward saw by size only (no dtype either)."""
    return "×".join(map(str, t.shape)) or ("scalar" if t.dtype else "(not recorded)")


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def loss_head(prof, min_share: float = MIN_SHARE) -> LossHead | None:
    """The loss head's share of ``prof``'s peak, or None when no head holds ``min_share`` of it."""
    tensors = prof.peak.tensors
    linear = {name for name, m in prof.modules.items() if m.type == "Linear"}
    acts = [t for t in tensors if t.category == "activation" and t.shape]
    heads = [t for t in acts if t.module in linear]
    if not heads:
        return None
    head = max(heads, key=lambda t: (t.shape[-1], t.bytes))
    vocab = head.shape[-1]
    widest_other = max((t.shape[-1] for t in acts if t.shape[-1] != vocab), default=0)
    if vocab < MIN_VOCAB or vocab < 4 * widest_other:
        return None
    numel = _numel(head.shape)
    sizes = {numel * e for e in set(_ELEMENT.values())}
    counted = [t for t in tensors
               if (t.shape and t.shape[-1] == vocab and _numel(t.shape) == numel)
               or (not t.shape and not t.dtype and any(abs(t.bytes - s) < 512 for s in sizes))]
    share = sum(t.bytes for t in counted)
    found = LossHead(head.module, tuple(head.shape), head.dtype, head.bytes, share, len(counted), prof.peak.bytes)
    return found if found.share >= min_share else None
