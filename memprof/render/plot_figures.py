"""The figures drawn with matplotlib from :mod:`.plot_data`'s records, and the PNG files written from them.

    timeline_figure(TimelineData) / timeline(prof, path)   memory over the step(s): stacked categories,
                                                           phase bands, step starts, the peak, the capacity
    modules_figure(ModulesData)   / modules(prof, path)    horizontal stacked bars, largest at the top
    frontier_figure(data)         / frontier(plan, path)   peak vs step time of a plan's frontier

matplotlib is imported inside the functions, never at import time, and only through its object API with
the Agg canvas: no pyplot, so the user's backend and global figure state are left alone. PNGs are written
atomically (rendered in memory first) with fixed metadata, so the same data gives the same bytes.

Known limits: a device capacity more than :data:`CAPACITY_DRAWN_WITHIN` times the peak (host RAM on CPU
runs) is stated in a corner instead of being drawn, so that the memory curve stays readable; module labels
longer than 38 characters are cut at the front; bars beyond ``top`` become one line of text.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from ..files import atomic_write_bytes
from ..profiles import Profile
from ..units import format_bytes
from .plot_data import ModulesData, TimelineData, frontier_data, modules_data, plain, timeline_data

__all__ = [
    "CATEGORY_COLORS",
    "PHASE_COLORS",
    "CAPACITY_DRAWN_WITHIN",
    "png_bytes",
    "out_path",
    "timeline_figure",
    "timeline",
    "modules_figure",
    "modules",
    "frontier_figure",
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


# -- canvas, axes and files ----------------------------------------------------------------------------------
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


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (fixed dpi and metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": "memprof"})
    return buf.getvalue()


def _save(fig, path: Path) -> None:
    """The figure as PNG at ``path``, written atomically (rendered in memory first)."""
    atomic_write_bytes(path, png_bytes(fig))


def out_path(path: str | os.PathLike, default_name: str) -> Path:
    """``path``, or ``default_name`` inside it when it is an existing folder; its parent folder is made."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# -- timeline ------------------------------------------------------------------------------------------------
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


def timeline_figure(data: TimelineData):
    """The timeline as a matplotlib ``Figure`` (Agg canvas), not saved."""
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
    out = out_path(path, "timeline.png")
    _save(timeline_figure(timeline_data(prof)), out)
    return out


# -- modules -------------------------------------------------------------------------------------------------
def _short(label: str, width: int = 38) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


def modules_figure(data: ModulesData):
    """Stacked bars, largest at the top; the bars beyond ``top`` become one line of text (their sum would
    otherwise dwarf every bar drawn). A matplotlib ``Figure`` (Agg canvas), not saved."""
    bars = list(data.bars)
    labels = [plain(_short(b.label)) for b in bars] + ([f"({data.rest_count} more)"] if data.rest_count else [])
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
    out = out_path(path, "modules.png")
    _save(modules_figure(modules_data(prof, top=top, depth=depth)), out)
    return out


# -- frontier ------------------------------------------------------------------------------------------------
def frontier_figure(data: dict):
    """Peak vs step time of :func:`~memprof.render.plot_data.frontier_data`'s series, the budget as a line
    and the chosen plan marked. A matplotlib ``Figure`` (Agg canvas), not saved."""
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
    return fig


def frontier(plan, path="frontier.png") -> Path:
    """Peak memory vs step time of the plan's frontier, the budget as a line and the chosen plan marked."""
    fig = frontier_figure(frontier_data(plan))
    out = out_path(path, "frontier.png")
    _save(fig, out)
    return out
