"""The plan file: memprof's decision (what to checkpoint, which precision, how to shard) as reviewable TOML.

A :class:`Plan` (schema ``memprof.plan/1``) is made by the policy engine, saved with :meth:`Plan.save` as a TOML
file meant to be read in review and committed (e.g. under ``policies/``), and loaded back with
:func:`load_plan` (or ``memprof.load(path)``) to an equal object: ``load_plan(p.save(path)) == p``. It is applied
with ``memprof run --policy FILE SCRIPT`` or ``memprof.apply(model, memprof.load(FILE))``.

Every value is checked when a plan is built, in code or from a file: a bad value in code raises
:class:`PlanValueError`, a bad file :class:`PlanFormatError`; both name the key as a dotted path
(``sharding.strategy``, ``checkpoint[3].mode``). Unknown keys are errors at every level, so a misspelled key in a
hand-edited plan is never silently ignored.

Values are checked by :mod:`memprof.plan_schema`; the TOML is written by :mod:`memprof.plan_toml`.

Known limits: the writer knows only the shapes a plan has; comments in a file are not kept when it is loaded and saved again; ``assumptions`` is a read-only mapping,
so plans compare with ``==`` but are not hashable. Reading uses ``tomllib`` (Python 3.11+) or ``tomli`` (3.10).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ._version import __version__
from .errors import ProfileFormatError
from .files import atomic_write_text, read_text
from .plan_schema import (
    PlanFormatError,
    PlanValueError,
    check_bool_field,
    check_float_field,
    check_int_field,
    check_str,
    check_str_field,
    check_tuple_field,
    kind_of,
    nested,
    part_dict,
    parts_of,
    table_fields,
)
from .plan_toml import write_toml
from .vocab import CHECKPOINT_MODES, LEVERS, PRECISIONS, SHARDING_STRATEGIES

__all__ = [
    "SCHEMA",
    "PlanFormatError",
    "PlanValueError",
    "Sharding",
    "CheckpointChoice",
    "Source",
    "FrontierPoint",
    "Plan",
    "step_lever_words",
    "load_plan",
]

SCHEMA = "memprof.plan/1"


@dataclass(frozen=True)
class Sharding:
    """How parameters, gradients and optimizer state are split across ranks (FSDP2 ``fully_shard``)."""

    strategy: str = "none"  # "none" | "full" (ZeRO-3) | "shard-grad-op" (ZeRO-2) | "hybrid" (shard in groups)
    reshard_after_forward: bool = True  # free gathered params after forward (full/hybrid); False trades memory
    # FSDP2 CPUOffloadPolicy: parameter shards, gradients and optimizer state on the host, optimizer step on
    # the CPU; needs a strategy other than "none" (at world size 1: "full" over a one-rank mesh)
    offload_optimizer: bool = False
    shard_group_size: int = 1  # ranks per shard group: the world size, except for "hybrid"

    def __post_init__(self) -> None:
        check_str_field(self, "strategy", choices=SHARDING_STRATEGIES)
        check_bool_field(self, "reshard_after_forward")
        check_bool_field(self, "offload_optimizer")
        check_int_field(self, "shard_group_size", minimum=1)
        if self.offload_optimizer and self.strategy == "none":
            raise PlanValueError("offload_optimizer", "CPU offload needs FSDP: a strategy other than 'none' "
                                 "(at world size 1, 'full' over a one-rank mesh)")


@dataclass(frozen=True)
class CheckpointChoice:
    """What to do with one unit's activations. ``unit`` is a module FQN or a pattern (e.g. ``blocks.*``)."""

    unit: str
    mode: str  # "keep" (store activations) | "full" (recompute the unit) | "selective" (recompute cheap ops)

    def __post_init__(self) -> None:
        check_str_field(self, "unit", nonempty=True)
        check_str_field(self, "mode", choices=CHECKPOINT_MODES)


@dataclass(frozen=True)
class Source:
    """The profile the plan was made from: its content hash, the model's name, and whether it was estimated."""

    profile_hash: str
    model: str
    estimated: bool  # True: from memprof.estimate (fake tensors), False: measured

    def __post_init__(self) -> None:
        check_str_field(self, "profile_hash")
        check_str_field(self, "model")
        check_bool_field(self, "estimated")


