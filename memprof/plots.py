"""Pictures of a profile: memory over the step, memory by module, and a self-contained HTML report.

Each figure has a *data* function that computes exactly what is drawn (plain frozen dataclasses, bytes as
``int``; the tests check these) and a drawing function that hands that data to matplotlib:

    timeline_data(prof) -> TimelineData     timeline(prof, path) -> timeline.png
    modules_data(prof)  -> ModulesData      modules(prof, path)  -> modules.png
    html_report(prof, path) -> report.html  (inline CSS, tables from :mod:`memprof.report`, PNGs as data URIs)

matplotlib is imported inside the drawing functions, never at import time, and only through its object API
with the Agg canvas: no pyplot, so the user's backend and global figure state are left alone.

Known limits: the timeline shows the tracker's samples (at most ``max_samples``; long runs are downsampled,
the peak and phase changes are kept), so very short spikes between kept samples are not drawn, but the peak
marker is always the profile's peak. A device capacity far above the peak (host RAM on CPU runs) is stated in
a corner instead of being drawn, so that the memory curve stays readable.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .categories import CATEGORIES
from .errors import MemprofError
from .profiles import Profile
from .report import OWNED_CATEGORIES, render
from .units import format_bytes

__all__ = [
    "CATEGORY_COLORS",
    "PHASE_COLORS",
    "CAPACITY_DRAWN_WITHIN",
    "PhaseBand",
    "PeakMarker",
    "TimelineData",
    "ModuleBar",
    "ModulesData",
    "timeline_data",
    "timeline",
    "modules_data",
    "modules",
    "html_report",
    "frontier_data",
    "frontier",
]

# One colour per category, the same in every figure and in the HTML report (colour-blind-friendly hues).
CATEGORY_COLORS: Mapping[str, str] = MappingProxyType({
    "param": "#4878d0",
    "buffer": "#956cb4",
    "grad": "#ee854a",
    "optimizer": "#6acc64",
    "activation": "#d65f5f",
    "temporary": "#d5bb67",
    "input": "#82c6e2",
    "other": "#8c8c8c",
})
# Light tints behind the timeline: which phase of the step each stretch of time belongs to.
PHASE_COLORS: Mapping[str, str | None] = MappingProxyType({
    "forward": "#e3ecfa",
    "backward": "#fbe9dd",
    "optimizer": "#e2f4e0",
    "other": None,
})
CAPACITY_DRAWN_WITHIN = 4.0  # draw the capacity line only when it is at most this many times the peak
_DPI = 120


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
    """What :func:`timeline` draws. ``series`` are stacked in order (bottom first); each sample's values sum
    to ``totals``. Categories that are zero in every sample are left out."""

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
    label = f"peak {format_bytes(peak.bytes)}\n{_plain(peak.phase)} in {_plain(module)} (step {peak.step})"
    return PeakMarker(px, peak.bytes, peak.step, peak.phase, peak.module, label)


def timeline_data(prof: Profile) -> TimelineData:
    """The series :func:`timeline` hands to matplotlib: x, stacked category series, phase bands, the peak."""
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


# -- drawing -------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bytes_axis(axis, vmax: float) -> None:
    """Ticks at round numbers of one binary unit (KiB/MiB/GiB...), labelled with that unit."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    name, unit = "B", 1
    for n, f in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if vmax >= 2 * f:
            name, unit = n, f
            break
    ticks = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(0, max(vmax, 1) / unit)
    axis.set_major_locator(FixedLocator([t * unit for t in ticks if 0 <= t * unit <= vmax]))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / unit:g} {name}"))


