"""Commands that show what a profile says: ``report``, ``plot``, ``diff`` and ``gpus``.

Thin on purpose: each command loads its input, calls :mod:`memprof.report` / :mod:`memprof.plots` /
:mod:`memprof.tracking.devices`, and echoes the text. Bad input (a missing, truncated or foreign file, an
unknown sort column, no NVIDIA driver) is a :class:`~memprof.errors.MemprofError`, which the command group
prints as one line with exit code 2. ``diff --fail-over`` exits 1 when something grew too much.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import ProfileFormatError
from ..report import DIFF_FORMATS, MODULE_COLUMNS, SECTIONS
from .common import FORMAT, UNITS, echo_json, fmt_bytes

__all__ = ["COMMANDS", "report", "plot", "diff", "gpus"]


def _load_profile(path: str):
    """A profile from ``path`` via ``memprof.load``; a plan (or anything else) is a ProfileFormatError."""
    from .. import load
    from ..profiles import Profile

    obj = load(path)
    if not isinstance(obj, Profile):
        raise ProfileFormatError(path, f"is a {type(obj).__name__}, not a profile")
    return obj


@click.command("report")
@click.argument("profile", metavar="PROFILE")
@click.option("--depth", type=click.IntRange(min=0), help="Deepest module level to list (the root is 0).")
@click.option("--top", type=click.IntRange(min=1), help="Keep the K largest modules (by --sort, else total).")
@click.option("--sort", metavar="COLUMN", help=f"Sort modules by a column: {', '.join(MODULE_COLUMNS)}.")
@click.option("--units", type=UNITS, default="auto", show_default=True, help="Units for bytes.")
@click.option("--format", "fmt", type=FORMAT, default="table", show_default=True, help="Output format.")
@click.option("--section", "sections", type=click.Choice(SECTIONS), multiple=True,
              help="Only these sections (repeatable); csv takes one and defaults to modules.")
def report(profile, depth, top, sort, units, fmt, sections):
    """Tables of a profile: the peak explained, per-step peaks, modules, largest tensors at the peak.

    \b
    Examples:
      memprof report memprof.json
      memprof report memprof.json --depth 2 --sort activation
      memprof report memprof.json --top 10 --units MiB --format markdown
      memprof report memprof.json --format csv > modules.csv
      memprof report memprof.json --format json --section summary
    """
    from ..report import render

    prof = _load_profile(profile)
    text = render(prof, format=fmt, units=units, depth=depth, top=top, sort=sort, sections=sections or None)
    click.echo(text, nl=False)


@click.command("plot")
@click.argument("profile", metavar="PROFILE")
@click.option("--out", "out_dir", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the files (made if missing).")
@click.option("--html", "with_html", is_flag=True, help="Also write report.html (self-contained, opens offline).")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True,
              help="Modules shown in modules.png.")
@click.option("--depth", type=click.IntRange(min=0), help="Cut the module tree at this depth in modules.png.")
@click.option("--force", is_flag=True, help="Overwrite files of these names even if memprof did not write them.")
def plot(profile, out_dir, with_html, top, depth, force):
    """Write timeline.png and modules.png (and report.html with --html); print their paths.

    \b
    Examples:
      memprof plot memprof.json
      memprof plot memprof.json --out plots/ --html
      memprof plot memprof.json --top 25 --depth 2
    """
    from .. import plots
    from ..files import check_output

    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(f"{out_dir} is a file, not a folder", param_hint="--out")
    names = [("timeline.png", "png"), ("modules.png", "png")] + ([("report.html", "html")] if with_html else [])
    paths = [check_output(out_dir / name, kind, inputs=[profile], force=force) for name, kind in names]
    prof = _load_profile(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plots.timeline(prof, paths[0]), plots.modules(prof, paths[1], top=top, depth=depth)]
    if with_html:
        written.append(plots.html_report(prof, paths[2], top=top, depth=depth))
    for (name, _), _path in zip(names, written):
        click.echo(str(out_dir / name))


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite percentage, got {value}")
    return value


@click.command("diff")
@click.argument("base", metavar="BASE.json")
@click.argument("new", metavar="NEW.json")
@click.option("--fail-over", type=click.FloatRange(min=0), metavar="PERCENT", callback=_finite,
              help="Exit 1 when the peak or any module grew by more than PERCENT (a new module counts).")
@click.option("--format", "fmt", type=click.Choice(DIFF_FORMATS), default="table", show_default=True,
              help="Output format.")
@click.option("--units", type=UNITS, default="auto", show_default=True, help="Units for bytes.")
@click.pass_context
def diff(ctx, base, new, fail_over, fmt, units):
    """Compare two profiles: the peak, its categories, and every module's bytes and peaks.

    Exit code 0 when nothing grew beyond --fail-over (or without it), 1 when something did, 2 on bad input.

    \b
    Examples:
      memprof diff before.json after.json
      memprof diff main.json branch.json --fail-over 5       # in CI: fail on a >5% regression
      memprof diff before.json after.json --format json
    """
    from ..report import diff as diff_profiles
    from ..report import render_diff

    d = diff_profiles(_load_profile(base), _load_profile(new))
    click.echo(render_diff(d, format=fmt, fail_over=fail_over, units=units), nl=False)
    if fail_over is not None and d.exceeds(fail_over):
        ctx.exit(1)


def _process_text(processes) -> str:
    return ", ".join(f"{pid} ({fmt_bytes(used) if used is not None else '?'})" for pid, used in processes) or "-"


@click.command("gpus")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format.")
def gpus(fmt):
    """The GPUs the NVIDIA driver sees: memory total/used/free and the processes using them.

    Needs an NVIDIA driver (NVML); without one it says so in one line and exits 2.

    \b
    Examples:
      memprof gpus
      memprof gpus --format json
    """
    from tabulate import tabulate

    from ..tracking import devices

    found = devices.nvml_devices()
    if fmt == "json":
        echo_json([{"index": d.index, "name": d.name, "total_bytes": d.total_bytes, "used_bytes": d.used_bytes,
                    "free_bytes": d.free_bytes,
                    "processes": [{"pid": pid, "used_bytes": used} for pid, used in d.processes]} for d in found])
        return
    rows = [(d.index, d.name, fmt_bytes(d.total_bytes), fmt_bytes(d.used_bytes), fmt_bytes(d.free_bytes),
             _process_text(d.processes)) for d in found]
    click.echo(tabulate(rows, ["gpu", "name", "total", "used", "free", "processes (pid, memory)"],
                        colalign=("right", "left", "right", "right", "right", "left"), disable_numparse=True)
               if rows else "no GPUs visible")


COMMANDS = [report, plot, diff, gpus]
