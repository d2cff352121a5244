"""Where the planner gets profiles of configurations it was not given: the estimator, on the same model.

A measured profile fixes one precision and one world size. To weigh other precisions or sharding, the
planner needs the model itself: an :class:`EstimateSource` wraps ``build_model``/``make_batch`` (or a catalog
architecture) and estimates any configuration, caching each one. ``memprof estimate --hf/--model`` records
its source in the profile's assumptions, so ``memprof plan`` can rebuild it from the file.

A source with a ``cache_key`` (a catalog architecture at a batch shape: nothing user code can change) shares
its estimates with every other source of the same key, optimizer, device and default step in the process,
so that later planner calls on the same model reuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MemprofError

__all__ = ["EstimateSource", "source_from_profile", "describe_hf", "describe_factory"]


@dataclass
class EstimateSource:
    build_model: Callable
    make_batch: Callable
    optimizer: str = "adamw"
    device: str = "cuda"
    device_memory: object = None
    step: Callable | None = None
    description: str = ""
    cache_key: str | None = None  # shared across sources in this process (see the module's docstring)
    _cache: dict = field(default_factory=dict, repr=False)

    def profile(self, precision: str, sharding: str = "none", world_size: int = 1,
                shard_group_size: int | None = None, offload: bool = False):
        """The estimate of one configuration (cached); ``offload``: FSDP2 CPU offload (needs a strategy)."""
        from ..estimation import estimate

        key = (precision, sharding, world_size, shard_group_size, offload)
        shared = None
        if self.cache_key is not None and self.step is None:
            shared = (self.cache_key, self.optimizer, self.device, str(self.device_memory), self.description, key)
            if shared in _SHARED:
                self._cache.setdefault(key, _SHARED[shared])
        if key not in self._cache:
            self._cache[key] = estimate(
                self.build_model, self.make_batch, step=self.step, optimizer=self.optimizer, precision=precision,
                device=self.device, world_size=world_size if sharding != "none" else 1,
                sharding=sharding if sharding != "none" else None, shard_group_size=shard_group_size,
                device_memory=self.device_memory, description=self.description, offload=offload)
        if shared is not None:
            if len(_SHARED) >= _SHARED_LIMIT:
                _SHARED.pop(next(iter(_SHARED)))
            _SHARED[shared] = self._cache[key]
        return self._cache[key]


_SHARED: dict = {}  # estimates of catalog configurations, shared by sources with the same cache_key
_SHARED_LIMIT = 256


def describe_hf(name: str, batch_size: int, seq_len: int | None) -> str:
    return f"hf:{name}:batch={batch_size}:seq={seq_len or ''}"


def describe_factory(model_spec: str, batch_spec: str, batch_size: int, seq_len: int | None) -> str:
    return f"factory:{model_spec}:{batch_spec}:batch={batch_size}:seq={seq_len or ''}"


def source_from_profile(prof, device_memory=None) -> EstimateSource | None:
    """Rebuild the source recorded by ``memprof estimate`` (assumption ``source``), or None."""
    text = prof.assumptions.get("source")
    if not text:
        return None
    kind, _, rest = text.partition(":")
    parts = dict(p.split("=", 1) for p in rest.split(":") if "=" in p)
    batch = int(parts.get("batch", 1))
    seq = int(parts["seq"]) if parts.get("seq") else None
    optimizer = prof.assumptions.get("optimizer", "adamw")
    device = "cpu" if prof.environment.device == "cpu" else "cuda"
    if kind == "hf":
        from ..estimation import get_architecture

        arch = get_architecture(rest.split(":")[0])
        return EstimateSource(arch.build_model, lambda: arch.make_batch(batch, seq), optimizer, device,
                              device_memory, description=text, cache_key=describe_hf(arch.name, batch, seq))
    if kind == "factory":
        from ..cli.estimate_cmds import _import_attr

        names = rest.split(":")
        build = _import_attr(f"{names[0]}:{names[1]}", "model factory")
        make = _import_attr(f"{names[2]}:{names[3]}", "batch factory")
        return EstimateSource(build, lambda: make(batch, seq), optimizer, device, device_memory, description=text)
    raise MemprofError(f"unknown model source {text!r} in the profile")
