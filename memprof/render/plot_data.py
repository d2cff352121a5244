"""What each figure draws, computed from a profile (or a plan) as plain frozen records; no matplotlib here.

    timeline_data(prof) -> TimelineData   stacked category series over the samples, phase bands, the peak
    modules_data(prof)  -> ModulesData    one bar per module without double counting, largest first
    frontier_data(plan) -> dict           the plan's Pareto frontier, the chosen point and the budget

Bytes stay ``int``; the tests check these records, and :mod:`.plot_figures` hands them to matplotlib.
Text that will be drawn (the peak's label) is already escaped for matplotlib (:func:`plain`).

Known limits: the timeline holds the tracker's samples only (at most ``max_samples``; long runs are
downsampled, the peak and phase changes kept), so a spike between kept samples is not in it, but the peak
marker is always the profile's peak. Module bars are of owned categories (param, buffer, grad, optimizer,
activation), not of the step's temporaries or inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..categories import CATEGORIES
from ..errors import MemprofError
from ..profiles import Profile
from ..units import format_bytes
from .rows import OWNED_CATEGORIES

__all__ = [
    "PhaseBand",
    "PeakMarker",
    "TimelineData",
    "ModuleBar",
    "ModulesData",
    "plain",
    "timeline_data",
    "modules_data",
    "frontier_data",
]


def plain(text: str) -> str:
    """``text`` drawn as written: a ``$`` in a module name would otherwise start matplotlib math text."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


# -- timeline data -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseBand:
    """A contiguous stretch of samples in one phase of one step, from ``start`` to ``end`` on the x axis."""

    phase: str
    step: int
    start: float
    end: float


@dataclass(frozen=True)
class PeakMarker:
    x: float
    bytes: int
    step: int
    phase: str
    module: str
    label: str


@dataclass(frozen=True)
class TimelineData:
    """What :func:`~memprof.plots.timeline` draws. ``series`` are stacked in order (bottom first); each
    sample's values sum to ``totals``. Categories that are zero in every sample are left out."""

    x: tuple[float, ...]
    x_label: str
    series: Mapping[str, tuple[int, ...]]
    totals: tuple[int, ...]
    bands: tuple[PhaseBand, ...]
    step_starts: tuple[tuple[int, float], ...]
    peak: PeakMarker
    capacity_bytes: int | None
    estimated: bool = False


def _x_values(prof: Profile) -> tuple[tuple[float, ...], str]:
    """Sample times in ms when they are usable (non-decreasing, not all equal), else sample positions."""
    t = [s.time_ms for s in prof.timeline]
    if len(t) > 1 and all(b >= a for a, b in zip(t, t[1:])) and t[-1] > t[0]:
        return tuple(float(v) for v in t), "time (ms)"
    return tuple(float(i) for i in range(len(t))), "sample"


def _bands(prof: Profile, x: tuple[float, ...]) -> tuple[PhaseBand, ...]:
    bands: list[PhaseBand] = []
    start = 0
    samples = prof.timeline
    for i in range(1, len(samples) + 1):
        if i == len(samples) or (samples[i].phase, samples[i].step) != (samples[start].phase, samples[start].step):
            end = x[i] if i < len(samples) else x[-1]
            bands.append(PhaseBand(samples[start].phase, samples[start].step, x[start], end))
            start = i
    return tuple(bands)


def _step_starts(prof: Profile, x: tuple[float, ...]) -> tuple[tuple[int, float], ...]:
    out: list[tuple[int, float]] = []
    for s, xi in zip(prof.timeline, x):
        if not out or s.step != out[-1][0]:
            out.append((s.step, xi))
    return tuple(out)


def _peak_marker(prof: Profile, x: tuple[float, ...], x_is_time: bool) -> PeakMarker:
    peak = prof.peak
    where = next((i for i, s in enumerate(prof.timeline) if s.total_bytes == peak.bytes), None)
    if where is not None:
        px = x[where]
    elif x_is_time or not x:
        px = float(peak.time_ms)
    else:  # positions: the sample nearest in time to the peak
        px = x[min(range(len(x)), key=lambda i: abs(prof.timeline[i].time_ms - peak.time_ms))]
    module = peak.module or "(root)"
    label = f"peak {format_bytes(peak.bytes)}\n{plain(peak.phase)} in {plain(module)} (step {peak.step})"
    return PeakMarker(px, peak.bytes, peak.step, peak.phase, peak.module, label)


