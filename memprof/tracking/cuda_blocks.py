"""How the CUDA caching allocator sizes a request: whole blocks of 512 bytes.

The ledger counts each CUDA storage (real or fake) at this size rather than at ``nbytes()``, so that its
totals agree with ``torch.cuda.memory_stats()["active_bytes.all.peak"]``. Host storages are counted as they
are. Known limits: allocator settings that round further (``roundup_power2_divisions`` in
``PYTORCH_CUDA_ALLOC_CONF``) are not modelled, and memory the allocator reserves around its blocks (whole
segments) is not counted here.
"""

from __future__ import annotations

__all__ = ["CUDA_BLOCK_BYTES", "cuda_block_bytes"]

CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block; every request is a whole number of them


def cuda_block_bytes(nbytes: int) -> int:
    """The bytes the CUDA caching allocator gives a request of ``nbytes``: rounded up to whole blocks (a
    request of 0 bytes takes none)."""
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
