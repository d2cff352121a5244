"""A profile's report as text: aligned tables, markdown, html sections, json, or (via :mod:`.report_csv`) csv.

    table     aligned plain text (tabulate "simple"), for terminals
    markdown  GitHub pipe tables, for issues and pull requests
    csv       one section (the module table unless ``sections`` picks another), for spreadsheets
    json      machine-readable; bytes are ints, whatever ``units`` says
    html      a fragment of ``<section>`` elements (used by :func:`memprof.plots.html_report`)

:func:`render` builds the :class:`~memprof.render.rows.Report` and renders the chosen sections; the
wording of the summary (peak, device, headroom, phase peaks, advice, assumptions, notes) is here.

Limits: ``units`` applies to table/markdown/html/csv only; module names are printed in full (the html
form indents tree rows instead); a module table sorted by a column loses its tree indentation.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

from ..peak_words import shape_text
from ..profiles import Profile
from ..units import format_bytes
from .options import FORMATS, SECTIONS, UNIT_CHOICES, check_choice
from .report_csv import render_csv
from .rows import OWNED_CATEGORIES, Report, Summary, build
from .tables import Table, heading, module_label, pct

__all__ = ["render", "table", "report_tables"]


def _summary_pairs(s: Summary, units: str) -> list[tuple[str, str]]:
    def b(n):
        return format_bytes(n, units)

    place = "optimizer.step" if s.peak_phase == "optimizer" and not s.peak_module else module_label(s.peak_module)
    where = f"step {s.peak_step}, {s.peak_phase}, in {place}"
    pairs = [("Peak", f"{b(s.peak_bytes)} ({where})")]
    if s.peak_words:
        pairs.append(("Peak is in", s.peak_words))
    device = s.device + (f" ({s.device_name})" if s.device_name else "")
    if s.world_size > 1:
        device += f", rank {s.rank} of {s.world_size}"
    pairs.append(("Device", device))
    if s.capacity_bytes is not None:
        pairs.append(("Capacity", b(s.capacity_bytes)))
        pairs.append(("Headroom", f"{b(s.headroom_bytes)} ({pct(s.headroom_bytes, s.capacity_bytes)} free)"))
    phases = ", ".join(f"{p} {b(v)}" for p, v in s.phase_peak_bytes.items() if v)
    pairs.append(("Phase peaks", phases or "-"))
    pairs.append(("Estimated", "yes (fake tensors, not a real run)" if s.estimated else "no (measured)"))
    pairs.extend(("Advice", a) for a in s.advice)
    pairs.extend((f"Assumption: {k}", str(v)) for k, v in s.assumptions.items())
    pairs.extend(("Note", n) for n in s.notes)
    return pairs


def report_tables(rep: Report, sections: Sequence[str], units: str) -> list[Table]:
    """The tables of ``sections``, cells formatted in ``units``, in the order a report prints them."""
    def b(n):
        return format_bytes(n, units)

    s = rep.summary
    out = []
    if "summary" in sections:
        out.append(Table("Summary", ["", ""], _summary_pairs(s, units), [False, False], pairs=True))
        cats = [(c, b(v), pct(v, s.peak_bytes)) for c, v in s.by_category.items() if v]
        out.append(Table("Peak by category", ["category", "bytes", "share"], cats, [False, True, True]))
    if "steps" in sections:
        rows = [(r.index, b(r.peak_bytes), b(r.forward_peak_bytes), b(r.backward_peak_bytes),
                 b(r.optimizer_peak_bytes), b(r.other_peak_bytes), f"{r.duration_ms:.1f}", r.micro_batches)
                for r in rep.steps]
        out.append(Table("Steps", ["step", "peak", "forward", "backward", "optimizer", "other", "ms",
                                   "micro-batches"], rows, [True] * 8))
    if "modules" in sections:
        rows = [(module_label(r.name), r.type, *(b(getattr(r, f"{c}_bytes")) for c in OWNED_CATEGORIES),
                 b(r.total_bytes), b(r.forward_peak_bytes), b(r.backward_peak_bytes),
                 f"{r.forward_ms:.2f}", f"{r.backward_ms:.2f}") for r in rep.modules]
        headers = ["module", "type", *OWNED_CATEGORIES, "total", "fwd peak", "bwd peak", "fwd ms", "bwd ms"]
        tree = rep.options.get("sort") is None
        out.append(Table("Modules", headers, rows, [False, False] + [True] * (len(headers) - 2),
                         indent=[r.depth for r in rep.modules] if tree else None))
    if "tensors" in sections:
        rows = [(b(t.bytes), shape_text(t), t.dtype, t.category,
                 module_label(t.module), t.phase, t.label) for t in rep.tensors]
        out.append(Table("Largest tensors at the peak", ["bytes", "shape", "dtype", "category", "module",
                                                         "phase", "label"], rows,
                         [True, False, False, False, False, False, False]))
    return out


def _render_text(rep: Report, sections: Sequence[str], units: str, fmt: str) -> str:
    return "\n\n".join(f"{heading(t.title, fmt)}\n\n{t.text(fmt)}"
                       for t in report_tables(rep, sections, units)) + "\n"


def _render_html(rep: Report, sections: Sequence[str], units: str) -> str:
    parts = [f'<section><h2>{html.escape(t.title)}</h2>{t.html()}</section>'
             for t in report_tables(rep, sections, units)]
    return "\n".join(parts)


def render(prof: Profile, format: str = "table", units: str = "auto", depth: int | None = None,
           top: int | None = None, sort: str | None = None, sections: Sequence[str] | None = None) -> str:
    """Render a profile's report as text.

    ``sections`` picks among ``summary``, ``steps``, ``modules``, ``tensors`` (all by default; for csv the
    module table, and csv accepts only one). ``units`` applies to table/markdown/html/csv (csv then holds
    numbers in that unit; ``auto`` and ``B`` give bytes); json always holds bytes as ints.
    """
    check_choice("format", format, FORMATS)
    check_choice("units", units, UNIT_CHOICES)
    if sections is None:
        sections = ("modules",) if format == "csv" else SECTIONS
    sections = tuple(sections)
    for s in sections:
        check_choice("section", s, SECTIONS)
    rep = build(prof, depth=depth, top=top, sort=sort)
    if format == "json":
        return json.dumps(rep.to_dict(sections), indent=1) + "\n"
    if format == "csv":
        return render_csv(rep, sections, units)
    if format == "html":
        return _render_html(rep, sections, units)
    return _render_text(rep, sections, units, format)


def table(prof: Profile, **kw) -> str:
    """Same as :func:`render` (``Profile.table`` delegates here)."""
    return render(prof, **kw)