@dataclass(frozen=True)
class FrontierPoint:
    """One alternative the engine weighed: its predicted peak and step time, in words."""

    peak_bytes: int
    step_ms: float
    description: str  # e.g. "checkpoint 12 of 24 blocks"

    def __post_init__(self) -> None:
        check_int_field(self, "peak_bytes")
        check_float_field(self, "step_ms", nonnegative=True)
        check_str_field(self, "description")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A decision for one model, budget and world size, with the prediction it was made on.

    ``predicted_overhead`` is the extra step time as a fraction of the baseline (``predicted / baseline - 1``);
    when ``baseline_step_ms`` is positive the three must agree (to 1e-6).
    """

    schema: str = SCHEMA
    created: str = field(default_factory=_now)  # ISO 8601
    memprof_version: str = __version__
    budget_bytes: int
    world_size: int = 1
    device: str = ""  # e.g. "H100-80GB"; "" when the budget was given as a raw size
    levers: tuple[str, ...] = ()  # those the engine could use (memprof.vocab.LEVERS)
    predicted_peak_bytes: int
    baseline_step_ms: float  # the profile's step time, no plan applied
    predicted_step_ms: float
    predicted_overhead: float
    precision: str = "fp32"  # "fp32" | "bf16-autocast" | "fp16-autocast" | "bf16" (params and optimizer in bf16)
    sharding: Sharding = Sharding()
    checkpoint: tuple[CheckpointChoice, ...] = ()
    loss_head_chunk_tokens: int = 0  # > 0: the loss head computed this many tokens at a time (0: as written)
    micro_batches: int = 1  # > 1: each batch run as this many slices, gradients accumulated (the loop's part)
    optimizer_in_backward: bool = False  # each parameter stepped as its gradient completes, the gradient freed
    bf16_moments: bool = False  # Adam/AdamW moments kept in bf16
    source: Source
    assumptions: Mapping[str, str] = field(default_factory=dict)  # what the prediction takes for granted
    explanation: tuple[str, ...] = ()  # why, in sentences, one per line of the file
    frontier: tuple[FrontierPoint, ...] = ()  # alternatives by peak

    def __post_init__(self) -> None:
        check_str_field(self, "schema")
        if self.schema != SCHEMA:
            raise PlanValueError("schema", f"{self.schema!r} is not supported (expected {SCHEMA!r})")
        check_str_field(self, "created", nonempty=True)
        try:  # 3.10's fromisoformat does not take "Z"
            datetime.fromisoformat(self.created[:-1] + "+00:00" if self.created.endswith("Z") else self.created)
        except ValueError:
            raise PlanValueError("created", f"not an ISO 8601 date-time: {self.created!r}") from None
        check_str_field(self, "memprof_version", nonempty=True)
        check_int_field(self, "budget_bytes", minimum=1)
        check_int_field(self, "world_size", minimum=1)
        check_str_field(self, "device")
        for i, lever in enumerate(check_tuple_field(self, "levers")):
            check_str(lever, f"levers[{i}]", choices=LEVERS)
            if lever in self.levers[:i]:
                raise PlanValueError(f"levers[{i}]", f"{lever!r} is listed twice")
        check_int_field(self, "predicted_peak_bytes")
        check_float_field(self, "baseline_step_ms", nonnegative=True)
        check_float_field(self, "predicted_step_ms", nonnegative=True)
        check_float_field(self, "predicted_overhead")
        if self.baseline_step_ms > 0:
            expected = self.predicted_step_ms / self.baseline_step_ms - 1
            if abs(self.predicted_overhead - expected) > 1e-6:
                raise PlanValueError("predicted_overhead", f"{self.predicted_overhead!r} does not match "
                                     f"predicted_step_ms / baseline_step_ms - 1 = {expected!r}")
        check_str_field(self, "precision", choices=PRECISIONS)
        check_int_field(self, "loss_head_chunk_tokens")
        check_int_field(self, "micro_batches", minimum=1)
        check_bool_field(self, "optimizer_in_backward")
        check_bool_field(self, "bf16_moments")
        if self.optimizer_in_backward and self.micro_batches > 1:
            raise PlanValueError("optimizer_in_backward", "cannot step in backward while accumulating gradients "
                                 f"over {self.micro_batches} micro-batches")
        if not isinstance(self.sharding, Sharding):
            raise PlanValueError("sharding", f"expected a Sharding, got {kind_of(self.sharding)}")
        s = self.sharding
        if s.strategy == "hybrid":
            if s.shard_group_size > self.world_size or self.world_size % s.shard_group_size:
                raise PlanValueError("sharding.shard_group_size", f"{s.shard_group_size} does not divide the "
                                     f"world size {self.world_size}")
        elif s.shard_group_size != self.world_size:
            raise PlanValueError("sharding.shard_group_size", f"must equal the world size ({self.world_size}) "
                                 f"unless the strategy is 'hybrid', got {s.shard_group_size}")
        seen: set[str] = set()
        for i, c in enumerate(check_tuple_field(self, "checkpoint")):
            if not isinstance(c, CheckpointChoice):
                raise PlanValueError(f"checkpoint[{i}]", f"expected a CheckpointChoice, got {kind_of(c)}")
            if c.unit in seen:
                raise PlanValueError(f"checkpoint[{i}].unit", f"{c.unit!r} is listed twice")
            seen.add(c.unit)
        if not isinstance(self.source, Source):
            raise PlanValueError("source", f"expected a Source, got {kind_of(self.source)}")
        if not isinstance(self.assumptions, Mapping):
            raise PlanValueError("assumptions", f"expected a table, got {kind_of(self.assumptions)}")
        for k, v in self.assumptions.items():
            check_str(k, "assumptions", nonempty=True)
            check_str(v, f"assumptions.{k}")
        object.__setattr__(self, "assumptions", MappingProxyType(dict(self.assumptions)))
        for i, line in enumerate(check_tuple_field(self, "explanation")):
            check_str(line, f"explanation[{i}]")
        for i, p in enumerate(check_tuple_field(self, "frontier")):
            if not isinstance(p, FrontierPoint):
                raise PlanValueError(f"frontier[{i}]", f"expected a FrontierPoint, got {kind_of(p)}")

    def checkpoint_modes(self) -> dict[str, str]:
        """``{unit: mode}`` in file order."""
        return {c.unit: c.mode for c in self.checkpoint}

    def step_levers(self) -> list[str]:
        """The step levers the plan uses, in words (empty: the step as written)."""
        return step_lever_words(self.loss_head_chunk_tokens, self.micro_batches, self.optimizer_in_backward,
                                self.bf16_moments)

    # -- dictionaries ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data in file order: tuples become lists, parts become dicts."""
        return {
            "schema": self.schema,
            "created": self.created,
            "memprof_version": self.memprof_version,
            "budget_bytes": self.budget_bytes,
            "world_size": self.world_size,
            "device": self.device,
            "levers": list(self.levers),
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "baseline_step_ms": self.baseline_step_ms,
            "predicted_step_ms": self.predicted_step_ms,
            "predicted_overhead": self.predicted_overhead,
            "precision": self.precision,
            "loss_head_chunk_tokens": self.loss_head_chunk_tokens,
            "micro_batches": self.micro_batches,
            "optimizer_in_backward": self.optimizer_in_backward,
            "bf16_moments": self.bf16_moments,
            "explanation": list(self.explanation),
            "sharding": part_dict(self.sharding),
            "source": part_dict(self.source),
            "assumptions": dict(self.assumptions),
            "checkpoint": [part_dict(c) for c in self.checkpoint],
            "frontier": [part_dict(p) for p in self.frontier],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: object = "<plan>") -> Plan:
        """Build a plan from :meth:`to_dict`'s shape, checking every key; errors are :class:`PlanFormatError`
        naming ``origin`` (the file) and the key."""
        try:
            return _plan_from_dict(data)
        except PlanValueError as e:
            raise PlanFormatError(origin, e.problem, e.key) from None

    # -- TOML -----------------------------------------------------------------------------------------------

    def to_toml(self) -> str:
        """The plan as a commented, reviewable TOML document (see the module doc)."""
        return write_toml(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_toml` to ``path`` atomically (parent folders are created). Returns the path."""
        return atomic_write_text(path, self.to_toml())



def step_lever_words(loss_head_chunk_tokens: int, micro_batches: int, optimizer_in_backward: bool,
                     bf16_moments: bool) -> list[str]:
    """The step levers in words, in the order the planner weighs them (:mod:`memprof.policy.variants`)."""
    out = []
    if loss_head_chunk_tokens:
        out.append(f"loss head chunked by {loss_head_chunk_tokens} tokens")
    if micro_batches > 1:
        out.append(f"{micro_batches} micro-batches")
    if optimizer_in_backward:
        out.append("optimizer step in backward")
    if bf16_moments:
        out.append("bf16 optimizer moments")
    return out


_OPTIONAL = MappingProxyType({"assumptions": MappingProxyType({}), "explanation": (), "frontier": (),
                              "loss_head_chunk_tokens": 0, "micro_batches": 1, "optimizer_in_backward": False,
                              "bf16_moments": False})


def _plan_from_dict(data: Mapping[str, Any]) -> Plan:
    if not isinstance(data, Mapping):
        raise PlanValueError("", f"expected a table, got {kind_of(data)}")
    if "schema" not in data:
        raise PlanValueError("", f"not a memprof plan (no 'schema' key; expected {SCHEMA!r})")
    if data["schema"] != SCHEMA:
        raise PlanValueError("", f"schema {data['schema']!r} is not supported (expected {SCHEMA!r})")
    d = table_fields(data, "", Plan, _OPTIONAL)
    d["sharding"] = nested("sharding", lambda: Sharding(**table_fields(d["sharding"], "", Sharding)))
    d["source"] = nested("source", lambda: Source(**table_fields(d["source"], "", Source)))
    d["checkpoint"] = parts_of(d["checkpoint"], "checkpoint", CheckpointChoice)
    d["frontier"] = parts_of(d["frontier"], "frontier", FrontierPoint)
    return Plan(**d)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan TOML file written by :meth:`Plan.save` (or by hand). Every problem is a :class:`PlanFormatError`."""
    path = Path(path)
    try:
        text = read_text(path)
    except ProfileFormatError as e:
        raise PlanFormatError(path, e.problem) from None
    if not text.strip():
        raise PlanFormatError(path, "empty file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanFormatError(path, f"not valid TOML: {e}") from None
    except RecursionError:
        raise PlanFormatError(path, "not a memprof plan (TOML nested too deeply)") from None
    return Plan.from_dict(data, path)