def timeline_data(prof: Profile) -> TimelineData:
    """The series the timeline figure hands to matplotlib: x, stacked category series, phase bands, the peak."""
    x, x_label = _x_values(prof)
    columns = list(zip(*(s.by_category for s in prof.timeline))) or [() for _ in CATEGORIES]
    series = {c: tuple(int(v) for v in col) for c, col in zip(CATEGORIES, columns) if any(col)}
    return TimelineData(
        x=x, x_label=x_label, series=MappingProxyType(series), totals=tuple(s.total_bytes for s in prof.timeline),
        bands=_bands(prof, x) if x else (), step_starts=_step_starts(prof, x),
        peak=_peak_marker(prof, x, x_label.startswith("time")), capacity_bytes=prof.environment.device_capacity_bytes,
        estimated=prof.estimated,
    )


# -- modules data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleBar:
    """One bar: a module (inclusive of its submodules) or, with ``own``, what a parent holds outside them."""

    name: str
    label: str
    type: str
    own: bool
    by_category: Mapping[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.by_category.values())


@dataclass(frozen=True)
class ModulesData:
    """Bars largest first; ``rest`` sums the bars beyond ``top`` (``rest_count`` of them)."""

    bars: tuple[ModuleBar, ...]
    categories: tuple[str, ...]
    rest_count: int = 0
    rest_by_category: Mapping[str, int] = field(default_factory=dict)


def _owned(m) -> dict[str, int]:
    return {c: int(getattr(m, f"{c}_bytes")) for c in OWNED_CATEGORIES}


def _partition(prof: Profile, depth: int | None) -> list[ModuleBar]:
    """Bars that never count a byte twice: leaves (or modules at ``depth``), plus each cut-open parent's own part."""
    children = prof.module_tree()
    bars: list[ModuleBar] = []

    def visit(name: str) -> None:
        m = prof.modules[name]
        kids = children[name]
        if not kids or (depth is not None and m.depth >= depth):
            bars.append(ModuleBar(name, name or f"{m.type} (root)", m.type, False, MappingProxyType(_owned(m))))
            return
        inner = [_owned(prof.modules[k]) for k in kids]
        own = {c: max(0, v - sum(i[c] for i in inner)) for c, v in _owned(m).items()}
        if any(own.values()):
            bars.append(ModuleBar(name, f"{name or m.type} (own)", m.type, True, MappingProxyType(own)))
        for k in kids:
            visit(k)

    for name, m in prof.modules.items():
        if m.parent is None or m.parent not in prof.modules:
            visit(name)
    return bars


def modules_data(prof: Profile, top: int | None = 15, depth: int | None = None) -> ModulesData:
    """Per-module memory by owned category, top ``top`` bars by total (``None``: all).

    Bars partition the model so that no byte is counted twice: leaf modules (or, with ``depth``, modules
    at that depth, inclusive of their submodules), and for every parent that is split open a "(own)" bar
    with what it holds outside its children (e.g. the root's loss activations). When no parent holds less
    than its children, the bars plus ``rest`` sum to the root modules' totals per category.
    """
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
        raise MemprofError(f"top must be a positive integer, got {top!r}")
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 0):
        raise MemprofError(f"depth must be a non-negative integer, got {depth!r}")
    bars = sorted((b for b in _partition(prof, depth) if b.total_bytes), key=lambda b: -b.total_bytes)
    shown, rest = (bars, []) if top is None else (bars[:top], bars[top:])
    cats = tuple(c for c in OWNED_CATEGORIES if any(b.by_category[c] for b in bars))
    rest_sum = {c: sum(b.by_category[c] for b in rest) for c in OWNED_CATEGORIES}
    return ModulesData(tuple(shown), cats, len(rest), MappingProxyType(rest_sum))


# -- frontier data -------------------------------------------------------------------------------------------
def frontier_data(plan) -> dict:
    """The plan's Pareto frontier as series: peaks (bytes) and step times (ms), the chosen point, the budget."""
    return {
        "peak_bytes": [f.peak_bytes for f in plan.frontier],
        "step_ms": [f.step_ms for f in plan.frontier],
        "labels": [f.description for f in plan.frontier],
        "chosen": (plan.predicted_peak_bytes, plan.predicted_step_ms),
        "budget_bytes": plan.budget_bytes,
    }
