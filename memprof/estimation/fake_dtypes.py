"""Fake kernels whose outputs have another dtype than the real CPU kernel's, and their correction.

A fake (meta) kernel decides each output's dtype by its own rules, which can differ from the real kernel's:
``native_layer_norm`` on a bfloat16 input with float32 weight and bias (a LayerNorm reached by a bf16
tensor under CPU autocast, as BERT's masked-LM head is) returns its saved ``mean`` and ``rstd`` in bfloat16
under fake tensors, where the real CPU kernel computes them, and autograd keeps them, in float32. The
estimate is then short by those bytes for as long as backward holds them.

The estimator already runs every op signature once on real CPU tensors to measure its scratch memory;
:class:`OutputDtypes` compares those real outputs with the fake ones and, for a signature where a dtype
differs (same shape), gives every later call of it fake outputs of the real dtype (same shape and strides),
so that memory and every downstream op follow the real run. Nothing is hard-coded per op or per model.

Limits: learned only from signatures the estimator runs for real (inputs up to ``scratch_limit_bytes``, and
not taken from a scratch cache a real run filled); outputs that differ in shape are left as they are.
"""

from __future__ import annotations

import torch

__all__ = ["OutputDtypes"]


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


class OutputDtypes:
    """Per op signature, the outputs whose real dtype differs from the fake kernel's."""

    def __init__(self) -> None:
        self._fixes: dict = {}  # signature -> ((output index, real dtype), ...)

    def learn(self, key, fake_out, real_out) -> None:
        """Compare an op's fake outputs with its real ones (same inputs' shapes) and remember differences.
        ``key`` is the op's signature (the op first); ops that write or alias their inputs are left alone."""
        schema = getattr(key[0], "_schema", None)
        if schema is None or schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return
        fixes = []
        for i, (f, r) in enumerate(zip(_flat(fake_out), _flat(real_out))):
            if (isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor) and f.dtype != r.dtype
                    and f.shape == r.shape):
                fixes.append((i, r.dtype))
        if fixes:
            self._fixes[key] = tuple(fixes)

    def fix(self, key, out):
        """``out`` with the outputs learned to differ replaced by fake tensors of the real dtype."""
        if not self._fixes:
            return out
        fixes = self._fixes.get(key)
        if fixes is None:
            return out
        flat = _flat(out)
        for i, dtype in fixes:
            f = flat[i]
            flat[i] = torch.empty_strided(f.shape, f.stride(), dtype=dtype, device=f.device)
        return flat[0] if isinstance(out, torch.Tensor) else type(out)(flat)

    def __len__(self) -> int:
        return len(self._fixes)
