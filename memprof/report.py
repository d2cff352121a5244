"""Tables about a profile: what the peak was made of, which modules own memory, what grew between two runs.

Computing and rendering are separate. :func:`build` turns a :class:`~memprof.profiles.Profile` into a
:class:`Report` of frozen rows (bytes stay ``int``); :func:`render` turns a report into text:

    table     aligned plain text (tabulate "simple"), for terminals
    markdown  GitHub pipe tables, for issues and pull requests
    csv       one section (the module table unless ``sections`` picks another), for spreadsheets
    json      machine-readable; bytes are ints, whatever ``units`` says
    html      a fragment of ``<section>`` elements (used by :func:`memprof.plots.html_report`)

:func:`diff` compares two profiles (the peak, the peak's categories, and every module's owned bytes and
forward/backward peaks) and :func:`render_diff` renders the comparison; :meth:`ProfileDiff.exceeds` says
whether anything grew beyond a percentage, which ``memprof diff --fail-over`` turns into an exit code.

Known limits: module statistics are inclusive of submodules, so a module table at several depths counts a
child's bytes again in each ancestor (use ``depth``); the largest-tensor list holds only what the tracker
kept (``top_tensors``, 20 by default); forward/backward times are not compared by :func:`diff` (they are
noise-prone and not memory).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .advice import allocator_advice
from .categories import CATEGORIES, PHASES
from .errors import MemprofError
from .peak_words import loss_head, shape_text
from .profiles import Profile
from .units import UNITS, format_bytes

__all__ = [
    "OWNED_CATEGORIES",
    "MODULE_COLUMNS",
    "FORMATS",
    "DIFF_FORMATS",
    "SECTIONS",
    "UNIT_CHOICES",
    "Summary",
    "StepRow",
    "ModuleRow",
    "TensorRow",
    "Report",
    "Change",
    "ModuleDiff",
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

REPORT_SCHEMA = "memprof.report/1"
DIFF_SCHEMA = "memprof.diff/1"

OWNED_CATEGORIES: tuple[str, ...] = ("param", "buffer", "grad", "optimizer", "activation")
"""Categories that belong to a module (``ModuleStats.<category>_bytes``); the others belong to the step."""

# Sortable module-table columns -> ModuleRow attribute. Names sort ascending, numbers descending.
MODULE_COLUMNS: Mapping[str, str] = MappingProxyType({
    "name": "name",
    "type": "type",
    "total": "total_bytes",
    **{c: f"{c}_bytes" for c in OWNED_CATEGORIES},
    "forward_peak": "forward_peak_bytes",
    "backward_peak": "backward_peak_bytes",
    "forward_ms": "forward_ms",
    "backward_ms": "backward_ms",
    "calls": "calls",
})
FORMATS = ("table", "markdown", "csv", "json", "html")
DIFF_FORMATS = ("table", "markdown", "json")
SECTIONS = ("summary", "steps", "modules", "tensors")
UNIT_CHOICES = ("auto", "B", "KiB", "MiB", "GiB")
_DIFF_FIELDS = (*OWNED_CATEGORIES, "forward_peak", "backward_peak")
_TABLEFMT = {"table": "simple", "markdown": "github"}


# -- rows ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRow:
    """One optimizer step: its peak and the highest tracked bytes in each phase."""

    index: int
    peak_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    optimizer_peak_bytes: int
    other_peak_bytes: int
    duration_ms: float
    micro_batches: int


@dataclass(frozen=True)
class Summary:
    """The peak explained in one record. ``headroom_bytes`` is negative when the peak exceeds the capacity."""

    peak_bytes: int
    peak_step: int
    peak_phase: str
    peak_module: str
    peak_time_ms: float
    by_category: Mapping[str, int]  # every category, in CATEGORIES order
    by_device: Mapping[str, int]
    phase_peak_bytes: Mapping[str, int]  # highest bytes in each phase over all steps
    device: str
    device_name: str
    capacity_bytes: int | None
    headroom_bytes: int | None
    world_size: int
    rank: int
    estimated: bool
    assumptions: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    peak_words: str = ""  # where the peak is, in words a user acts on (the loss head), when known
    advice: tuple[str, ...] = ()  # settings no lever applies (the CUDA allocator's), one sentence each

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v
        return d


@dataclass(frozen=True)
class ModuleRow:
    """One module (inclusive of its submodules); ``total_bytes`` is the sum of the categories it owns."""

    name: str
    type: str
    depth: int
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    forward_ms: float
    backward_ms: float
    calls: int


@dataclass(frozen=True)
class TensorRow:
    """One storage live at the peak."""

    bytes: int
    shape: tuple[int, ...]
    dtype: str
    category: str
    module: str
    phase: str
    device: str
    label: str


@dataclass(frozen=True)
class Report:
    """Everything :func:`render` shows, computed once. ``options`` records depth/top/sort."""

    summary: Summary
    steps: tuple[StepRow, ...]
    modules: tuple[ModuleRow, ...]
    tensors: tuple[TensorRow, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self, sections: Iterable[str] = SECTIONS) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": REPORT_SCHEMA, "options": dict(self.options)}
        for s in sections:
            if s == "summary":
                out["summary"] = self.summary.to_dict()
            else:
                out[s] = [_row_dict(r) for r in getattr(self, s)]
        return out


def _row_dict(row) -> dict[str, Any]:
    d = asdict(row)
    if "shape" in d:
        d["shape"] = list(d["shape"])
    return d


# -- computing -----------------------------------------------------------------------------------------------
def summary(prof: Profile) -> Summary:
    """The peak, where it happened, what it was made of, and the device's capacity and headroom."""
    env = prof.environment
    cap = env.device_capacity_bytes
    phase_peaks = {p: max((s.phase_peak_bytes.get(p, 0) for s in prof.steps), default=0) for p in PHASES}
    return Summary(
        peak_bytes=prof.peak.bytes, peak_step=prof.peak.step, peak_phase=prof.peak.phase,
        peak_module=prof.peak.module, peak_time_ms=prof.peak.time_ms,
        by_category=MappingProxyType({c: int(prof.peak.by_category.get(c, 0)) for c in CATEGORIES}),
        by_device=MappingProxyType(dict(prof.peak.by_device)),
        phase_peak_bytes=MappingProxyType(phase_peaks),
        device=env.device, device_name=env.device_name, capacity_bytes=cap,
        headroom_bytes=None if cap is None else cap - prof.peak.bytes,
        world_size=env.world_size, rank=env.rank, estimated=prof.estimated,
        assumptions=MappingProxyType(dict(prof.assumptions)), notes=tuple(prof.notes),
        peak_words=head.sentence() if (head := loss_head(prof)) is not None else "",
        advice=tuple(a.sentence() for a in allocator_advice(prof)),
    )


