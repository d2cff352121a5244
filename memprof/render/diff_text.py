"""A :class:`~memprof.render.diff.ProfileDiff` as text: a peak table, a table of modules that changed, a verdict.

:func:`render_diff` renders as ``table`` (aligned text), ``markdown`` or ``json``. With ``fail_over``
(percent) rows that grew beyond it are flagged ``OVER n%`` and a verdict ends the text (``OK: ...`` or
``FAIL: k increase(s) ...`` with one line per regression); json then carries ``exceeds`` and
``regressions``.

Limits: only modules that changed get rows, and of an added module with no change in a field only its
``param`` row; ``units`` does not apply to json (bytes as ints).
"""

from __future__ import annotations

import json

from ..errors import MemprofError
from ..units import format_bytes
from .diff import Change, ModuleStatus, ProfileDiff, delta_text, percent_text
from .options import DIFF_FORMATS, UNIT_CHOICES, check_choice
from .tables import Table, heading, module_label

__all__ = ["render_diff", "diff_tables"]


def _flag(c: Change, fail_over: float | None, added: bool = False) -> str:
    if fail_over is not None and (added or c.grew_beyond(fail_over)):
        return f"OVER {fail_over:g}%"
    return "grew" if c.delta_bytes > 0 else ("shrank" if c.delta_bytes < 0 else "")


def diff_tables(d: ProfileDiff, units: str, fail_over: float | None) -> list[Table]:
    """The peak table and the table of modules that changed, cells formatted in ``units``."""
    def b(n):
        return format_bytes(n, units)

    peak = [("peak", b(d.peak.base_bytes), b(d.peak.new_bytes), delta_text(d.peak.delta_bytes, units),
             percent_text(d.peak), _flag(d.peak, fail_over))]
    peak += [(f"peak: {c.field}", b(c.base_bytes), b(c.new_bytes), delta_text(c.delta_bytes, units),
              percent_text(c), "grew" if c.delta_bytes > 0 else ("shrank" if c.delta_bytes < 0 else ""))
             for c in d.by_category if c.base_bytes or c.new_bytes]
    num = [False, True, True, True, True, False]
    rows = []
    for m in d.modules:
        if not m.changed:
            continue
        added = m.status == ModuleStatus.ADDED
        for c in m.changes:
            if c.delta_bytes or added and c.field == "param":
                rows.append((module_label(m.name), str(m.status), c.field, b(c.base_bytes), b(c.new_bytes),
                             delta_text(c.delta_bytes, units), percent_text(c), _flag(c, fail_over, added=added)))
    mod_headers = ["module", "status", "field", "base", "new", "delta", "change", "flag"]
    return [
        Table("Peak", ["", "base", "new", "delta", "change", "flag"], peak, num),
        Table("Modules that changed", mod_headers, rows, [False, False, False, True, True, True, True, False]),
    ]


def _verdict(d: ProfileDiff, fail_over: float | None) -> list[str]:
    lines = [f"Note: {n}" for n in d.notes]
    if fail_over is None:
        return lines
    regs = d.regressions(fail_over)
    if not regs:
        return [*lines, f"OK: nothing grew more than {fail_over:g}%."]
    return [*lines, f"FAIL: {len(regs)} increase(s) beyond {fail_over:g}%:", *(f"  - {r}" for r in regs)]


def render_diff(d: ProfileDiff, format: str = "table", fail_over: float | None = None,
                units: str = "auto") -> str:
    """Render a :class:`ProfileDiff`; with ``fail_over`` (percent) rows beyond it are flagged and a verdict
    line ends the text (json: ``exceeds`` and ``regressions``)."""
    check_choice("format", format, DIFF_FORMATS)
    check_choice("units", units, UNIT_CHOICES)
    if fail_over is not None and (not isinstance(fail_over, (int, float)) or fail_over < 0):
        raise MemprofError(f"fail_over must be a non-negative percentage, got {fail_over!r}")
    if format == "json":
        return json.dumps(d.to_dict(fail_over), indent=1) + "\n"
    body = "\n\n".join(f"{heading(t.title, format)}\n\n{t.text(format)}"
                       for t in diff_tables(d, units, fail_over))
    tail = _verdict(d, fail_over)
    return body + ("\n\n" + "\n".join(tail) if tail else "") + "\n"