def _plain(text: str) -> str:
    """``text`` drawn as written: a ``$`` in a module name would otherwise start matplotlib math text."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": "memprof"})
    return buf.getvalue()


def _save(fig, path: Path) -> None:
    """The figure as PNG at ``path``, written atomically (rendered in memory first)."""
    from .files import atomic_write_bytes

    atomic_write_bytes(path, _png(fig))


def _out_path(path: str | os.PathLike, default_name: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _draw_bands(ax, data: TimelineData, span: float) -> None:
    for b in data.bands:
        color = PHASE_COLORS.get(b.phase)
        if color is None or b.end <= b.start:
            continue
        ax.axvspan(b.start, b.end, color=color, zorder=0, lw=0)
        if (b.end - b.start) / span > 0.012 * len(b.phase) + 0.01:  # room for the label
            ax.text((b.start + b.end) / 2, 0.985, b.phase, transform=ax.get_xaxis_transform(), ha="center",
                    va="top", fontsize=8, color="#555555")
    for step, x in data.step_starts:
        ax.axvline(x, color="#999999", lw=0.8, ls=":", zorder=1)
        ax.text(x, 0.015, f"step {step}", transform=ax.get_xaxis_transform(), fontsize=8, color="#333333",
                va="bottom", ha="left", zorder=4, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none",
                                                        "alpha": 0.8})


def _draw_stack(ax, data: TimelineData) -> None:
    import numpy as np

    x = np.asarray(data.x, dtype=float)
    bottom = np.zeros(len(x))
    for cat, ys in data.series.items():
        top = bottom + np.asarray(ys, dtype=float)
        ax.fill_between(x, bottom, top, step="post", color=CATEGORY_COLORS[cat], label=cat, lw=0, zorder=2)
        bottom = top
    ax.step(x, bottom, where="post", color="#333333", lw=0.8, zorder=3)


def _draw_peak(ax, data: TimelineData, x0: float, span: float) -> None:
    p = data.peak
    ax.plot([p.x], [p.bytes], marker="v", color="#b00020", markersize=9, zorder=5, ls="none")
    right = (p.x - x0) / span < 0.6
    ax.annotate(p.label, (p.x, p.bytes), xytext=(12 if right else -12, 10), textcoords="offset points",
                ha="left" if right else "right", va="bottom", fontsize=9, color="#b00020", zorder=6,
                bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#b00020", "lw": 0.8})


def _timeline_legend(ax, data: TimelineData) -> None:
    """Outside the axes on the right: categories top-down as stacked, then the phases shaded behind them."""
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    cats = [(h, lab) for h, lab in zip(handles, labels) if lab in CATEGORY_COLORS][::-1]
    extra = [(h, lab) for h, lab in zip(handles, labels) if lab not in CATEGORY_COLORS]
    phases = {b.phase for b in data.bands if PHASE_COLORS.get(b.phase)}
    bands = [(Patch(facecolor=PHASE_COLORS[p], edgecolor="#bbbbbb", lw=0.5), f"{p} phase")
             for p in PHASE_COLORS if p in phases]
    items = cats + extra + bands
    ax.legend([h for h, _ in items], [lab for _, lab in items], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8, frameon=False, borderaxespad=0)


def _timeline_figure(data: TimelineData):
    fig = _figure(11, 5)
    ax = fig.add_subplot()
    if not data.x:
        ax.text(0.5, 0.5, "no timeline samples in this profile", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    x0 = data.x[0]
    x1 = max(data.x[-1], data.peak.x, x0 + 1.0)  # one sample still gets a visible width
    span = x1 - x0
    _draw_bands(ax, data, span)
    _draw_stack(ax, data)
    vmax = max(data.peak.bytes, max(data.totals, default=0))
    cap = data.capacity_bytes
    if cap is not None and cap <= CAPACITY_DRAWN_WITHIN * max(vmax, 1):
        ax.axhline(cap, color="black", ls="--", lw=1.2, zorder=4, label=f"capacity {format_bytes(cap)}")
        vmax = max(vmax, cap)
    elif cap is not None:
        ax.set_title(f"device capacity {format_bytes(cap)} (far above, not drawn)", loc="right", fontsize=9,
                     color="#555555")
    _draw_peak(ax, data, x0, span)
    ax.set_xlim(x0, x1)
    ax.set_ylim(0, vmax * 1.22)
    _bytes_axis(ax.yaxis, vmax * 1.22)
    ax.set_xlabel(data.x_label)
    ax.set_ylabel("tracked memory")
    title = "Memory over the step" + ("s" if len(data.step_starts) > 1 else "")
    ax.set_title(title + (" (estimated)" if data.estimated else ""), loc="left", fontweight="bold")
    _timeline_legend(ax, data)
    ax.grid(axis="y", color="#dddddd", lw=0.6, zorder=1)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def timeline(prof: Profile, path: str | os.PathLike = "timeline.png") -> Path:
    """Write the memory timeline (PNG): stacked categories, phase bands, the peak, the device capacity.

    ``path`` is a file, or an existing folder to write ``timeline.png`` into. Returns the file written.
    """
    out = _out_path(path, "timeline.png")
    _save(_timeline_figure(timeline_data(prof)), out)
    return out


def _short(label: str, width: int = 38) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


def _modules_figure(data: ModulesData):
    """Stacked bars, largest at the top; the bars beyond ``top`` become one line of text (their sum would
    otherwise dwarf every bar drawn)."""
    bars = list(data.bars)
    labels = [_plain(_short(b.label)) for b in bars] + ([f"({data.rest_count} more)"] if data.rest_count else [])
    fig = _figure(11, max(2.5, 0.32 * len(labels) + 1.4))
    ax = fig.add_subplot()
    if not bars:
        ax.text(0.5, 0.5, "no module owns memory in this profile", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    y = list(range(len(bars)))
    left = [0.0] * len(bars)
    for c in data.categories:
        values = [float(b.by_category[c]) for b in bars]
        ax.barh(y, values, left=left, color=CATEGORY_COLORS[c], label=c, height=0.7, zorder=2)
        left = [a + v for a, v in zip(left, values)]
    for i, total in enumerate(left):
        ax.text(total, i, f" {format_bytes(int(total))}", va="center", ha="left", fontsize=7, color="#444444")
    if data.rest_count:
        rest = sum(data.rest_by_category.values())
        ax.text(0, len(bars), f"  {data.rest_count} smaller bars, {format_bytes(rest)} in all (not drawn)",
                va="center", ha="left", fontsize=8, color="#666666", style="italic")
    ax.set_yticks(list(range(len(labels))), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.6)  # largest at the top
    vmax = max(left) * 1.12 or 1  # room for the total printed after each bar
    ax.set_xlim(0, vmax)
    _bytes_axis(ax.xaxis, vmax)
    ax.set_xlabel("bytes owned (param, buffer, grad, optimizer state, activations kept for backward)")
    ax.set_title("Memory by module", loc="left", fontweight="bold")
    ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)
    ax.grid(axis="x", color="#dddddd", lw=0.6, zorder=1)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def modules(prof: Profile, path: str | os.PathLike = "modules.png", top: int | None = 15,
            depth: int | None = None) -> Path:
    """Write horizontal stacked bars of the ``top`` modules by owned memory (see :func:`modules_data`)."""
    out = _out_path(path, "modules.png")
    _save(_modules_figure(modules_data(prof, top=top, depth=depth)), out)
    return out


# -- HTML report ---------------------------------------------------------------------------------------------
_CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#b00020; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", Arial, sans-serif; color:var(--ink);
       background:#fff; }
main { max-width:1240px; margin:0 auto; padding:28px 32px 48px; }
header h1 { margin:0; font-size:26px; letter-spacing:-0.01em; }
header p { margin:4px 0 0; color:var(--muted); }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600;
         background:#fff4e5; color:#8a4b00; border:1px solid #f0c48a; vertical-align:middle; }
.badge.ok { background:#e9f7ec; color:#1a6b2c; border-color:#a6d8b2; }
.cards { display:grid; grid-template-columns:repeat(4, 1fr); gap:14px; margin:22px 0 8px; }
.card { border:1px solid var(--line); border-radius:10px; padding:12px 16px; background:var(--bg); }
.card .k { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.card .v { font-size:22px; font-weight:650; margin-top:2px; overflow-wrap:anywhere; }
.card .s { font-size:12px; color:var(--muted); }
.card.peak .v { color:var(--accent); }
.bar { display:flex; height:22px; border-radius:6px; overflow:hidden; margin:10px 0 6px; border:1px solid var(--line); }
.bar span { display:block; height:100%; }
.legend { display:flex; flex-wrap:wrap; gap:6px 18px; font-size:13px; color:var(--muted); }
.legend i { display:inline-block; width:11px; height:11px; border-radius:2px; margin-right:6px; vertical-align:-1px; }
h2 { font-size:18px; margin:30px 0 10px; padding-bottom:6px; border-bottom:1px solid var(--line); }
figure { margin:0; }
figure img { width:100%; height:auto; border:1px solid var(--line); border-radius:8px; }
figcaption { font-size:12px; color:var(--muted); margin-top:4px; }
.grid2 { display:grid; grid-template-columns:1.4fr 1fr; gap:28px; align-items:start; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { padding:5px 10px; border-bottom:1px solid #eaeef2; text-align:left; white-space:nowrap; }
thead th { background:var(--bg); border-bottom:1px solid var(--line); font-weight:600; position:sticky; top:0; }
tbody tr:nth-child(even) { background:#fafbfc; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
table.pairs th { width:1%; color:var(--muted); font-weight:600; background:none; }
table.pairs td { white-space:normal; }
footer { margin-top:36px; color:var(--muted); font-size:12px; }
"""


