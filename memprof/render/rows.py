"""What a report says about a profile, computed once as frozen rows: the summary, steps, modules, tensors.

:func:`build` turns a :class:`~memprof.profiles.Profile` into a :class:`Report` (bytes stay ``int``);
:mod:`.report_text` and :mod:`.report_csv` render it. :meth:`Report.to_dict` is the json form.

Known limits: module rows are inclusive of their submodules, so a module table at several depths counts a
child's bytes again in each ancestor (use ``depth``); the largest-tensor rows hold only what the tracker
kept (``top_tensors``, 20 by default). The summary's ``peak_words`` and ``advice`` are sentences, made by
:mod:`memprof.peak_words` and :mod:`memprof.advice` from their typed findings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ..advice import allocator_advice
from ..categories import CATEGORIES, PHASES
from ..errors import MemprofError
from ..peak_words import loss_head
from ..profiles import Profile
from .options import SECTIONS, check_count

__all__ = [
    "REPORT_SCHEMA",
    "OWNED_CATEGORIES",
    "MODULE_COLUMNS",
    "Summary",
    "StepRow",
    "ModuleRow",
    "TensorRow",
    "Report",
    "row_dict",
    "summary",
    "step_rows",
    "module_rows",
    "tensor_rows",
    "build",
]

REPORT_SCHEMA = "memprof.report/1"

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
    """Everything a rendering shows, computed once. ``options`` records depth/top/sort."""

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
                out[s] = [row_dict(r) for r in getattr(self, s)]
        return out


def row_dict(row) -> dict[str, Any]:
    """A step, module or tensor row as a dict of plain values (a tensor's shape as a list)."""
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
    check_count("depth", depth, minimum=0)
    check_count("top", top, minimum=1)
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
    check_count("top", top, minimum=1)
    ts = sorted(prof.peak.tensors, key=lambda t: -t.bytes)[:top]
    return tuple(TensorRow(t.bytes, tuple(t.shape), t.dtype, t.category, t.module, t.phase, t.device, t.label)
                 for t in ts)


def build(prof: Profile, *, depth: int | None = None, top: int | None = None, sort: str | None = None) -> Report:
    """Compute every table of a report (nothing is rendered)."""
    return Report(
        summary=summary(prof), steps=step_rows(prof), modules=module_rows(prof, depth=depth, top=top, sort=sort),
        tensors=tensor_rows(prof), options=MappingProxyType({"depth": depth, "top": top, "sort": sort}),
    )
