"""memprof.plots: the data handed to matplotlib equals the profile's, the files are real PNGs, and the HTML
report is self-contained."""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from memprof import plots
from memprof.categories import CATEGORIES
from memprof.errors import MemprofError
from tests import report_fixtures
from tests.report_fixtures import with_capacity

gpt_profile = report_fixtures.gpt_profile  # the session fixture, shared with the other test files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OWNED = ("param", "buffer", "grad", "optimizer", "activation")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_importing_memprof_and_plots_does_not_import_matplotlib():
    code = "import sys, memprof, memprof.plots, memprof.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- timeline data -------------------------------------------------------------------------------------------
def test_timeline_stack_sums_to_each_samples_total(gpt_profile):
    data = plots.timeline_data(gpt_profile)
    assert len(data.x) == len(data.totals) == len(gpt_profile.timeline) > 10
    assert data.totals == tuple(s.total_bytes for s in gpt_profile.timeline)
    for i, total in enumerate(data.totals):
        assert sum(series[i] for series in data.series.values()) == total


def test_timeline_series_are_the_samples_categories_in_stacking_order(gpt_profile):
    data = plots.timeline_data(gpt_profile)
    used = [c for i, c in enumerate(CATEGORIES) if any(s.by_category[i] for s in gpt_profile.timeline)]
    assert list(data.series) == used  # persistent categories (param...) at the bottom, all-zero ones dropped
    assert {"param", "grad", "optimizer", "activation"} <= set(used)
    i = CATEGORIES.index("optimizer")
    assert data.series["optimizer"] == tuple(s.by_category[i] for s in gpt_profile.timeline)


def test_timeline_x_is_time_in_ms(gpt_profile):
    data = plots.timeline_data(gpt_profile)
    assert data.x_label == "time (ms)"
    assert data.x == tuple(s.time_ms for s in gpt_profile.timeline)


def test_timeline_x_falls_back_to_sample_positions_without_usable_times(gpt_profile):
    flat = tuple(dataclasses.replace(s, time_ms=0.0) for s in gpt_profile.timeline)
    data = plots.timeline_data(dataclasses.replace(gpt_profile, timeline=flat))
    assert data.x_label == "sample"
    assert data.x == tuple(float(i) for i in range(len(flat)))


def test_peak_marker_is_the_profiles_peak(gpt_profile):
    data = plots.timeline_data(gpt_profile)
    assert data.peak.bytes == gpt_profile.peak_bytes
    assert max(data.totals) == gpt_profile.peak_bytes  # the tracker keeps the peak sample
    at = data.x.index(data.peak.x)
    assert data.totals[at] == gpt_profile.peak_bytes
    assert (data.peak.phase, data.peak.step) == (gpt_profile.peak.phase, gpt_profile.peak.step)
    module = gpt_profile.peak.module or "(root)"
    assert module in data.peak.label and gpt_profile.peak.phase in data.peak.label


def test_phase_bands_cover_the_run_in_order_and_match_the_samples(gpt_profile):
    data = plots.timeline_data(gpt_profile)
    assert data.bands[0].start == data.x[0] and data.bands[-1].end == data.x[-1]
    for a, b in zip(data.bands, data.bands[1:]):
        assert a.end == b.start and (a.phase, a.step) != (b.phase, b.step)
    runs = 1 + sum(1 for p, q in zip(gpt_profile.timeline, gpt_profile.timeline[1:])
                   if (p.phase, p.step) != (q.phase, q.step))
    assert len(data.bands) == runs
    phases_per_step = Counter((b.step, b.phase) for b in data.bands)
    for step in range(len(gpt_profile.steps)):
        for phase in ("forward", "backward", "optimizer"):
            assert phases_per_step[(step, phase)] >= 1
    assert [s for s, _ in data.step_starts] == [st.index for st in gpt_profile.steps]


def _drawn_hlines(fig) -> list[float]:
    (ax,) = fig.axes
    return [line.get_ydata()[0] for line in ax.lines if len(set(line.get_ydata())) == 1 and len(line.get_xdata()) == 2
            and tuple(line.get_xdata()) == (0, 1)]


def test_capacity_line_is_drawn_when_capacity_is_near_the_peak(gpt_profile):
    cap = 3 * 1024**2
    data = plots.timeline_data(with_capacity(gpt_profile, cap))
    assert data.capacity_bytes == cap
    assert _drawn_hlines(plots.timeline_figure(data)) == [cap]


def test_capacity_far_above_the_peak_is_stated_not_drawn(gpt_profile):
    cap = 1000 * gpt_profile.peak_bytes
    fig = plots.timeline_figure(plots.timeline_data(with_capacity(gpt_profile, cap)))
    assert _drawn_hlines(fig) == []
    assert "device capacity" in fig.axes[0].get_title(loc="right")


