"""Checking a plan's values, in code and from a file: every problem names its key as a dotted path.

:class:`PlanValueError` is raised for a bad value in code (``sharding.strategy``, ``checkpoint[3].mode``),
:class:`PlanFormatError` for a bad file (the path, then the key). The checks take a frozen dataclass and a
field name (``check_*_field``) or a bare value (:func:`check_str`); :func:`table_fields` and :func:`parts_of`
check a table read from TOML against a dataclass's fields, so an unknown or missing key is an error at every
level. Used by :mod:`memprof.plans`; torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime
from types import MappingProxyType
from typing import Any

from .errors import MemprofError, ProfileFormatError

__all__ = ["PlanValueError", "PlanFormatError", "kind_of", "join_key", "check_str", "check_str_field",
           "check_int_field", "check_float_field", "check_bool_field", "check_tuple_field", "nested",
           "part_dict", "table_fields", "parts_of"]


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


def kind_of(v: object) -> str:
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


def join_key(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") or not key else f"{prefix}.{key}"


def check_str_field(obj: object, name: str, *, choices: tuple[str, ...] = (), nonempty: bool = False) -> None:
    v = getattr(obj, name)
    check_str(v, name, choices=choices, nonempty=nonempty)


def check_str(v: object, key: str, *, choices: tuple[str, ...] = (), nonempty: bool = False) -> None:
    if not isinstance(v, str):
        raise PlanValueError(key, f"expected a string, got {kind_of(v)}")
    if choices and v not in choices:
        raise PlanValueError(key, f"{v!r} is not one of {', '.join(map(repr, choices))}")
    if nonempty and not v:
        raise PlanValueError(key, "must not be empty")


def check_int_field(obj: object, name: str, *, minimum: int = 0) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanValueError(name, f"expected an integer, got {kind_of(v)}")
    if v < minimum:
        raise PlanValueError(name, f"must be at least {minimum}, got {kind_of(v)}")
    if v >= 2**63:
        raise PlanValueError(name, f"must be below 2**63, got {kind_of(v)}")


def check_float_field(obj: object, name: str, *, nonnegative: bool = False) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlanValueError(name, f"expected a number, got {kind_of(v)}")
    if isinstance(v, int) and abs(v) >= 2**63:
        raise PlanValueError(name, f"must be below 2**63, got {kind_of(v)}")
    if not math.isfinite(v):
        raise PlanValueError(name, f"must be finite, got {v!r}")
    if nonnegative and v < 0:
        raise PlanValueError(name, f"must not be negative, got {v!r}")
    object.__setattr__(obj, name, float(v))


def check_bool_field(obj: object, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, bool):
        raise PlanValueError(name, f"expected true or false, got {kind_of(v)}")


def check_tuple_field(obj: object, name: str) -> tuple:
    v = getattr(obj, name)
    if not isinstance(v, (list, tuple)):
        raise PlanValueError(name, f"expected an array, got {kind_of(v)}")
    v = tuple(v)
    object.__setattr__(obj, name, v)
    return v


def nested(prefix: str, make):
    """Build a part, prefixing the key of any error with where the part sits in the plan."""
    try:
        return make()
    except PlanValueError as e:
        raise PlanValueError(join_key(prefix, e.key), e.problem) from None




def part_dict(part: object) -> dict[str, Any]:
    return {f.name: getattr(part, f.name) for f in fields(part)}  # type: ignore[arg-type]


def table_fields(data: object, key: str, cls: type, optional: Mapping[str, Any] = MappingProxyType({})) -> dict:
    """Check a table's keys against ``cls``'s fields: no unknown key, every required key present."""
    if not isinstance(data, Mapping):
        raise PlanValueError(key, f"expected a table, got {kind_of(data)}")
    names = [f.name for f in fields(cls)]
    for k in data:
        if k not in names:
            raise PlanValueError(join_key(key, str(k)), f"unknown key (expected one of {', '.join(names)})")
    for n in names:
        if n not in data and n not in optional:
            raise PlanValueError(join_key(key, n), "missing (required)")
    return {n: data[n] if n in data else optional[n] for n in names}


def parts_of(data: object, key: str, cls: type) -> tuple:
    if not isinstance(data, (list, tuple)):
        raise PlanValueError(key, f"expected an array of tables, got {kind_of(data)}")
    out = []
    for i, item in enumerate(data):
        where = f"{key}[{i}]"
        out.append(nested(where, lambda item=item: cls(**table_fields(item, "", cls))))
    return tuple(out)

