"""A report's one table as csv, for spreadsheets: bytes as numbers in the chosen unit, the unit in the header.

:func:`render_csv` writes one section of a :class:`~memprof.render.rows.Report`: ``summary`` as field/value
pairs, or the ``steps``, ``modules`` or ``tensors`` rows with one column per row field. With ``units``
``auto`` or ``B`` bytes stay integers and headers keep ``_bytes``; in another unit a value is rounded to 4
decimals and ``param_bytes`` becomes ``param_MiB`` (``bytes``: ``size_MiB``).

Limits: one section per file (several raise :class:`~memprof.errors.MemprofError`); shapes are written
``4x128x64``; missing values (no capacity) are empty cells.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from ..errors import MemprofError
from ..units import UNITS
from .options import SECTIONS
from .rows import ModuleRow, Report, StepRow, TensorRow, row_dict

__all__ = ["render_csv"]


def _csv_value(n: int, units: str):
    return n if units in ("auto", "B") else round(n / UNITS[units.upper()], 4)


def _is_bytes(key: str) -> bool:
    return key == "bytes" or key.endswith("_bytes")


def _csv_header(key: str, units: str) -> str:
    """``param_bytes`` stays as is for bytes; in another unit it becomes ``param_MiB`` (``bytes``: ``size_MiB``)."""
    if units in ("auto", "B") or not _is_bytes(key):
        return key
    stem = "size" if key == "bytes" else key.removesuffix("_bytes")
    return f"{stem}_{units}"


def _csv_cell(key: str, value, units: str):
    if value is None:
        return ""
    if _is_bytes(key):
        return _csv_value(value, units)
    if key == "shape":
        return "x".join(map(str, value))
    if key.endswith("_ms"):
        return round(value, 4)
    return value


def _csv_records(rep: Report, section: str) -> tuple[list[str], list[dict[str, Any]]]:
    if section == "summary":
        s = rep.summary
        pairs: list[tuple[str, Any]] = [("peak_bytes", s.peak_bytes), ("peak_step", s.peak_step),
                                        ("peak_phase", s.peak_phase), ("peak_module", s.peak_module)]
        pairs += [(f"peak_{c}_bytes", v) for c, v in s.by_category.items()]
        pairs += [(f"{p}_peak_bytes", v) for p, v in s.phase_peak_bytes.items()]
        pairs += [("capacity_bytes", s.capacity_bytes), ("headroom_bytes", s.headroom_bytes),
                  ("estimated", s.estimated), ("device", s.device)]
        return ["field", "value"], [{"field": k, "value": v, "_key": k} for k, v in pairs]
    cls = {"steps": StepRow, "modules": ModuleRow, "tensors": TensorRow}[section]
    return list(cls.__dataclass_fields__), [row_dict(r) for r in getattr(rep, section)]


def render_csv(rep: Report, sections: Sequence[str], units: str) -> str:
    """The one section in ``sections`` as csv text (``units`` already checked by the caller)."""
    if len(sections) != 1:
        raise MemprofError(f"csv holds one table; pick one section of: {', '.join(SECTIONS)}")
    keys, records = _csv_records(rep, sections[0])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if sections[0] == "summary":  # field/value pairs: the unit goes into the field name
        w.writerow(keys)
        w.writerows([_csv_header(r["_key"], units), _csv_cell(r["_key"], r["value"], units)] for r in records)
    else:
        w.writerow([_csv_header(k, units) for k in keys])
        w.writerows([_csv_cell(k, r[k], units) for k in keys] for r in records)
    return buf.getvalue()
