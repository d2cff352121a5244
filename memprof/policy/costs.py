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

* CPU offload (FSDP2 ``CPUOffloadPolicy``), on top of that strategy's collectives, per step and rank:

      host link        a host-to-device copy of the rank's parameter shard for every all-gather (2 per step
                       for full and hybrid, 1 for shard-grad-op) and a device-to-host copy of its gradient
                       shard: (gathers + 1) x param bytes / shard group size, over the host link; hidden
                       behind compute like the collectives: exposed = max(0, comm + host - overlap * compute)
                       minus what the collectives alone expose
      optimizer step   on the CPU, not overlapped: Adam/AdamW read and write about every host byte of the
                       rank (its parameter shard, gradients and the two states) once: 2 x host bytes over
                       the rank's share of the host's memory bandwidth (the ranks of a node share it)

Link defaults are bus bandwidths as NCCL reports them for common interconnects; override with
``bandwidth_gbs``. The host link defaults to PCIe 5 x16 as H100 hosts have it (``host_link_gbs``); the host's
memory bandwidth for the CPU optimizer step defaults to what a multi-threaded CPU Adam reaches on a
two-socket DDR5 GPU server (``host_bandwidth_gbs``, about a third of its ~600 GB/s peak); give the training
host's when known. These are documented assumptions, written into every plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MemprofError

__all__ = ["LINKS", "OVERLAP", "HOST_LINK_GBS", "HOST_MEMORY_GBS", "CommModel", "collective_ms", "exposed_ms", "comm_ms",
           "host_transfer_ms", "cpu_optimizer_ms", "offload_ms"]

LINKS = {
    "nvlink": 350.0,  # GB/s, NVLink 4 (H100 SXM) all-gather/reduce-scatter bus bandwidth within a node
    "pcie": 20.0,  # GB/s, PCIe 4 x16 through the host
    "infiniband": 45.0,  # GB/s, one 400 Gb/s NDR port per GPU across nodes
}
OVERLAP = 0.8  # share of compute time that collectives can hide behind (FSDP prefetching)
HOST_LINK_GBS = 50.0  # GB/s each way, PCIe 5 x16 (64 GB/s raw) between an H100 and its host, pinned copies
HOST_MEMORY_GBS = 200.0  # GB/s a CPU Adam step streams on a two-socket DDR5 GPU server (~600 GB/s peak)