def step_rows(prof: Profile) -> tuple[StepRow, ...]:
    def phase(s, p):
        return int(s.phase_peak_bytes.get(p, 0))

    return tuple(
        StepRow(s.index, s.peak_bytes, phase(s, "forward"), phase(s, "backward"), phase(s, "optimizer"),
                phase(s, "other"), s.duration_ms, s.micro_batches)
        for s in prof.steps
    )


def _module_row(m) -> ModuleRow:
    owned = {f"{c}_bytes": int(getattr(m, f"{c}_bytes")) for c in OWNED_CATEGORIES}
    return ModuleRow(
        name=m.name, type=m.type, depth=m.depth, **owned, total_bytes=sum(owned.values()),
        forward_peak_bytes=m.forward_peak_bytes, backward_peak_bytes=m.backward_peak_bytes,
        forward_ms=m.forward_ms, backward_ms=m.backward_ms, calls=m.calls,
    )


def _tree_order(prof: Profile) -> list[str]:
    """Module names depth-first from the roots (a module whose parent is not in the profile is a root)."""
    children = prof.module_tree()
    out: list[str] = []
    stack = [n for n, m in reversed(prof.modules.items()) if m.parent is None or m.parent not in prof.modules]
    while stack:
        name = stack.pop()
        out.append(name)
        stack.extend(reversed(children[name]))
    return out


def _sort_attr(sort: str | None) -> str | None:
    if sort is None:
        return None
    key = sort[: -len("_bytes")] if sort.endswith("_bytes") else sort
    if key not in MODULE_COLUMNS:
        raise MemprofError(f"unknown sort column {sort!r}; choose one of: {', '.join(MODULE_COLUMNS)}")
    return MODULE_COLUMNS[key]


