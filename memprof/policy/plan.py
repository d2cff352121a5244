"""The plan file: memprof's decision (what to checkpoint, which precision, how to shard) as reviewable TOML.

A :class:`Plan` (schema ``memprof.plan/1``) is made by the policy engine, saved with :meth:`Plan.save` as a TOML
file meant to be read in review and committed (e.g. under ``policies/``), and loaded back with
:func:`load_plan` (or ``memprof.load(path)``) to an equal object: ``load_plan(p.save(path)) == p``. It is applied
with ``memprof run --policy FILE SCRIPT`` or ``memprof.apply(model, memprof.load(FILE))``.

Every value is checked when a plan is built, in code or from a file: a bad value in code raises
:class:`PlanValueError`, a bad file :class:`PlanFormatError`; both name the key as a dotted path
(``sharding.strategy``, ``checkpoint[3].mode``). Unknown keys are errors at every level, so a misspelled key in a
hand-edited plan is never silently ignored.

Known limits: TOML is written by a small writer in this module (no dependency) that knows only the shapes a plan
has; comments in a file are not kept when it is loaded and saved again; ``assumptions`` is a read-only mapping,
so plans compare with ``==`` but are not hashable. Reading uses ``tomllib`` (Python 3.11+) or ``tomli`` (3.10).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .._version import __version__
from ..errors import MemprofError, ProfileFormatError
from ..files import atomic_write_text, read_text
from ..units import format_bytes

__all__ = [
    "SCHEMA",
    "PRECISIONS",
    "SHARDING_STRATEGIES",
    "CHECKPOINT_MODES",
    "LEVERS",
    "PlanFormatError",
    "PlanValueError",
    "Sharding",
    "CheckpointChoice",
    "Source",
    "FrontierPoint",
    "Plan",
    "load_plan",
]

SCHEMA = "memprof.plan/1"
PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast", "bf16")
SHARDING_STRATEGIES = ("none", "full", "shard-grad-op", "hybrid")
CHECKPOINT_MODES = ("keep", "full", "selective")
LEVERS = ("checkpoint", "precision", "sharding")


class PlanValueError(MemprofError, ValueError):
    """A plan (or a part of one) built in code has a bad value. ``key`` is its dotted path."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)

    def __reduce__(self):
        return (type(self), (self.key, self.problem))


class PlanFormatError(ProfileFormatError):
    """A plan file is missing, not TOML, of another schema, or has an unknown, missing or bad key.

    The message is ``"path: key: problem"``; ``key`` (a dotted path, "" for the whole file) is also an attribute.
    """

    def __init__(self, path: object, problem: str, key: str = "") -> None:
        self.key = key
        self.bare_problem = problem
        super().__init__(path, f"{key}: {problem}" if key else problem)

    def __reduce__(self):
        return (type(self), (self.path, self.bare_problem, self.key))


# ---------------------------------------------------------------------------------------------------------------
# Checking values (shared by code and files)


def _kind(v: object) -> str:
    if isinstance(v, bool):
        return f"a boolean ({'true' if v else 'false'})"
    if isinstance(v, int):
        return f"an integer ({v})" if abs(v) < 10**20 else f"an integer of {len(str(abs(v)))} digits"
    if isinstance(v, float):
        return f"a float ({v!r})"
    if isinstance(v, str):
        return f"a string ({v[:40]!r})"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, Mapping):
        return "a table"
    if isinstance(v, datetime):
        return "a date-time (write it as a quoted string)"
    return f"a {type(v).__name__}"


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") or not key else f"{prefix}.{key}"


def _str(obj: object, name: str, *, choices: tuple[str, ...] = (), nonempty: bool = False) -> None:
    v = getattr(obj, name)
    _check_str(v, name, choices=choices, nonempty=nonempty)


def _check_str(v: object, key: str, *, choices: tuple[str, ...] = (), nonempty: bool = False) -> None:
    if not isinstance(v, str):
        raise PlanValueError(key, f"expected a string, got {_kind(v)}")
    if choices and v not in choices:
        raise PlanValueError(key, f"{v!r} is not one of {', '.join(map(repr, choices))}")
    if nonempty and not v:
        raise PlanValueError(key, "must not be empty")


