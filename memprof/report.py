"""Tables about a profile: what the peak was made of, which modules own memory, what grew between two runs.

The public entry point of the report; the work is done in :mod:`memprof.render`, computing apart from
rendering. :func:`build` turns a :class:`~memprof.profiles.Profile` into a :class:`Report` of frozen rows
(bytes stay ``int``, :mod:`memprof.render.rows`); :func:`render` turns a report into text
(:mod:`memprof.render.report_text`, csv in :mod:`memprof.render.report_csv`):

    table     aligned plain text (tabulate "simple"), for terminals
    markdown  GitHub pipe tables, for issues and pull requests
    csv       one section (the module table unless ``sections`` picks another), for spreadsheets
    json      machine-readable; bytes are ints, whatever ``units`` says
    html      a fragment of ``<section>`` elements (used by :func:`memprof.plots.html_report`)

:func:`diff` compares two profiles (the peak, the peak's categories, and every module's owned bytes and
forward/backward peaks, :mod:`memprof.render.diff`) and :func:`render_diff` renders the comparison
(:mod:`memprof.render.diff_text`); :meth:`ProfileDiff.exceeds` says whether anything grew beyond a
percentage, which ``memprof diff --fail-over`` turns into an exit code.

Known limits: module statistics are inclusive of submodules, so a module table at several depths counts a
child's bytes again in each ancestor (use ``depth``); the largest-tensor list holds only what the tracker
kept (``top_tensors``, 20 by default); forward/backward times are not compared by :func:`diff` (they are
noise-prone and not memory).
"""

from __future__ import annotations

from .render.diff import DIFF_SCHEMA, Change, ModuleDiff, ModuleStatus, ProfileDiff, diff
from .render.diff_text import render_diff
from .render.options import DIFF_FORMATS, FORMATS, SECTIONS, UNIT_CHOICES
from .render.report_text import render, table
from .render.rows import (
    MODULE_COLUMNS,
    OWNED_CATEGORIES,
    REPORT_SCHEMA,
    ModuleRow,
    Report,
    StepRow,
    Summary,
    TensorRow,
    build,
    module_rows,
    step_rows,
    summary,
    tensor_rows,
)

__all__ = [
    "OWNED_CATEGORIES",
    "MODULE_COLUMNS",
    "FORMATS",
    "DIFF_FORMATS",
    "SECTIONS",
    "UNIT_CHOICES",
    "REPORT_SCHEMA",
    "DIFF_SCHEMA",
    "Summary",
    "StepRow",
    "ModuleRow",
    "TensorRow",
    "Report",
    "Change",
    "ModuleDiff",
    "ModuleStatus",
    "ProfileDiff",
    "summary",
    "step_rows",
    "module_rows",
    "tensor_rows",
    "build",
    "render",
    "table",
    "diff",
    "render_diff",
]
