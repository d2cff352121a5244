"""The profile data model: what the tracker (and the estimator) produce, and what every other part reads.

(Named ``profiles`` rather than ``profile`` because ``memprof.profile`` is the decorator of the public API.)

A :class:`Profile` is a tree of frozen dataclasses. Bytes are ``int``; times are milliseconds (``float``).
``Profile.save(path)`` writes pretty-printed JSON (schema ``memprof.profile/1``) atomically and
``memprof.load(path)`` reads it back to an equal object.

Known limits: mappings are stored as read-only ``MappingProxyType`` views, so profiles compare with ``==``
but are not hashable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .categories import CATEGORIES, PHASES
from .files import atomic_write_text

__all__ = [
    "SCHEMA",
    "sharding_words",
    "TensorInfo",
    "PeakInfo",
    "StepStats",
    "ModuleStats",
    "Sample",
    "DeviceStats",
    "Environment",
    "Profile",
]

SCHEMA = "memprof.profile/1"


def _ro(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


class _Record:
    """Shared ``to_dict``/``from_dict`` for the flat records below (tuples become lists in JSON)."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Mapping):
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        kwargs = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            v = data[f.name]
            if isinstance(v, list):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            elif isinstance(v, dict):
                v = _ro(v)
            kwargs[f.name] = v
        return cls(**kwargs)


@dataclass(frozen=True)
class TensorInfo(_Record):
    """One storage live at the peak: the tensor that created it, what it is, and who made it."""

    bytes: int
    category: str
    module: str  # FQN of the module that made it (owner module for params/grads/state); "" root/outside
    phase: str  # phase in which it was made ("other" for memory found already live)
    shape: tuple[int, ...]
    dtype: str
    device: str
    label: str = ""  # parameter name, "<param>.grad", "<param>:exp_avg", or the op that made it