def _int(obj: object, name: str, *, minimum: int = 0) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanValueError(name, f"expected an integer, got {_kind(v)}")
    if v < minimum:
        raise PlanValueError(name, f"must be at least {minimum}, got {_kind(v)}")
    if v >= 2**63:
        raise PlanValueError(name, f"must be below 2**63, got {_kind(v)}")


def _float(obj: object, name: str, *, nonnegative: bool = False) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlanValueError(name, f"expected a number, got {_kind(v)}")
    if isinstance(v, int) and abs(v) >= 2**63:
        raise PlanValueError(name, f"must be below 2**63, got {_kind(v)}")
    if not math.isfinite(v):
        raise PlanValueError(name, f"must be finite, got {v!r}")
    if nonnegative and v < 0:
        raise PlanValueError(name, f"must not be negative, got {v!r}")
    object.__setattr__(obj, name, float(v))


def _bool(obj: object, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, bool):
        raise PlanValueError(name, f"expected true or false, got {_kind(v)}")


def _tuple(obj: object, name: str) -> tuple:
    v = getattr(obj, name)
    if not isinstance(v, (list, tuple)):
        raise PlanValueError(name, f"expected an array, got {_kind(v)}")
    v = tuple(v)
    object.__setattr__(obj, name, v)
    return v


def _nested(prefix: str, make):
    """Build a part, prefixing the key of any error with where the part sits in the plan."""
    try:
        return make()
    except PlanValueError as e:
        raise PlanValueError(_join(prefix, e.key), e.problem) from None


# ---------------------------------------------------------------------------------------------------------------
# The plan


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
        _str(self, "strategy", choices=SHARDING_STRATEGIES)
        _bool(self, "reshard_after_forward")
        _bool(self, "offload_optimizer")
        _int(self, "shard_group_size", minimum=1)
        if self.offload_optimizer and self.strategy == "none":
            raise PlanValueError("offload_optimizer", "CPU offload needs FSDP: a strategy other than 'none' "
                                 "(at world size 1, 'full' over a one-rank mesh)")


@dataclass(frozen=True)
class CheckpointChoice:
    """What to do with one unit's activations. ``unit`` is a module FQN or a pattern (e.g. ``blocks.*``)."""

    unit: str
    mode: str  # "keep" (store activations) | "full" (recompute the unit) | "selective" (recompute cheap ops)

    def __post_init__(self) -> None:
        _str(self, "unit", nonempty=True)
        _str(self, "mode", choices=CHECKPOINT_MODES)


@dataclass(frozen=True)
class Source:
    """The profile the plan was made from: its content hash, the model's name, and whether it was estimated."""

    profile_hash: str
    model: str
    estimated: bool  # True: from memprof.estimate (fake tensors), False: measured

    def __post_init__(self) -> None:
        _str(self, "profile_hash")
        _str(self, "model")
        _bool(self, "estimated")


