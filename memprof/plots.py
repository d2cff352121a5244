"""Pictures of a profile: memory over the step, memory by module, and a self-contained HTML report.

The public entry point of the pictures; the work is done in :mod:`memprof.render`. Each figure has a
*data* function that computes exactly what is drawn (plain frozen dataclasses, bytes as ``int``, in
:mod:`memprof.render.plot_data`; the tests check these) and a drawing function that hands that data to
matplotlib (:mod:`memprof.render.plot_figures`):

    timeline_data(prof) -> TimelineData     timeline(prof, path) -> timeline.png
    modules_data(prof)  -> ModulesData      modules(prof, path)  -> modules.png
    frontier_data(plan) -> dict             frontier(plan, path) -> frontier.png
    html_report(prof, path) -> report.html  (inline CSS, tables from :mod:`memprof.report`, PNGs as data URIs;
                                             :mod:`memprof.render.html_page`)

``timeline_figure(data)``, ``modules_figure(data)`` and ``frontier_figure(data)`` return the matplotlib
figure without saving it. matplotlib is imported inside the drawing functions, never at import time, and
only through its object API with the Agg canvas: no pyplot, so the user's backend and global figure state
are left alone.

Known limits: the timeline shows the tracker's samples (at most ``max_samples``; long runs are downsampled,
the peak and phase changes are kept), so very short spikes between kept samples are not drawn, but the peak
marker is always the profile's peak. A device capacity far above the peak (host RAM on CPU runs) is stated in
a corner instead of being drawn, so that the memory curve stays readable.
"""

from __future__ import annotations

from .render.html_page import html_report
from .render.plot_data import (
    ModuleBar,
    ModulesData,
    PeakMarker,
    PhaseBand,
    TimelineData,
    frontier_data,
    modules_data,
    timeline_data,
)
from .render.plot_figures import (
    CAPACITY_DRAWN_WITHIN,
    CATEGORY_COLORS,
    PHASE_COLORS,
    frontier,
    frontier_figure,
    modules,
    modules_figure,
    timeline,
    timeline_figure,
)

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
    "timeline_figure",
    "modules_data",
    "modules",
    "modules_figure",
    "html_report",
    "frontier_data",
    "frontier",
    "frontier_figure",
]