# -- modules data --------------------------------------------------------------------------------------------
def _sum_bars(data) -> dict[str, int]:
    total = Counter(data.rest_by_category)
    for bar in data.bars:
        total.update(bar.by_category)
    return {c: total[c] for c in OWNED}


@pytest.mark.parametrize("depth", [None, 1, 2])
def test_module_bars_partition_the_root_without_double_counting(gpt_profile, depth):
    data = plots.modules_data(gpt_profile, top=5, depth=depth)
    root = gpt_profile.modules[""]
    assert _sum_bars(data) == {c: getattr(root, f"{c}_bytes") for c in OWNED}
    whole = [b.name for b in data.bars if not b.own]
    for a in whole:  # no whole-module bar sits inside another
        assert not any(b != a and (a.startswith(b + ".") or b == "") for b in whole)


def test_module_bars_are_leaves_by_default_and_cut_at_depth(gpt_profile):
    tree = gpt_profile.module_tree()
    leaves = plots.modules_data(gpt_profile, top=None)
    assert all(not tree[b.name] for b in leaves.bars if not b.own)
    cut = plots.modules_data(gpt_profile, top=None, depth=1)
    assert {b.name for b in cut.bars if not b.own} == {"blocks", "wte", "wpe", "ln_f"}  # the others own nothing


def test_module_bars_keep_the_top_k_largest_first(gpt_profile):
    every = plots.modules_data(gpt_profile, top=None)
    top = plots.modules_data(gpt_profile, top=4)
    assert top.bars == every.bars[:4] and top.rest_count == len(every.bars) - 4
    totals = [b.total_bytes for b in every.bars]
    assert totals == sorted(totals, reverse=True) and all(totals)
    mlp = next(b for b in every.bars if b.name == "blocks.0.mlp.c_fc")
    stats = gpt_profile.modules["blocks.0.mlp.c_fc"]
    assert mlp.by_category["param"] == stats.param_bytes and mlp.by_category["optimizer"] == stats.optimizer_bytes


def test_module_bars_reject_a_bad_top(gpt_profile):
    with pytest.raises(MemprofError):
        plots.modules_data(gpt_profile, top=0)


# -- files ---------------------------------------------------------------------------------------------------
def test_timeline_png_is_a_readable_image(gpt_profile, tmp_path):
    import matplotlib.image

    path = plots.timeline(gpt_profile, tmp_path / "timeline.png")
    assert path == tmp_path / "timeline.png"
    width, height = _png_size(path.read_bytes())
    assert (width, height) == (1320, 600)  # 11 x 5 inches at 120 dpi
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (height, width) and img.std() > 0.05  # not a blank canvas


def test_modules_png_into_a_folder_is_named_modules_png(gpt_profile, tmp_path):
    import matplotlib.image

    path = plots.modules(gpt_profile, tmp_path, top=5)
    assert path == tmp_path / "modules.png"
    width, height = _png_size(path.read_bytes())
    assert width == 1320 and height > 300
    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_plotting_leaves_pyplot_alone(gpt_profile, tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.timeline(gpt_profile, tmp_path)
    plots.modules(gpt_profile, tmp_path)
    assert plt.get_fignums() == before


def test_html_report_embeds_both_figures_and_needs_nothing_online(gpt_profile, tmp_path):
    path = plots.html_report(gpt_profile, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 2
    sizes = [_png_size(base64.b64decode(u)) for u in uris]
    assert sizes[0] == (1320, 600)
    assert not re.search(r"https?://", text)
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert re.findall(r'src="([^"]{0,22})', text) == ["data:image/png;base64,"] * 2


def test_html_report_tables_hold_the_profiles_numbers(gpt_profile, tmp_path):
    from memprof.units import format_bytes

    text = plots.html_report(gpt_profile, tmp_path).read_text(encoding="utf-8")
    assert f"peak {format_bytes(gpt_profile.peak_bytes)}" in text
    assert text.count("<tr>") >= len(gpt_profile.modules) + len(gpt_profile.peak.tensors)
    assert ">blocks.0.mlp.c_fc<" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_html_report_renders_in_headless_chromium(gpt_profile, tmp_path):
    page = plots.html_report(gpt_profile, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile_dir:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile_dir}", f"--screenshot={shot}", "--window-size=1400,2000",
             page.resolve().as_uri()],
            capture_output=True, timeout=120, check=True,
        )
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (2000, 1400)
    assert img.std() > 0.05  # the page rendered something, not a blank screen
    assert Path(shot).stat().st_size > 50_000