def _sort_key(attr: str):
    if attr in ("name", "type"):
        return lambda r: getattr(r, attr)
    return lambda r: -getattr(r, attr)


def module_rows(prof: Profile, *, depth: int | None = None, top: int | None = None,
                sort: str | None = None) -> tuple[ModuleRow, ...]:
    """One row per module, inclusive of its submodules.

    ``depth`` keeps modules at most that deep (the root is depth 0). ``top`` keeps the K largest by the
    ``sort`` column (by ``total`` when ``sort`` is None). Rows come in tree order when ``sort`` is None,
    otherwise sorted by that column (names ascending, numbers descending). Unknown columns raise
    :class:`MemprofError` listing the valid ones.
    """
    attr = _sort_attr(sort)
    _check_count("depth", depth, minimum=0)
    _check_count("top", top, minimum=1)
    rows = [_module_row(prof.modules[n]) for n in _tree_order(prof)]
    if depth is not None:
        rows = [r for r in rows if r.depth <= depth]
    if top is not None:
        keep = {id(r) for r in sorted(rows, key=_sort_key(attr or "total_bytes"))[:top]}
        rows = [r for r in rows if id(r) in keep]
    if attr is not None:
        rows.sort(key=_sort_key(attr))
    return tuple(rows)


def tensor_rows(prof: Profile, top: int | None = None) -> tuple[TensorRow, ...]:
    """The largest storages live at the peak, largest first."""
    _check_count("top", top, minimum=1)
    ts = sorted(prof.peak.tensors, key=lambda t: -t.bytes)[:top]
    return tuple(TensorRow(t.bytes, tuple(t.shape), t.dtype, t.category, t.module, t.phase, t.device, t.label)
                 for t in ts)


def build(prof: Profile, *, depth: int | None = None, top: int | None = None, sort: str | None = None) -> Report:
    """Compute every table of a report (nothing is rendered)."""
    return Report(
        summary=summary(prof), steps=step_rows(prof), modules=module_rows(prof, depth=depth, top=top, sort=sort),
        tensors=tensor_rows(prof), options=MappingProxyType({"depth": depth, "top": top, "sort": sort}),
    )


def _check_count(name: str, value: int | None, minimum: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MemprofError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise MemprofError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


# -- rendering helpers ---------------------------------------------------------------------------------------
def _module_label(name: str) -> str:
    return name if name else "(root)"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


class _Table:
    """Headers, cells and which columns are numeric: one table before it becomes text."""

    def __init__(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 numeric: Sequence[bool], pairs: bool = False, indent: Sequence[int] | None = None) -> None:
        self.title, self.headers, self.rows, self.numeric = title, list(headers), [list(r) for r in rows], numeric
        self.pairs = pairs  # key/value rows: no header, keys bold in markdown
        self.indent = indent  # per row: tree depth of the first cell (html only; text keeps full names)

    def text(self, fmt: str) -> str:
        from tabulate import tabulate

        if not self.rows:
            return "(none)"
        if self.pairs and fmt == "markdown":
            return "\n".join(f"- **{k}:** {v}" for k, v in self.rows)
        if self.pairs:
            return tabulate(self.rows, tablefmt="plain", disable_numparse=True)
        align = ["right" if n else "left" for n in self.numeric]
        return tabulate(self.rows, self.headers, tablefmt=_TABLEFMT[fmt], colalign=align, disable_numparse=True)

    def html(self) -> str:
        def cell(tag, value, numeric):
            cls = ' class="num"' if numeric else ""
            return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

        if self.pairs:
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                           for k, v in self.rows)
            return f'<table class="pairs"><tbody>{rows}</tbody></table>'

        def row(i, r):
            cells = [cell("td", v, n) for v, n in zip(r, self.numeric)]
            if self.indent is not None and self.indent[i]:
                cells[0] = cells[0].replace("<td>", f'<td style="padding-left:{10 + 16 * self.indent[i]}px">', 1)
            return "<tr>" + "".join(cells) + "</tr>"

        head = "".join(cell("th", h, n) for h, n in zip(self.headers, self.numeric))
        body = "".join(row(i, r) for i, r in enumerate(self.rows))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_pairs(s: Summary, units: str) -> list[tuple[str, str]]:
    def b(n):
        return format_bytes(n, units)

    place = "optimizer.step" if s.peak_phase == "optimizer" and not s.peak_module else _module_label(s.peak_module)
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
        pairs.append(("Headroom", f"{b(s.headroom_bytes)} ({_pct(s.headroom_bytes, s.capacity_bytes)} free)"))
    phases = ", ".join(f"{p} {b(v)}" for p, v in s.phase_peak_bytes.items() if v)
    pairs.append(("Phase peaks", phases or "-"))
    pairs.append(("Estimated", "yes (fake tensors, not a real run)" if s.estimated else "no (measured)"))
    pairs.extend(("Advice", a) for a in s.advice)
    pairs.extend((f"Assumption: {k}", str(v)) for k, v in s.assumptions.items())
    pairs.extend(("Note", n) for n in s.notes)
    return pairs


