"""Step-time model for the levers the checkpoint solver does not price: precision and sharding.

* Recomputation is priced by the solver from the profile (a unit's forward time, or its recomputed ops').
* Precision: the step time of another precision is the base step time scaled by the ratio of the
  estimator's modelled (roofline) step times of the two precisions; a measured step time for a precision
  (from a profile of it) replaces the model.
* Communication: per step and rank, bytes moved by each collective over a link bandwidth, of which the part
  not hidden behind compute is exposed: ``exposed = max(0, comm - overlap * compute)``.

      none (DDP)       all-reduce of grads: 2 (N-1)/N x grad bytes
      full             all-gather params in forward and again in backward, reduce-scatter grads:
                       (2 x param + grad) (N-1)/N bytes
      shard-grad-op    one all-gather (kept from forward to backward) and the reduce-scatter
      hybrid           full sharding inside groups of G (intra-node link) plus an all-reduce of the
                       sharded grads across the N/G groups (inter-node link)

Link defaults are bus bandwidths as NCCL reports them for common interconnects; override with
``bandwidth_gbs``. These are documented assumptions, written into every plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MemprofError

__all__ = ["LINKS", "OVERLAP", "CommModel", "comm_ms"]

LINKS = {
    "nvlink": 350.0,  # GB/s, NVLink 4 (H100 SXM) all-gather/reduce-scatter bus bandwidth within a node
    "pcie": 20.0,  # GB/s, PCIe 4 x16 through the host
    "infiniband": 45.0,  # GB/s, one 400 Gb/s NDR port per GPU across nodes
}
OVERLAP = 0.8  # share of compute time that collectives can hide behind (FSDP prefetching)


@dataclass(frozen=True)
class CommModel:
    intra_link: str = "nvlink"
    inter_link: str = "infiniband"
    gpus_per_node: int = 8
    bandwidth_gbs: float | None = None  # overrides both links when given
    overlap: float = OVERLAP

    def __post_init__(self) -> None:
        for link in (self.intra_link, self.inter_link):
            if link not in LINKS:
                raise MemprofError(f"unknown link {link!r}; choose one of {', '.join(LINKS)}")
        if self.bandwidth_gbs is not None and self.bandwidth_gbs <= 0:
            raise MemprofError(f"bandwidth must be positive, got {self.bandwidth_gbs}")

    def bandwidth(self, group: int) -> float:
        if self.bandwidth_gbs is not None:
            return self.bandwidth_gbs * 1e9
        return LINKS[self.intra_link if group <= self.gpus_per_node else self.inter_link] * 1e9

    def describe(self) -> str:
        if self.bandwidth_gbs is not None:
            return f"{self.bandwidth_gbs:g} GB/s links, {self.overlap:.0%} of compute overlaps communication"
        return (f"{self.intra_link} {LINKS[self.intra_link]:g} GB/s within {self.gpus_per_node}-GPU nodes, "
                f"{self.inter_link} {LINKS[self.inter_link]:g} GB/s across; {self.overlap:.0%} of compute "
                "overlaps communication")


def comm_ms(strategy: str, world_size: int, param_bytes: int, grad_bytes: int, compute_ms: float,
            model: CommModel, shard_group_size: int | None = None) -> float:
    """Exposed communication time (ms) per step and rank. ``param_bytes``/``grad_bytes`` are the full,
    unsharded sizes in the dtypes that travel (the compute dtype for params, the reduce dtype for grads)."""
    n = world_size
    if n <= 1:
        return 0.0
    frac = (n - 1) / n
    if strategy == "none":
        seconds = 2 * frac * grad_bytes / model.bandwidth(n)
    elif strategy == "full":
        seconds = (2 * param_bytes + grad_bytes) * frac / model.bandwidth(n)
    elif strategy == "shard-grad-op":
        seconds = (param_bytes + grad_bytes) * frac / model.bandwidth(n)
    elif strategy == "hybrid":
        g = shard_group_size or n
        inner = (2 * param_bytes + grad_bytes) * (g - 1) / g / model.bandwidth(g)
        replicas = n // g
        outer = 2 * (replicas - 1) / replicas * grad_bytes / g / model.bandwidth(n) if replicas > 1 else 0.0
        seconds = inner + outer
    else:
        raise MemprofError(f"unknown sharding {strategy!r}")
    return max(0.0, seconds * 1e3 - model.overlap * compute_ms)
