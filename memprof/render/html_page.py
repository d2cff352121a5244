"""The self-contained HTML report: key numbers, both figures inline and every table of the text report.

:func:`html_report` writes one page with inline CSS, the timeline and module figures as base64 PNG data
URIs (:mod:`.plot_figures`) and the report's sections as html tables (:mod:`.report_text`); it opens
offline (no fonts, scripts or styles from elsewhere).

Limits: ``top``/``depth`` apply to the module figure only, the module table lists every module; the two
PNGs are inline as base64, so the page is a third larger than they are; its styles are fixed.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from ..categories import CATEGORIES
from ..files import atomic_write_text
from ..profiles import Profile
from ..units import format_bytes
from .plot_data import modules_data, timeline_data
from .plot_figures import CATEGORY_COLORS, modules_figure, out_path, png_bytes, timeline_figure
from .report_text import render

__all__ = ["html_report"]

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
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig)).decode("ascii")


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
    out = out_path(path, "report.html")
    t_uri = _png_data_uri(timeline_figure(timeline_data(prof)))
    m_uri = _png_data_uri(modules_figure(modules_data(prof, top=top, depth=depth)))
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