def _tables(rep: Report, sections: Sequence[str], units: str) -> list[_Table]:
    def b(n):
        return format_bytes(n, units)

    s = rep.summary
    out = []
    if "summary" in sections:
        out.append(_Table("Summary", ["", ""], _summary_pairs(s, units), [False, False], pairs=True))
        cats = [(c, b(v), _pct(v, s.peak_bytes)) for c, v in s.by_category.items() if v]
        out.append(_Table("Peak by category", ["category", "bytes", "share"], cats, [False, True, True]))
    if "steps" in sections:
        rows = [(r.index, b(r.peak_bytes), b(r.forward_peak_bytes), b(r.backward_peak_bytes),
                 b(r.optimizer_peak_bytes), b(r.other_peak_bytes), f"{r.duration_ms:.1f}", r.micro_batches)
                for r in rep.steps]
        out.append(_Table("Steps", ["step", "peak", "forward", "backward", "optimizer", "other", "ms",
                                    "micro-batches"], rows, [True] * 8))
    if "modules" in sections:
        rows = [(_module_label(r.name), r.type, *(b(getattr(r, f"{c}_bytes")) for c in OWNED_CATEGORIES),
                 b(r.total_bytes), b(r.forward_peak_bytes), b(r.backward_peak_bytes),
                 f"{r.forward_ms:.2f}", f"{r.backward_ms:.2f}") for r in rep.modules]
        headers = ["module", "type", *OWNED_CATEGORIES, "total", "fwd peak", "bwd peak", "fwd ms", "bwd ms"]
        tree = rep.options.get("sort") is None
        out.append(_Table("Modules", headers, rows, [False, False] + [True] * (len(headers) - 2),
                          indent=[r.depth for r in rep.modules] if tree else None))
    if "tensors" in sections:
        rows = [(b(t.bytes), shape_text(t), t.dtype, t.category,
                 _module_label(t.module), t.phase, t.label) for t in rep.tensors]
        out.append(_Table("Largest tensors at the peak", ["bytes", "shape", "dtype", "category", "module",
                                                          "phase", "label"], rows,
                          [True, False, False, False, False, False, False]))
    return out


def _heading(title: str, fmt: str) -> str:
    return f"## {title}" if fmt == "markdown" else f"{title}\n{'=' * len(title)}"


def _render_text(rep: Report, sections: Sequence[str], units: str, fmt: str) -> str:
    return "\n\n".join(f"{_heading(t.title, fmt)}\n\n{t.text(fmt)}" for t in _tables(rep, sections, units)) + "\n"


def _render_html(rep: Report, sections: Sequence[str], units: str) -> str:
    parts = [f'<section><h2>{html.escape(t.title)}</h2>{t.html()}</section>'
             for t in _tables(rep, sections, units)]
    return "\n".join(parts)


# -- csv -----------------------------------------------------------------------------------------------------
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
    return list(cls.__dataclass_fields__), [_row_dict(r) for r in getattr(rep, section)]


def _render_csv(rep: Report, sections: Sequence[str], units: str) -> str:
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


