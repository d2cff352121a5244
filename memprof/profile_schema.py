"""Type and range checks of a profile's JSON before it becomes a :class:`memprof.profiles.Profile`.

A profile is a data file that people share and download: every field is checked, and the first problem is
reported as a :class:`SchemaError` naming the field (``modules["blocks.0"].peak_bytes``, ``steps[3].index``)
and what was expected. Bytes are non-negative integers below 2**63, times finite non-negative numbers,
phases and categories from :mod:`memprof.categories`. Unknown keys are ignored (a newer memprof may
add fields). Limits: relations between fields (the peak equal to the highest step, modules' names matching
their parents) are not checked; renderers cope with profiles where they disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .categories import CATEGORIES, PHASES
from .errors import MemprofError

__all__ = ["SchemaError", "check_profile"]

_MAX = 2**63


class SchemaError(MemprofError):
    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"profile field {field}: {problem}")


def _show(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return f"a JSON {'object' if isinstance(v, dict) else 'array'}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**20:
        return f"an integer of {len(str(abs(v)))} digits"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def nonneg(v: Any) -> str | None:
    if not _is_int(v) or not 0 <= v < _MAX:
        return "expected a non-negative integer"
    return None


def integer(v: Any) -> str | None:
    if not _is_int(v) or not -_MAX < v < _MAX:
        return "expected an integer"
    return None


def positive(v: Any) -> str | None:
    if not _is_int(v) or not 1 <= v < _MAX:
        return "expected a positive integer"
    return None


def number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "expected a finite non-negative number"
    try:
        if not math.isfinite(float(v)) or v < 0 or v >= 1e300:
            return "expected a finite non-negative number"
    except OverflowError:
        return "expected a finite non-negative number"
    return None


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def phase(v: Any) -> str | None:
    return None if isinstance(v, str) and v in PHASES else f"expected one of {', '.join(PHASES)}"


def optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def _check(where: str, v: Any, check: Callable) -> None:
    problem = check(v)
    if problem is not None:
        raise SchemaError(where, f"{problem}, got {_show(v)}")


def _mapping(where: str, v: Any, value: Callable) -> None:
    if not isinstance(v, Mapping):
        raise SchemaError(where, f"expected an object, got {_show(v)}")
    for k, x in v.items():
        _check(f"{where}[{k!r}]", x, value)


def _array(where: str, v: Any) -> list:
    if not isinstance(v, list):
        raise SchemaError(where, f"expected an array, got {_show(v)}")
    return v


def _record(where: str, v: Any, spec: Mapping[str, tuple[Callable, bool]]) -> None:
    """``spec``: field -> (check, required)."""
    if not isinstance(v, Mapping):
        raise SchemaError(where, f"expected an object, got {_show(v)}")
    for name, (check, required) in spec.items():
        if name not in v:
            if required:
                raise SchemaError(f"{where}.{name}", "missing (required)")
            continue
        _check(f"{where}.{name}", v[name], check)


def _req(check):
    return (check, True)


def _opt(check):
    return (check, False)


_ENVIRONMENT = {"memprof_version": _req(text), "torch_version": _req(text), "python_version": _req(text),
                "platform": _req(text), "created": _req(text), "device": _opt(text), "device_name": _opt(text),
                "device_capacity_bytes": _opt(optional(nonneg)), "world_size": _opt(positive),
                "rank": _opt(nonneg)}
_TENSOR = {"bytes": _req(nonneg), "category": _req(text), "module": _req(text), "phase": _req(text),
           "dtype": _req(text), "device": _req(text), "label": _opt(text)}
_PEAK = {"bytes": _req(nonneg), "step": _req(integer), "phase": _req(text), "module": _req(text),
         "time_ms": _opt(number)}
_STEP = {"index": _req(integer), "peak_bytes": _req(nonneg), "start_bytes": _req(nonneg),
         "end_bytes": _req(nonneg), "duration_ms": _req(number), "micro_batches": _req(nonneg)}
_MODULE = {"name": _req(text), "type": _req(text), "structure": _opt(text), "calls": _opt(nonneg),
           "recompute_fraction": _opt(number),
           **{f: _opt(nonneg) for f in ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_bytes",
                                        "activation_bytes", "forward_peak_bytes", "backward_peak_bytes",
                                        "output_bytes", "forward_entry_bytes", "backward_entry_bytes",
                                        "gap_peak_bytes")},
           "forward_ms": _opt(number), "backward_ms": _opt(number)}
_DEVICE = {"device": _req(text), "peak_bytes": _req(nonneg), "name": _opt(text),
           "capacity_bytes": _opt(optional(nonneg)), "fragmentation": _opt(optional(number)),
           "nvml_total_bytes": _opt(optional(nonneg)), "nvml_used_bytes": _opt(optional(nonneg))}
_SAMPLE = ("index", "time_ms", "step", "phase", "module", "total_bytes", "by_category")
_SAMPLE_CHECKS = (integer, number, integer, phase, text, nonneg)


def _sample(where: str, row: Any) -> None:
    if isinstance(row, Mapping):
        for k in _SAMPLE:
            if k not in row:
                raise SchemaError(f"{where}.{k}", "missing (required)")
        row = [row[k] for k in _SAMPLE]
    elif not isinstance(row, list) or len(row) != len(_SAMPLE):
        raise SchemaError(where, f"expected an array of {len(_SAMPLE)} values ({', '.join(_SAMPLE)}), got "
                                 f"{_show(row)}" + (f" of {len(row)}" if isinstance(row, list) else ""))
    for i, check in enumerate(_SAMPLE_CHECKS):
        _check(f"{where}.{_SAMPLE[i]}", row[i], check)
    cats = _array(f"{where}.by_category", row[6])
    if len(cats) != len(CATEGORIES):
        raise SchemaError(f"{where}.by_category", f"expected {len(CATEGORIES)} values ({', '.join(CATEGORIES)}), "
                                                  f"got {len(cats)}")
    for i, x in enumerate(cats):
        _check(f"{where}.by_category[{i}]", x, nonneg)


def check_profile(data: Mapping[str, Any]) -> None:
    """Raise :class:`SchemaError` at the first field of ``data`` (a profile's JSON object) that is wrong."""
    _record("environment", data.get("environment"), _ENVIRONMENT)
    if "estimated" in data:
        _check("estimated", data["estimated"], boolean)
    if "assumptions" in data:
        _mapping("assumptions", data["assumptions"], text)
    if "notes" in data:
        for i, n in enumerate(_array("notes", data["notes"])):
            _check(f"notes[{i}]", n, text)
    peak = data.get("peak")
    _record("peak", peak, _PEAK)
    _mapping("peak.by_category", peak.get("by_category", {}), nonneg)
    _mapping("peak.by_device", peak.get("by_device", {}), nonneg)
    for i, t in enumerate(_array("peak.tensors", peak.get("tensors", []))):
        _record(f"peak.tensors[{i}]", t, _TENSOR)
        for j, d in enumerate(_array(f"peak.tensors[{i}].shape", t.get("shape", []))):
            _check(f"peak.tensors[{i}].shape[{j}]", d, nonneg)
    for i, s in enumerate(_array("steps", data.get("steps", []))):
        _record(f"steps[{i}]", s, _STEP)
        _mapping(f"steps[{i}].phase_peak_bytes", s.get("phase_peak_bytes", {}), nonneg)
    modules = data.get("modules", {})
    if not isinstance(modules, Mapping):
        raise SchemaError("modules", f"expected an object, got {_show(modules)}")
    for name, m in modules.items():
        where = f"modules[{name!r}]"
        _record(where, m, _MODULE)
        if m["name"] != name:
            raise SchemaError(f"{where}.name", f"expected {name!r} (its key), got {_show(m['name'])}")
        for f, check in (("activation_by_op", nonneg), ("forward_op_ms", number), ("forward_op_bytes", nonneg)):
            if f in m:
                _mapping(f"{where}.{f}", m[f], check)
    for i, d in enumerate(_array("devices", data.get("devices", []))):
        _record(f"devices[{i}]", d, _DEVICE)
        if "allocator" in d:
            _mapping(f"devices[{i}].allocator", d["allocator"], nonneg)
    timeline = data.get("timeline", {})
    if timeline is None:
        return
    if not isinstance(timeline, Mapping):
        raise SchemaError("timeline", f"expected an object, got {_show(timeline)}")
    if "categories" in timeline and timeline["categories"] != list(CATEGORIES):
        raise SchemaError("timeline.categories", f"expected {list(CATEGORIES)}, got {_show(timeline['categories'])}")
    for i, row in enumerate(_array("timeline.samples", timeline.get("samples", []))):
        _sample(f"timeline.samples[{i}]", row)
