"""Where the planner gets profiles of configurations it was not given: the estimator, on the same model.

A measured profile fixes one precision and one world size. To weigh other precisions or sharding, the
planner needs the model itself: an :class:`EstimateSource` wraps ``build_model``/``make_batch`` (or a catalog
architecture) and estimates any configuration, caching each one. ``memprof estimate --hf/--model`` records
its source in the profile's assumptions, so ``memprof plan`` can rebuild it from the file.
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
    _cache: dict = field(default_factory=dict, repr=False)

    def profile(self, precision: str, sharding: str = "none", world_size: int = 1,
                shard_group_size: int | None = None, offload: bool = False):
        """The estimate of one configuration (cached); ``offload``: FSDP2 CPU offload (needs a strategy)."""
        from ..estimation import estimate

        key = (precision, sharding, world_size, shard_group_size, offload)
        if key not in self._cache:
            self._cache[key] = estimate(
                self.build_model, self.make_batch, step=self.step, optimizer=self.optimizer, precision=precision,
                device=self.device, world_size=world_size if sharding != "none" else 1,
                sharding=sharding if sharding != "none" else None, shard_group_size=shard_group_size,
                device_memory=self.device_memory, description=self.description, offload=offload)
        return self._cache[key]


def describe_hf(name: str, batch_size: int, seq_len: int | None) -> str:
    return f"hf:{name}:batch={batch_size}:seq={seq_len or ''}"


def describe_factory(model_spec: str, batch_spec: str, batch_size: int, seq_len: int | None) -> str:
    return f"factory:{model_spec}:{batch_spec}:batch={batch_size}:seq={seq_len or ''}"


def source_from_profile(prof, device_memory=None) -> EstimateSource | None:
    """Rebuild the source recorded by ``memprof estimate`` (assumption ``source``), or None."""
    text = prof.assumptions.get("source")
    if not text:
        return None
    from ..estimation.finetune import finetuned_source

    kind, _, rest = text.partition(":")
    parts = dict(p.split("=", 1) for p in rest.split(":") if "=" in p)
    batch = int(parts.get("batch", 1))
    seq = int(parts["seq"]) if parts.get("seq") else None
    optimizer = prof.assumptions.get("optimizer", "adamw")
    device = "cpu" if prof.environment.device == "cpu" else "cuda"
    if kind == "hf":
        from ..estimation import get_architecture

        arch = get_architecture(rest.split(":")[0])
        build, make, step = finetuned_source(arch.build_model, lambda b: arch.make_batch(b, seq), batch, parts)
        return EstimateSource(build, make, optimizer, device, device_memory, step=step, description=text)
    if kind == "factory":
        from ..cli.estimate_cmds import _import_attr

        names = rest.split(":")
        build = _import_attr(f"{names[0]}:{names[1]}", "model factory")
        make = _import_attr(f"{names[2]}:{names[3]}", "batch factory")
        build, make_one, step = finetuned_source(build, lambda b: make(b, seq), batch, parts)
        return EstimateSource(build, make_one, optimizer, device, device_memory, step=step, description=text)
    raise MemprofError(f"unknown model source {text!r} in the profile")