# -- public rendering ----------------------------------------------------------------------------------------
def render(prof: Profile, format: str = "table", units: str = "auto", depth: int | None = None,
           top: int | None = None, sort: str | None = None, sections: Sequence[str] | None = None) -> str:
    """Render a profile's report as text.

    ``sections`` picks among ``summary``, ``steps``, ``modules``, ``tensors`` (all by default; for csv the
    module table, and csv accepts only one). ``units`` applies to table/markdown/html/csv (csv then holds
    numbers in that unit; ``auto`` and ``B`` give bytes); json always holds bytes as ints.
    """
    _check_choice("format", format, FORMATS)
    _check_choice("units", units, UNIT_CHOICES)
    if sections is None:
        sections = ("modules",) if format == "csv" else SECTIONS
    sections = tuple(sections)
    for s in sections:
        _check_choice("section", s, SECTIONS)
    rep = build(prof, depth=depth, top=top, sort=sort)
    if format == "json":
        return json.dumps(rep.to_dict(sections), indent=1) + "\n"
    if format == "csv":
        return _render_csv(rep, sections, units)
    if format == "html":
        return _render_html(rep, sections, units)
    return _render_text(rep, sections, units, format)


def table(prof: Profile, **kw) -> str:
    """Same as :func:`render` (``Profile.table`` delegates here)."""
    return render(prof, **kw)


# -- regression diff -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One quantity in the base and the new profile. ``percent`` is None when it grew from zero."""

    field: str
    base_bytes: int
    new_bytes: int

    @property
    def delta_bytes(self) -> int:
        return self.new_bytes - self.base_bytes

    @property
    def percent(self) -> float | None:
        if self.base_bytes == 0:
            return 0.0 if self.new_bytes == 0 else None
        return 100.0 * self.delta_bytes / self.base_bytes

    def grew_beyond(self, fail_over: float) -> bool:
        """True when it grew by more than ``fail_over`` percent (any growth from zero counts)."""
        if self.delta_bytes <= 0:
            return False
        return self.percent is None or self.percent > fail_over

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "base_bytes": self.base_bytes, "new_bytes": self.new_bytes,
                "delta_bytes": self.delta_bytes, "percent": self.percent}


@dataclass(frozen=True)
class ModuleDiff:
    """One module present in either profile. ``status``: ``added`` (only in new), ``removed``, ``common``."""

    name: str
    type: str
    status: str
    changes: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        return self.status != "common" or any(c.delta_bytes for c in self.changes)

    def grew_beyond(self, fail_over: float) -> bool:
        """An added module counts as grown; otherwise any category or peak beyond ``fail_over`` percent."""
        return self.status == "added" or any(c.grew_beyond(fail_over) for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "status": self.status,
                "changes": [c.to_dict() for c in self.changes]}


@dataclass(frozen=True)
class ProfileDiff:
    """Base vs new: the peak, the peak's categories, and every module's owned bytes and peaks."""

    peak: Change
    by_category: tuple[Change, ...]
    modules: tuple[ModuleDiff, ...]
    notes: tuple[str, ...] = ()

    def regressions(self, fail_over: float) -> tuple[str, ...]:
        """What grew beyond ``fail_over`` percent, one line each (empty when nothing did)."""
        out = []
        if self.peak.grew_beyond(fail_over):
            out.append(f"peak grew {_fmt_change(self.peak, 'auto')}")
        for m in self.modules:
            if m.status == "added":
                out.append(f"module {_module_label(m.name)} is new")
                continue
            out.extend(f"module {_module_label(m.name)} {c.field} grew {_fmt_change(c, 'auto')}"
                       for c in m.changes if c.grew_beyond(fail_over))
        return tuple(out)

    def exceeds(self, fail_over: float) -> bool:
        """True when the peak or any module grew beyond ``fail_over`` percent (a new module counts)."""
        return bool(self.regressions(fail_over))

    def to_dict(self, fail_over: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": DIFF_SCHEMA,
            "peak": self.peak.to_dict(),
            "by_category": [c.to_dict() for c in self.by_category],
            "modules": [m.to_dict() for m in self.modules],
            "notes": list(self.notes),
            "fail_over": fail_over,
        }
        if fail_over is not None:
            d["regressions"] = list(self.regressions(fail_over))
            d["exceeds"] = bool(d["regressions"])
        return d


def _module_changes(base, new) -> tuple[Change, ...]:
    return tuple(Change(f, getattr(base, f"{f}_bytes", 0) if base else 0,
                        getattr(new, f"{f}_bytes", 0) if new else 0) for f in _DIFF_FIELDS)


