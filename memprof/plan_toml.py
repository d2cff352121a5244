"""The TOML a plan is written as: a small writer for exactly the shapes a plan has, with comments for people.

Values are written so that ``tomllib`` reads them back equal (floats as their shortest ``repr``, strings
escaped); comments give sizes in units and the overhead in percent. Not a general TOML writer: tables of
scalars and arrays of such tables only. Torch-free.
"""

from __future__ import annotations

import re

from .units import format_bytes

__all__ = ["write_toml"]

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


def write_toml(plan) -> str:
    """``plan`` (a :class:`memprof.plans.Plan`) as a commented TOML document."""
    d = plan.to_dict()
    lines = [
        "# memprof plan: what to checkpoint, which precision and how to shard so that training fits the budget.",
        f"# Schema {plan.schema}, written by memprof {_comment(plan.memprof_version)}. Review it, then commit it (e.g. under",
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