@dataclass(frozen=True)
class FrontierPoint:
    """One alternative the engine weighed: its predicted peak and step time, in words."""

    peak_bytes: int
    step_ms: float
    description: str  # e.g. "checkpoint 12 of 24 blocks"

    def __post_init__(self) -> None:
        _int(self, "peak_bytes")
        _float(self, "step_ms", nonnegative=True)
        _str(self, "description")


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
    levers: tuple[str, ...] = ()  # those the engine could use: "checkpoint", "precision", "sharding"
    predicted_peak_bytes: int
    baseline_step_ms: float  # the profile's step time, no plan applied
    predicted_step_ms: float
    predicted_overhead: float
    precision: str = "fp32"  # "fp32" | "bf16-autocast" | "fp16-autocast" | "bf16" (params and optimizer in bf16)
    sharding: Sharding = Sharding()
    checkpoint: tuple[CheckpointChoice, ...] = ()
    source: Source
    assumptions: Mapping[str, str] = field(default_factory=dict)  # what the prediction takes for granted
    explanation: tuple[str, ...] = ()  # why, in sentences, one per line of the file
    frontier: tuple[FrontierPoint, ...] = ()  # alternatives by peak

    def __post_init__(self) -> None:
        _str(self, "schema")
        if self.schema != SCHEMA:
            raise PlanValueError("schema", f"{self.schema!r} is not supported (expected {SCHEMA!r})")
        _str(self, "created", nonempty=True)
        try:  # 3.10's fromisoformat does not take "Z"
            datetime.fromisoformat(self.created[:-1] + "+00:00" if self.created.endswith("Z") else self.created)
        except ValueError:
            raise PlanValueError("created", f"not an ISO 8601 date-time: {self.created!r}") from None
        _str(self, "memprof_version", nonempty=True)
        _int(self, "budget_bytes", minimum=1)
        _int(self, "world_size", minimum=1)
        _str(self, "device")
        for i, lever in enumerate(_tuple(self, "levers")):
            _check_str(lever, f"levers[{i}]", choices=LEVERS)
            if lever in self.levers[:i]:
                raise PlanValueError(f"levers[{i}]", f"{lever!r} is listed twice")
        _int(self, "predicted_peak_bytes")
        _float(self, "baseline_step_ms", nonnegative=True)
        _float(self, "predicted_step_ms", nonnegative=True)
        _float(self, "predicted_overhead")
        if self.baseline_step_ms > 0:
            expected = self.predicted_step_ms / self.baseline_step_ms - 1
            if abs(self.predicted_overhead - expected) > 1e-6:
                raise PlanValueError("predicted_overhead", f"{self.predicted_overhead!r} does not match "
                                     f"predicted_step_ms / baseline_step_ms - 1 = {expected!r}")
        _str(self, "precision", choices=PRECISIONS)
        if not isinstance(self.sharding, Sharding):
            raise PlanValueError("sharding", f"expected a Sharding, got {_kind(self.sharding)}")
        s = self.sharding
        if s.strategy == "hybrid":
            if s.shard_group_size > self.world_size or self.world_size % s.shard_group_size:
                raise PlanValueError("sharding.shard_group_size", f"{s.shard_group_size} does not divide the "
                                     f"world size {self.world_size}")
        elif s.shard_group_size != self.world_size:
            raise PlanValueError("sharding.shard_group_size", f"must equal the world size ({self.world_size}) "
                                 f"unless the strategy is 'hybrid', got {s.shard_group_size}")
        seen: set[str] = set()
        for i, c in enumerate(_tuple(self, "checkpoint")):
            if not isinstance(c, CheckpointChoice):
                raise PlanValueError(f"checkpoint[{i}]", f"expected a CheckpointChoice, got {_kind(c)}")
            if c.unit in seen:
                raise PlanValueError(f"checkpoint[{i}].unit", f"{c.unit!r} is listed twice")
            seen.add(c.unit)
        if not isinstance(self.source, Source):
            raise PlanValueError("source", f"expected a Source, got {_kind(self.source)}")
        if not isinstance(self.assumptions, Mapping):
            raise PlanValueError("assumptions", f"expected a table, got {_kind(self.assumptions)}")
        for k, v in self.assumptions.items():
            _check_str(k, "assumptions", nonempty=True)
            _check_str(v, f"assumptions.{k}")
        object.__setattr__(self, "assumptions", MappingProxyType(dict(self.assumptions)))
        for i, line in enumerate(_tuple(self, "explanation")):
            _check_str(line, f"explanation[{i}]")
        for i, p in enumerate(_tuple(self, "frontier")):
            if not isinstance(p, FrontierPoint):
                raise PlanValueError(f"frontier[{i}]", f"expected a FrontierPoint, got {_kind(p)}")

    def checkpoint_modes(self) -> dict[str, str]:
        """``{unit: mode}`` in file order."""
        return {c.unit: c.mode for c in self.checkpoint}

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
            "explanation": list(self.explanation),
            "sharding": _part_dict(self.sharding),
            "source": _part_dict(self.source),
            "assumptions": dict(self.assumptions),
            "checkpoint": [_part_dict(c) for c in self.checkpoint],
            "frontier": [_part_dict(p) for p in self.frontier],
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
        return _write_toml(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_toml` to ``path`` atomically (parent folders are created). Returns the path."""
        return atomic_write_text(path, self.to_toml())


def _part_dict(part: object) -> dict[str, Any]:
    return {f.name: getattr(part, f.name) for f in fields(part)}  # type: ignore[arg-type]


_OPTIONAL = MappingProxyType({"assumptions": MappingProxyType({}), "explanation": (), "frontier": ()})


def _table(data: object, key: str, cls: type, optional: Mapping[str, Any] = MappingProxyType({})) -> dict:
    """Check a table's keys against ``cls``'s fields: no unknown key, every required key present."""
    if not isinstance(data, Mapping):
        raise PlanValueError(key, f"expected a table, got {_kind(data)}")
    names = [f.name for f in fields(cls)]
    for k in data:
        if k not in names:
            raise PlanValueError(_join(key, str(k)), f"unknown key (expected one of {', '.join(names)})")
    for n in names:
        if n not in data and n not in optional:
            raise PlanValueError(_join(key, n), "missing (required)")
    return {n: data[n] if n in data else optional[n] for n in names}


def _parts(data: object, key: str, cls: type) -> tuple:
    if not isinstance(data, (list, tuple)):
        raise PlanValueError(key, f"expected an array of tables, got {_kind(data)}")
    out = []
    for i, item in enumerate(data):
        where = f"{key}[{i}]"
        out.append(_nested(where, lambda item=item: cls(**_table(item, "", cls))))
    return tuple(out)


def _plan_from_dict(data: Mapping[str, Any]) -> Plan:
    if not isinstance(data, Mapping):
        raise PlanValueError("", f"expected a table, got {_kind(data)}")
    if "schema" not in data:
        raise PlanValueError("", f"not a memprof plan (no 'schema' key; expected {SCHEMA!r})")
    if data["schema"] != SCHEMA:
        raise PlanValueError("", f"schema {data['schema']!r} is not supported (expected {SCHEMA!r})")
    d = _table(data, "", Plan, _OPTIONAL)
    d["sharding"] = _nested("sharding", lambda: Sharding(**_table(d["sharding"], "", Sharding)))
    d["source"] = _nested("source", lambda: Source(**_table(d["source"], "", Source)))
    d["checkpoint"] = _parts(d["checkpoint"], "checkpoint", CheckpointChoice)
    d["frontier"] = _parts(d["frontier"], "frontier", FrontierPoint)
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


# ---------------------------------------------------------------------------------------------------------------
# A small TOML writer for exactly the shapes above

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _comment(s: str) -> str:
    """``s`` as it may appear in a comment: quoted and escaped if it holds control characters."""
    return s if all(ch == "\t" or (ch >= " " and ch != "\x7f") for ch in s) else _toml_str(s)


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_str(k)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float; finite (checked)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


_COMMENTS = {
    "budget_bytes": lambda p: format_bytes(p.budget_bytes),
    "predicted_peak_bytes": lambda p: format_bytes(p.predicted_peak_bytes),
    "predicted_overhead": lambda p: f"{p.predicted_overhead:+.1%} step time",
}


def _write_toml(plan: Plan) -> str:
    d = plan.to_dict()
    lines = [
        "# memprof plan: what to checkpoint, which precision and how to shard so that training fits the budget.",
        f"# Schema {SCHEMA}, written by memprof {_comment(plan.memprof_version)}. Review it, then commit it (e.g. under",
        "# policies/). memprof checks every key when it loads this file: unknown or misspelled keys are errors.",
        "#",
        "# Apply it to an unmodified training script:  memprof run --policy FILE SCRIPT",
        "# or in code:                                 memprof.apply(model, memprof.load(FILE))",
        "#",
        f"# Budget {format_bytes(plan.budget_bytes)} per device, {plan.world_size} device(s)"
        + (f" ({_comment(plan.device)})" if plan.device else "")
        + f": predicted peak {format_bytes(plan.predicted_peak_bytes)},"
        f" {plan.predicted_overhead:+.1%} step time.",
        "",
    ]
    tables = []
    for k, v in d.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
            tables.append((k, v))
        elif isinstance(v, list) and len(v) > 1 and all(isinstance(x, str) for x in v) and k == "explanation":
            lines.append(f"{k} = [")
            lines.extend(f"    {_toml_value(x)}," for x in v)
            lines.append("]")
        else:
            comment = _COMMENTS.get(k)
            lines.append(f"{k} = {_toml_value(v)}" + (f"  # {comment(plan)}" if comment else ""))
    for k, v in tables:
        if isinstance(v, dict):
            lines += ["", f"[{k}]"]
            lines.extend(f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items())
        else:
            for item in v:
                lines += ["", f"[[{k}]]"]
                for kk, vv in item.items():
                    line = f"{_toml_key(kk)} = {_toml_value(vv)}"
                    if kk == "peak_bytes":
                        line += f"  # {format_bytes(vv)}"
                    lines.append(line)
    return "\n".join(lines) + "\n"
