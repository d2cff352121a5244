"""Where the planner gets profiles of configurations it was not given: the estimator, on the same model.

A measured profile fixes one precision and one world size. To weigh other precisions or sharding, the
planner needs the model itself: an :class:`EstimateSource` wraps ``build_model``/``make_batch`` (or a catalog
architecture) and estimates any configuration, caching each one. ``memprof estimate --hf/--model`` records
its source in the profile's assumptions for people to read; ``memprof plan`` rebuilds a catalog model from it
(a name looked up in :data:`memprof.estimation.CATALOG`: data, not code). A profile is a data file that people
share: a source naming a factory (``factory:PKG.MOD:NAME:...``) is never imported or called; the user names the
model again on the command line.

A source with a ``cache_key`` (a catalog architecture at a batch shape: nothing user code can change) shares
its estimates with every other source of the same key, optimizer, device, description and default step in
the process, so that later planner calls on the same model reuse them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MemprofError
from .finetune import finetuned_source
from .prefetch import prefetch
from .repeated import estimate

__all__ = ["EstimateSource", "SourceNotRebuilt", "source_from_profile", "describe_hf", "describe_factory"]


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
        key = (precision, sharding, world_size, shard_group_size, offload)
        if not self.has(*key):
            self.store(key, self._estimate(*key))
        return self._cache[key]

    def has(self, precision, sharding, world_size, shard_group_size, offload) -> bool:
        """Whether this configuration's estimate is made (here or by another source of the same key)."""
        key = (precision, sharding, world_size, shard_group_size, offload)
        shared = self._shared_key(key)
        if shared is not None and shared in _SHARED:
            self._cache.setdefault(key, _SHARED[shared])
        return key in self._cache

    def store(self, key: tuple, prof) -> None:
        """Keep ``prof`` as the estimate of configuration ``key`` (the arguments of :meth:`profile`)."""
        self._cache[key] = prof
        shared = self._shared_key(key)
        if shared is not None:
            if len(_SHARED) >= _SHARED_LIMIT:
                _SHARED.pop(next(iter(_SHARED)))
            _SHARED[shared] = prof

    def prefetch(self, keys: list[tuple]) -> int:
        """Estimate several configurations ahead, in worker processes where that is safe
        (:mod:`memprof.estimation.prefetch`); returns how many were made there."""

        return prefetch(self, keys)

    def derived(self, transform: Callable | None, tag: str, step: Callable | None = None) -> EstimateSource:
        """The same model with ``transform(model)`` applied after it is built (a lever applied in code, e.g.
        loss-head chunking) and/or its step replaced by ``step(self.step)`` (a wrapper of the step, e.g.
        micro-batches; given None for the default step), estimated and cached apart; ``tag`` names the change
        in the description and the shared cache key."""
        build = self.build_model
        return dataclasses.replace(self, build_model=(lambda: transform(build())) if transform else build,
                                   step=step(self.step) if step is not None else self.step,
                                   description=f"{self.description} ({tag})" if self.description else tag,
                                   cache_key=f"{self.cache_key}|{tag}" if self.cache_key else None, _cache={})

    def _shared_key(self, key: tuple):
        if self.cache_key is None or self.step is not None:
            return None
        return (self.cache_key, self.optimizer, self.device, str(self.device_memory), self.description, key)

    def _estimate(self, precision, sharding, world_size, shard_group_size, offload):

        return estimate(
            self.build_model, self.make_batch, step=self.step, optimizer=self.optimizer, precision=precision,
            device=self.device, world_size=world_size if sharding != "none" else 1,
            sharding=sharding if sharding != "none" else None, shard_group_size=shard_group_size,
            device_memory=self.device_memory, description=self.description, offload=offload)


_SHARED: dict = {}  # estimates of catalog configurations, shared by sources with the same cache_key
_SHARED_LIMIT = 256


def describe_hf(name: str, batch_size: int, seq_len: int | None) -> str:
    return f"hf:{name}:batch={batch_size}:seq={seq_len or ''}"


def describe_factory(model_spec: str, batch_spec: str, batch_size: int, seq_len: int | None) -> str:
    return f"factory:{model_spec}:{batch_spec}:batch={batch_size}:seq={seq_len or ''}"


class SourceNotRebuilt(MemprofError):
    """The profile names a model memprof will not rebuild from a file (a factory: that would run its code)."""


def source_from_profile(prof, device_memory=None) -> EstimateSource | None:
    """Rebuild a catalog model recorded by ``memprof estimate`` (assumption ``source``), or None.

    Raises :class:`SourceNotRebuilt` for a factory source: nothing named in a file is imported.
    """
    text = prof.assumptions.get("source")
    if not text:
        return None

    kind, _, rest = text.partition(":")
    parts = dict(p.split("=", 1) for p in rest.split(":") if "=" in p)
    try:
        batch = int(parts.get("batch", 1))
        seq = int(parts["seq"]) if parts.get("seq") else None
    except ValueError:
        raise MemprofError(f"the profile's model source {text!r} has a batch size or sequence length that is "
                           "not an integer") from None
    optimizer = prof.assumptions.get("optimizer", "adamw")
    device = "cpu" if prof.environment.device == "cpu" else "cuda"
    if kind == "hf":
        from .catalog import get_architecture

        arch = get_architecture(rest.split(":")[0])
        build, make, step = finetuned_source(arch.build_model, lambda b: arch.make_batch(b, seq), batch, parts)
        # the description (the recorded source, fine-tuning method included) is part of the shared key
        return EstimateSource(build, make, optimizer, device, device_memory, step=step, description=text,
                              cache_key=describe_hf(arch.name, batch, seq))
    if kind == "factory":
        names = rest.split(":")
        model = ":".join(names[:2]) if len(names) >= 2 else rest
        batch_fn = ":".join(names[2:4]) if len(names) >= 4 else "?"
        raise SourceNotRebuilt(
            f"the profile was estimated from the factory {model!r}; memprof never imports code named in a file: "
            f"name the model on the command line (--model {model} --batch {batch_fn} --batch-size {batch}"
            + (f" --seq-len {seq}" if seq else "") + ")")
    raise MemprofError(f"unknown model source {text!r} in the profile")