@dataclass(frozen=True)
class PeakInfo(_Record):
    """The peak explained: how high, when, where, and what was live."""

    bytes: int
    step: int
    phase: str
    module: str
    by_category: Mapping[str, int]
    by_device: Mapping[str, int]
    tensors: tuple[TensorInfo, ...]
    time_ms: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_category", _ro(self.by_category))
        object.__setattr__(self, "by_device", _ro(self.by_device))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["tensors"] = [t.to_dict() for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeakInfo:
        d = dict(data)
        d["tensors"] = tuple(TensorInfo.from_dict(t) for t in d.get("tensors", ()))
        d["by_category"] = _ro(d.get("by_category"))
        d["by_device"] = _ro(d.get("by_device"))
        return cls(**d)


@dataclass(frozen=True)
class StepStats(_Record):
    """One training step (from its first forward up to and including its ``optimizer.step()``)."""

    index: int
    peak_bytes: int
    phase_peak_bytes: Mapping[str, int]  # phase -> highest tracked bytes while in that phase
    start_bytes: int
    end_bytes: int
    duration_ms: float
    micro_batches: int  # forward->backward transitions in this step

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase_peak_bytes", _ro(self.phase_peak_bytes))


@dataclass(frozen=True)
class ModuleStats(_Record):
    """One module, inclusive of its submodules. Peaks are bytes above the level at the module's entry."""

    name: str
    type: str
    param_bytes: int = 0
    buffer_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0  # made in its forward and still alive when backward starts (max over passes)
    forward_peak_bytes: int = 0
    backward_peak_bytes: int = 0
    forward_ms: float = 0.0  # per step, averaged over steady steps (all steps when only one)
    backward_ms: float = 0.0
    calls: int = 0  # forward calls per step (max over steps)
    structure: str = ""  # hash of class names and parameter shapes of the subtree: equal => same structure
    activation_by_op: Mapping[str, int] = field(default_factory=dict)  # op that made each activation byte
    forward_op_ms: Mapping[str, float] = field(default_factory=dict)  # forward time by op, per step
    forward_op_bytes: Mapping[str, int] = field(default_factory=dict)  # bytes each op made in one forward call
    output_bytes: int = 0  # bytes of the outputs its forward made (what a checkpoint of it keeps)
    # Share of its forward op time until the last tensor its backward keeps is made: what checkpointing it
    # recomputes (non-reentrant checkpointing stops once backward has every tensor it needs).
    recompute_fraction: float = 1.0
    # Absolute tracked bytes in the last step with a backward (what the planner's chain model is fitted to):
    forward_entry_bytes: int = 0  # when its forward started
    backward_entry_bytes: int = 0  # when its backward started
    gap_peak_bytes: int = 0  # highest between the end of its forward and the start of its backward

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation_by_op", _ro(self.activation_by_op))
        object.__setattr__(self, "forward_op_ms", _ro(self.forward_op_ms))
        object.__setattr__(self, "forward_op_bytes", _ro(self.forward_op_bytes))

    @property
    def depth(self) -> int:
        return 0 if self.name == "" else self.name.count(".") + 1

    @property
    def parent(self) -> str | None:
        if self.name == "":
            return None
        return self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Sample(_Record):
    """A timeline point. ``by_category`` is in the order of ``CATEGORIES``."""

    index: int  # position in the run's allocation events (monotonic)
    time_ms: float
    step: int
    phase: str
    module: str
    total_bytes: int
    by_category: tuple[int, ...]

    def category(self, name: str) -> int:
        return self.by_category[CATEGORIES.index(name)]


@dataclass(frozen=True)
class DeviceStats(_Record):
    """Per-device totals. ``allocator`` holds CUDA caching-allocator peaks; NVML fields need a driver."""

    device: str  # "cpu", "cuda:0", "meta"
    peak_bytes: int  # tracked bytes on this device at its own peak
    name: str = ""
    capacity_bytes: int | None = None
    allocator: Mapping[str, int] = field(default_factory=dict)
    fragmentation: float | None = None  # 1 - allocated/reserved at the reserved peak
    nvml_total_bytes: int | None = None
    nvml_used_bytes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allocator", _ro(self.allocator))


@dataclass(frozen=True)
class Environment(_Record):
    memprof_version: str
    torch_version: str
    python_version: str
    platform: str
    created: str  # ISO 8601, UTC
    device: str = "cpu"
    device_name: str = ""
    device_capacity_bytes: int | None = None
    world_size: int = 1
    rank: int = 0


_OFFLOAD_WORDS = " + cpu offload"


def sharding_words(strategy: str, shard_group_size: int | None, offload: bool) -> str:
    """The ``sharding`` assumption of an estimate, read back by :attr:`Profile.sharding`."""
    words = strategy if strategy != "hybrid" else f"hybrid (shard groups of {shard_group_size})"
    return words + (_OFFLOAD_WORDS if offload else "")


@dataclass(frozen=True)
class Profile:
    """Memory of one or more training steps, by module, category and phase, with the peak explained."""

    environment: Environment
    peak: PeakInfo
    steps: tuple[StepStats, ...]
    modules: Mapping[str, ModuleStats]
    timeline: tuple[Sample, ...]
    devices: tuple[DeviceStats, ...]
    estimated: bool = False
    assumptions: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", _ro(self.modules))
        object.__setattr__(self, "assumptions", _ro(self.assumptions))

    # -- convenience -------------------------------------------------------------------------------------
    @property
    def peak_bytes(self) -> int:
        return self.peak.bytes

    @property
    def capacity_bytes(self) -> int | None:
        return self.environment.device_capacity_bytes

    @property
    def steady_step_ms(self) -> float:
        """The step time memprof plans with and checks against: the fastest whole step after the first (a
        process's first tracked steps also measure op scratch; a tracked step only gets slower). 0.0 without
        steps."""
        steps = [s.duration_ms for s in self.steps if s.micro_batches]
        steps = steps[1:] if len(steps) > 1 else steps
        return min(steps) if steps else 0.0

    @property
    def sharding(self) -> tuple[str, bool]:
        """``(strategy, cpu_offload)`` the profile was made under (an estimate says so in ``assumptions``, as
        :func:`sharding_words` wrote it; a measured profile: ``("none", False)``)."""
        words = self.assumptions.get("sharding", "none")
        return words.split(" ")[0], words.endswith(_OFFLOAD_WORDS)

    @property
    def offload_host_bytes(self) -> tuple[int, int] | None:
        """``(resident, peak)`` host bytes per rank of an estimate with FSDP CPU offload (parameter shards,
        gradients and optimizer state; with the optimizer step's temporaries at the peak); None otherwise.
        The profile file keeps them as text in ``assumptions``; this is the one place that reads them."""
        a = self.assumptions
        if "host_bytes" not in a:
            return None
        resident = int(a["host_bytes"])
        return resident, int(a.get("host_peak_bytes", resident))

    def module_tree(self) -> dict[str, list[str]]:
        """Children of each module FQN, in the order modules were first seen."""
        children: dict[str, list[str]] = {name: [] for name in self.modules}
        for name, m in self.modules.items():
            parent = m.parent
            if parent is not None and parent in children:
                children[parent].append(name)
        return children

    # -- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "environment": self.environment.to_dict(),
            "estimated": self.estimated,
            "assumptions": dict(self.assumptions),
            "notes": list(self.notes),
            "peak": self.peak.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
            "modules": {k: v.to_dict() for k, v in self.modules.items()},
            "devices": [d.to_dict() for d in self.devices],
            "timeline": {"categories": list(CATEGORIES), "samples": [_sample_row(s) for s in self.timeline]},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        timeline = data.get("timeline") or {}
        cats = timeline.get("categories", list(CATEGORIES))
        if list(cats) != list(CATEGORIES):
            raise ValueError(f"timeline categories {cats} differ from {list(CATEGORIES)}")
        return cls(
            schema=data["schema"],
            environment=Environment.from_dict(data["environment"]),
            estimated=bool(data.get("estimated", False)),
            assumptions=_ro(data.get("assumptions")),
            notes=tuple(data.get("notes", ())),
            peak=PeakInfo.from_dict(data["peak"]),
            steps=tuple(StepStats.from_dict(s) for s in data.get("steps", ())),
            modules={k: ModuleStats.from_dict(v) for k, v in data.get("modules", {}).items()},
            devices=tuple(DeviceStats.from_dict(d) for d in data.get("devices", ())),
            timeline=tuple(_sample_from_row(r) for r in timeline.get("samples", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False, default=_json_default)

    def save(self, path) -> None:
        """Write the profile as JSON, atomically (a reader never sees a half-written file)."""

        atomic_write_text(path, self.to_json() + "\n")


_SAMPLE_KEYS = ("index", "time_ms", "step", "phase", "module", "total_bytes", "by_category")


def _sample_row(s: Sample) -> list:
    return [s.index, s.time_ms, s.step, s.phase, s.module, s.total_bytes, list(s.by_category)]


def _sample_from_row(row) -> Sample:
    if isinstance(row, Mapping):
        row = [row[k] for k in _SAMPLE_KEYS]
    index, time_ms, step, phase, module, total, by_cat = row
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} in timeline")
    return Sample(index, time_ms, step, phase, module, total, tuple(by_cat))


def _json_default(o):
    if isinstance(o, MappingProxyType):
        return dict(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"cannot serialise {type(o).__name__}")