def diff(base: Profile, new: Profile) -> ProfileDiff:
    """Compare two profiles (typically the same model before and after a change)."""
    names = list(base.modules) + [n for n in new.modules if n not in base.modules]
    mods = []
    for n in names:
        b, w = base.modules.get(n), new.modules.get(n)
        status = "common" if b and w else ("removed" if b else "added")
        mods.append(ModuleDiff(n, (w or b).type, status, _module_changes(b, w)))
    cats = tuple(Change(c, int(base.peak.by_category.get(c, 0)), int(new.peak.by_category.get(c, 0)))
                 for c in CATEGORIES)
    notes = []
    if base.estimated != new.estimated:
        notes.append("one profile is estimated and the other measured")
    eb, en = base.environment, new.environment
    if (eb.device, eb.world_size) != (en.device, en.world_size):
        notes.append(f"different setups: {eb.device} x{eb.world_size} vs {en.device} x{en.world_size}")
    return ProfileDiff(Change("peak", base.peak_bytes, new.peak_bytes), cats, tuple(mods), tuple(notes))


def _fmt_pct(c: Change) -> str:
    p = c.percent
    if p is None:
        return "new"
    return f"{p:+.1f}%" if c.delta_bytes else "0%"


def _fmt_delta(n: int, units: str) -> str:
    return ("+" if n > 0 else "") + format_bytes(n, units)


def _fmt_change(c: Change, units: str) -> str:
    return (f"{format_bytes(c.base_bytes, units)} -> {format_bytes(c.new_bytes, units)} "
            f"({_fmt_delta(c.delta_bytes, units)}, {_fmt_pct(c)})")


def _flag(c: Change, fail_over: float | None, added: bool = False) -> str:
    if fail_over is not None and (added or c.grew_beyond(fail_over)):
        return f"OVER {fail_over:g}%"
    return "grew" if c.delta_bytes > 0 else ("shrank" if c.delta_bytes < 0 else "")


def _diff_tables(d: ProfileDiff, units: str, fail_over: float | None) -> list[_Table]:
    def b(n):
        return format_bytes(n, units)

    peak = [("peak", b(d.peak.base_bytes), b(d.peak.new_bytes), _fmt_delta(d.peak.delta_bytes, units),
             _fmt_pct(d.peak), _flag(d.peak, fail_over))]
    peak += [(f"peak: {c.field}", b(c.base_bytes), b(c.new_bytes), _fmt_delta(c.delta_bytes, units), _fmt_pct(c),
              "grew" if c.delta_bytes > 0 else ("shrank" if c.delta_bytes < 0 else ""))
             for c in d.by_category if c.base_bytes or c.new_bytes]
    num = [False, True, True, True, True, False]
    rows = []
    for m in d.modules:
        if not m.changed:
            continue
        for c in m.changes:
            if c.delta_bytes or m.status == "added" and c.field == "param":
                rows.append((_module_label(m.name), m.status, c.field, b(c.base_bytes), b(c.new_bytes),
                             _fmt_delta(c.delta_bytes, units), _fmt_pct(c),
                             _flag(c, fail_over, added=m.status == "added")))
    mod_headers = ["module", "status", "field", "base", "new", "delta", "change", "flag"]
    return [
        _Table("Peak", ["", "base", "new", "delta", "change", "flag"], peak, num),
        _Table("Modules that changed", mod_headers, rows, [False, False, False, True, True, True, True, False]),
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
    _check_choice("format", format, DIFF_FORMATS)
    _check_choice("units", units, UNIT_CHOICES)
    if fail_over is not None and (not isinstance(fail_over, (int, float)) or fail_over < 0):
        raise MemprofError(f"fail_over must be a non-negative percentage, got {fail_over!r}")
    if format == "json":
        return json.dumps(d.to_dict(fail_over), indent=1) + "\n"
    body = "\n\n".join(f"{_heading(t.title, format)}\n\n{t.text(format)}"
                       for t in _diff_tables(d, units, fail_over))
    tail = _verdict(d, fail_over)
    return body + ("\n\n" + "\n".join(tail) if tail else "") + "\n"