@dataclass(frozen=True)
class CommModel:
    intra_link: str = "nvlink"
    inter_link: str = "infiniband"
    gpus_per_node: int = 8
    bandwidth_gbs: float | None = None  # overrides both links when given
    overlap: float = OVERLAP
    host_link_gbs: float = HOST_LINK_GBS  # device <-> host copies of CPU offload
    host_bandwidth_gbs: float = HOST_MEMORY_GBS  # host memory bandwidth for the CPU optimizer step

    def __post_init__(self) -> None:
        for link in (self.intra_link, self.inter_link):
            if link not in LINKS:
                raise MemprofError(f"unknown link {link!r}; choose one of {', '.join(LINKS)}")
        for name in ("bandwidth_gbs", "host_bandwidth_gbs"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise MemprofError(f"{name} must be positive, got {value}")
        if self.host_link_gbs <= 0:
            raise MemprofError(f"host_link_gbs must be positive, got {self.host_link_gbs}")

    def bandwidth(self, group: int) -> float:
        if self.bandwidth_gbs is not None:
            return self.bandwidth_gbs * 1e9
        return LINKS[self.intra_link if group <= self.gpus_per_node else self.inter_link] * 1e9

    def host_bandwidth(self) -> float:
        """Bytes/s of host memory bandwidth for the CPU optimizer step."""
        return self.host_bandwidth_gbs * 1e9

    def ranks_per_host(self, world_size: int) -> int:
        return max(1, min(world_size, self.gpus_per_node))

    def describe_offload(self) -> str:
        source = "default: a two-socket DDR5 GPU server" if self.host_bandwidth_gbs == HOST_MEMORY_GBS else "given"
        return (f"host link {self.host_link_gbs:g} GB/s each way (PCIe 5 x16) for the shards' host-to-device "
                f"copies and the gradients' device-to-host copies, hidden behind compute like communication; "
                f"optimizer step on the CPU, not overlapped: 2 x host bytes per rank at "
                f"{self.host_bandwidth() / 1e9:.1f} GB/s host memory bandwidth ({source}), shared by the "
                f"ranks of a node")

    def describe(self) -> str:
        if self.bandwidth_gbs is not None:
            return f"{self.bandwidth_gbs:g} GB/s links, {self.overlap:.0%} of compute overlaps communication"
        return (f"{self.intra_link} {LINKS[self.intra_link]:g} GB/s within {self.gpus_per_node}-GPU nodes, "
                f"{self.inter_link} {LINKS[self.inter_link]:g} GB/s across; {self.overlap:.0%} of compute "
                "overlaps communication")


def collective_ms(strategy: str, world_size: int, param_bytes: int, grad_bytes: int, model: CommModel,
                  shard_group_size: int | None = None) -> float:
    """Time (ms) per step and rank the strategy's collectives take, before any overlap. ``param_bytes`` and
    ``grad_bytes`` are the full, unsharded sizes in the dtypes that travel (the compute dtype for params, the
    reduce dtype for grads)."""
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
    return seconds * 1e3


def exposed_ms(transfer_ms: float, compute_ms: float, model: CommModel) -> float:
    """The part of ``transfer_ms`` not hidden behind ``compute_ms`` of compute."""
    return max(0.0, transfer_ms - model.overlap * compute_ms)


def comm_ms(strategy: str, world_size: int, param_bytes: int, grad_bytes: int, compute_ms: float,
            model: CommModel, shard_group_size: int | None = None) -> float:
    """Exposed communication time (ms) per step and rank (see :func:`collective_ms` for the sizes)."""
    return exposed_ms(collective_ms(strategy, world_size, param_bytes, grad_bytes, model, shard_group_size),
                      compute_ms, model)


def host_transfer_ms(strategy: str, world_size: int, stored_param_bytes: int, model: CommModel,
                     shard_group_size: int | None = None) -> float:
    """Time (ms) per step and rank of CPU offload's copies over the host link, before any overlap.
    ``stored_param_bytes``: the whole model's parameters in the dtype they are kept in (the gradients come
    back to the host in that dtype too)."""
    if strategy == "none":
        raise MemprofError("CPU offload needs an FSDP sharding strategy")
    group = (shard_group_size or world_size) if strategy == "hybrid" else world_size
    gathers = 1 if strategy == "shard-grad-op" else 2
    return (gathers + 1) * stored_param_bytes / group / (model.host_link_gbs * 1e9) * 1e3


def cpu_optimizer_ms(host_bytes: int, world_size: int, model: CommModel) -> float:
    """The optimizer step on the CPU (ms), not overlapped: ``host_bytes`` (the rank's parameter shard,
    gradients and optimizer state on the host) read and written once, at the rank's share of host memory
    bandwidth."""
    return 2 * host_bytes / (model.host_bandwidth() / model.ranks_per_host(world_size)) * 1e3


def offload_ms(strategy: str, world_size: int, param_bytes: int, grad_bytes: int, stored_param_bytes: int,
               host_bytes: int, compute_ms: float, model: CommModel,
               shard_group_size: int | None = None) -> tuple[float, float]:
    """Step time (ms) CPU offload adds to the strategy: (host copies not hidden by compute beyond what its
    collectives already expose, the optimizer step on the CPU)."""
    comm = collective_ms(strategy, world_size, param_bytes, grad_bytes, model, shard_group_size)
    host = host_transfer_ms(strategy, world_size, stored_param_bytes, model, shard_group_size)
    copies = exposed_ms(comm + host, compute_ms, model) - exposed_ms(comm, compute_ms, model)
    return copies, cpu_optimizer_ms(host_bytes, world_size, model)