def _png_data_uri(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(fig)).decode("ascii")


def _card(key: str, value: str, sub: str = "", cls: str = "") -> str:
    e = html.escape
    return (f'<div class="card {cls}"><div class="k">{e(key)}</div><div class="v">{e(value)}</div>'
            f'<div class="s">{e(sub)}</div></div>')


def _cards(prof: Profile) -> str:
    p, cap = prof.peak, prof.environment.device_capacity_bytes
    cards = [
        _card("Peak", format_bytes(p.bytes), f"{p.phase}, step {p.step}", "peak"),
        _card("Where", p.module or "(root)", f"module active at the peak ({p.phase})"),
        _card("Largest category", *_largest_category(prof)),
    ]
    if cap is not None:
        head = cap - p.bytes
        cards.append(_card("Headroom", format_bytes(head), f"of {format_bytes(cap)} on {prof.environment.device}"))
    else:
        cards.append(_card("Device", prof.environment.device, "capacity unknown"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _largest_category(prof: Profile) -> tuple[str, str]:
    cats = prof.peak.by_category
    if not cats or not prof.peak.bytes:
        return "-", ""
    c = max(cats, key=lambda k: cats[k])
    return c, f"{format_bytes(cats[c])} ({100 * cats[c] / prof.peak.bytes:.0f}% of the peak)"


def _category_bar(prof: Profile) -> str:
    total = prof.peak.bytes or 1
    cats = [(c, prof.peak.by_category.get(c, 0)) for c in CATEGORIES if prof.peak.by_category.get(c, 0)]
    seg = "".join(f'<span style="width:{100 * v / total:.3f}%;background:{CATEGORY_COLORS[c]}" '
                  f'title="{c}: {format_bytes(v)}"></span>' for c, v in cats)
    legend = "".join(f'<span><i style="background:{CATEGORY_COLORS[c]}"></i>{c} {format_bytes(v)} '
                     f'({100 * v / total:.0f}%)</span>' for c, v in cats)
    return f'<div class="bar">{seg}</div><div class="legend">{legend}</div>'


def _subtitle(prof: Profile) -> str:
    env = prof.environment
    badge = ('<span class="badge">estimated</span>' if prof.estimated
             else '<span class="badge ok">measured</span>')
    device = env.device + (f" · {env.device_name}" if env.device_name else "")
    if env.world_size > 1:
        device += f" · rank {env.rank} of {env.world_size}"
    steps = f"{len(prof.steps)} step{'s' if len(prof.steps) != 1 else ''}"
    facts = f"{device} · {steps} · torch {env.torch_version} · {env.created}"
    return f"<p>{badge} {html.escape(facts)}</p>"


def html_report(prof: Profile, path: str | os.PathLike = "report.html", top: int | None = 15,
                depth: int | None = None) -> Path:
    """Write one self-contained HTML page: key numbers, both figures (base64 PNG) and the report's tables.

    No external resources (fonts, scripts, styles): it opens offline. ``top``/``depth`` apply to the module
    figure; the module table lists every module. ``path`` is a file or an existing folder for ``report.html``.
    """
    from .files import atomic_write_text

    out = _out_path(path, "report.html")
    t_uri = _png_data_uri(_timeline_figure(timeline_data(prof)))
    m_uri = _png_data_uri(_modules_figure(modules_data(prof, top=top, depth=depth)))
    peak = format_bytes(prof.peak.bytes)
    body = f"""<main>
<header><h1>memprof report — peak {html.escape(peak)}</h1>{_subtitle(prof)}</header>
{_cards(prof)}
<h2>What the peak is made of</h2>
{_category_bar(prof)}
<h2>Memory over time</h2>
<figure><img alt="memory timeline" src="{t_uri}"><figcaption>Tracked memory by category; shaded: forward,
backward and optimizer phases; the marker is the peak.</figcaption></figure>
<h2>Memory by module</h2>
<figure><img alt="memory by module" src="{m_uri}"><figcaption>Bytes each module owns, without double counting:
leaf modules, and "(own)" for what a parent holds outside its children.</figcaption></figure>
<div class="grid2">{render(prof, format="html", sections=["summary"])}</div>
{render(prof, format="html", sections=["steps"])}
<div class="scroll">{render(prof, format="html", sections=["modules"])}</div>
<div class="scroll">{render(prof, format="html", sections=["tensors"])}</div>
<footer>Generated by memprof {html.escape(prof.environment.memprof_version)} from a {html.escape(prof.schema)}
profile. Module rows are inclusive of their submodules.</footer>
</main>"""
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="memprof">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>memprof report — peak {html.escape(peak)}</title><style>{_CSS}</style></head>\n"
            f"<body>{body}</body></html>\n")
    atomic_write_text(out, page)
    return out


def frontier_data(plan) -> dict:
    """The plan's Pareto frontier as series: peaks (bytes) and step times (ms), the chosen point, the budget."""
    return {
        "peak_bytes": [f.peak_bytes for f in plan.frontier],
        "step_ms": [f.step_ms for f in plan.frontier],
        "labels": [f.description for f in plan.frontier],
        "chosen": (plan.predicted_peak_bytes, plan.predicted_step_ms),
        "budget_bytes": plan.budget_bytes,
    }


def frontier(plan, path="frontier.png") -> Path:
    """Peak memory vs step time of the plan's frontier, the budget as a line and the chosen plan marked."""
    data = frontier_data(plan)
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot(111)
    gib = 1024**3
    scale, unit = (gib, "GiB") if max(data["peak_bytes"] + [data["budget_bytes"]]) >= gib else (1024**2, "MiB")
    ax.step([p / scale for p in data["peak_bytes"]], data["step_ms"], where="post", marker="o", ms=3,
            color="#4c72b0", label="frontier (fastest plan at each peak)")
    ax.axvline(data["budget_bytes"] / scale, color="#c44e52", ls="--", lw=1, label="budget")
    ax.plot([data["chosen"][0] / scale], [data["chosen"][1]], marker="*", ms=14, color="#dd8452", ls="",
            label="chosen plan")
    ax.set_xlabel(f"predicted peak ({unit})")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title("Memory vs time: the plan's frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _out_path(path, "frontier.png")
    _save(fig, out)
    return out
