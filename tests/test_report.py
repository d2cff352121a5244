"""memprof.report: the numbers in every rendered format are the profile's, and the diff flags what grew."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest

from memprof import report
from memprof.categories import CATEGORIES
from memprof.errors import MemprofError
from tests import report_fixtures
from tests.report_fixtures import grown, with_capacity, with_peak

gpt_profile = report_fixtures.gpt_profile  # the session fixture, shared with the other test files

OWNED = ("param", "buffer", "grad", "optimizer", "activation")


def _json(prof, **kw):
    return json.loads(report.render(prof, format="json", **kw))


# -- summary -------------------------------------------------------------------------------------------------
def test_json_summary_matches_the_profiles_peak(gpt_profile):
    s = _json(gpt_profile)["summary"]
    peak = gpt_profile.peak
    assert s["peak_bytes"] == gpt_profile.peak_bytes == peak.bytes
    assert (s["peak_step"], s["peak_phase"], s["peak_module"]) == (peak.step, peak.phase, peak.module)
    assert s["by_category"] == {c: peak.by_category.get(c, 0) for c in CATEGORIES}
    assert sum(s["by_category"].values()) == peak.bytes  # the breakdown accounts for every byte of the peak


def test_json_phase_peaks_are_the_highest_over_steps(gpt_profile):
    s = _json(gpt_profile)["summary"]
    for phase, value in s["phase_peak_bytes"].items():
        assert value == max(st.phase_peak_bytes.get(phase, 0) for st in gpt_profile.steps)
    assert max(s["phase_peak_bytes"].values()) == gpt_profile.peak_bytes


def test_json_steps_match_step_stats(gpt_profile):
    steps = _json(gpt_profile)["steps"]
    assert [s["index"] for s in steps] == [st.index for st in gpt_profile.steps]
    for row, st in zip(steps, gpt_profile.steps):
        assert row["peak_bytes"] == st.peak_bytes
        assert row["backward_peak_bytes"] == st.phase_peak_bytes["backward"]
        assert row["optimizer_peak_bytes"] == st.phase_peak_bytes["optimizer"]


def test_headroom_is_capacity_minus_peak(gpt_profile):
    cap = 3 * 1024**2
    s = report.summary(with_capacity(gpt_profile, cap))
    assert s.capacity_bytes == cap
    assert s.headroom_bytes == cap - gpt_profile.peak_bytes


def test_unknown_capacity_leaves_capacity_and_headroom_out(gpt_profile):
    prof = with_capacity(gpt_profile, None)
    s = report.summary(prof)
    assert s.capacity_bytes is None and s.headroom_bytes is None
    text = report.render(prof, sections=["summary"])
    assert "Headroom" not in text and "Capacity" not in text


def test_summary_says_when_a_profile_is_estimated_and_lists_notes(gpt_profile):
    prof = dataclasses.replace(gpt_profile, estimated=True, notes=("model was torch.compile'd: ran eagerly",))
    text = report.render(prof, format="markdown", sections=["summary"])
    assert "**Estimated:** yes" in text
    assert "ran eagerly" in text
    assert "**Estimated:** no" in report.render(gpt_profile, format="markdown", sections=["summary"])


def test_table_shows_the_peak_in_the_requested_units(gpt_profile):
    text = report.render(gpt_profile, units="B", sections=["summary"])
    assert f"{gpt_profile.peak_bytes:,} B" in text
    mib = report.render(gpt_profile, units="MiB", sections=["summary"])
    assert f"{gpt_profile.peak_bytes / 2**20:,.2f} MiB" in mib


# -- modules -------------------------------------------------------------------------------------------------
def test_module_rows_equal_module_stats(gpt_profile):
    rows = _json(gpt_profile)["modules"]
    assert {r["name"] for r in rows} == set(gpt_profile.modules)
    for r in rows:
        m = gpt_profile.modules[r["name"]]
        for c in OWNED:
            assert r[f"{c}_bytes"] == getattr(m, f"{c}_bytes")
        assert r["total_bytes"] == sum(getattr(m, f"{c}_bytes") for c in OWNED)
        assert (r["forward_peak_bytes"], r["backward_peak_bytes"]) == (m.forward_peak_bytes, m.backward_peak_bytes)
        assert r["type"] == m.type


def test_root_module_owns_all_parameters(gpt_profile):
    (root,) = [r for r in report.module_rows(gpt_profile, depth=0)]
    assert root.name == ""
    assert root.param_bytes == gpt_profile.peak.by_category["param"]  # tied weights counted once


def test_default_order_is_the_module_tree_depth_first(gpt_profile):
    names = [r.name for r in report.module_rows(gpt_profile)]
    assert names[0] == ""
    for i, name in enumerate(names[1:], 1):  # every module comes after its parent
        parent = name.rpartition(".")[0]
        assert parent in names[:i]
    assert names.index("blocks.0.mlp.c_fc") < names.index("blocks.1")


def test_depth_limits_the_tree(gpt_profile):
    names = {r.name for r in report.module_rows(gpt_profile, depth=1)}
    assert names == {n for n in gpt_profile.modules if n == "" or "." not in n}
    assert {r.name for r in report.module_rows(gpt_profile, depth=0)} == {""}


def test_top_keeps_the_largest_by_the_sort_column(gpt_profile):
    rows = report.module_rows(gpt_profile, top=4, sort="activation")
    expected = sorted(gpt_profile.modules.values(), key=lambda m: -m.activation_bytes)[:4]
    assert [r.activation_bytes for r in rows] == [m.activation_bytes for m in expected]
    assert rows[0].name == ""  # inclusive stats: the root holds them all


def test_top_without_sort_ranks_by_total_and_keeps_tree_order(gpt_profile):
    rows = report.module_rows(gpt_profile, top=3)
    totals = sorted((sum(getattr(m, f"{c}_bytes") for c in OWNED) for m in gpt_profile.modules.values()),
                    reverse=True)
    assert sorted((r.total_bytes for r in rows), reverse=True) == totals[:3]
    assert [r.name for r in rows] == ["", "blocks", "blocks.0"]


def test_sort_by_name_is_ascending(gpt_profile):
    names = [r.name for r in report.module_rows(gpt_profile, sort="name")]
    assert names == sorted(gpt_profile.modules)


def test_sort_accepts_the_bytes_suffix(gpt_profile):
    assert report.module_rows(gpt_profile, sort="grad_bytes") == report.module_rows(gpt_profile, sort="grad")


def test_unknown_sort_column_is_an_error_listing_valid_columns(gpt_profile):
    with pytest.raises(MemprofError, match="unknown sort column 'weight'.*activation.*forward_peak"):
        report.render(gpt_profile, sort="weight")


@pytest.mark.parametrize("kw", [{"format": "xml"}, {"units": "kb"}, {"depth": -1}, {"top": 0},
                                {"sections": ["everything"]}])
def test_bad_options_are_memprof_errors(gpt_profile, kw):
    with pytest.raises(MemprofError):
        report.render(gpt_profile, **kw)


def test_markdown_module_table_has_a_row_per_module(gpt_profile):
    text = report.render(gpt_profile, format="markdown", sections=["modules"], depth=1)
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert lines[0].split("|")[1].strip() == "module"
    assert len(lines) == 2 + sum(1 for n in gpt_profile.modules if n == "" or "." not in n)  # header, rule


def test_csv_modules_hold_bytes_as_integers(gpt_profile):
    rows = list(csv.DictReader(io.StringIO(report.render(gpt_profile, format="csv"))))
    assert len(rows) == len(gpt_profile.modules)
    for r in rows:
        m = gpt_profile.modules[r["name"]]
        assert int(r["param_bytes"]) == m.param_bytes
        assert int(r["activation_bytes"]) == m.activation_bytes


def test_csv_in_mib_converts_and_renames_columns(gpt_profile):
    rows = list(csv.DictReader(io.StringIO(report.render(gpt_profile, format="csv", units="MiB"))))
    root = next(r for r in rows if r["name"] == "")
    assert float(root["optimizer_MiB"]) == pytest.approx(gpt_profile.modules[""].optimizer_bytes / 2**20, abs=1e-4)


def test_csv_takes_one_section(gpt_profile):
    with pytest.raises(MemprofError, match="one table"):
        report.render(gpt_profile, format="csv", sections=["summary", "modules"])
    rows = list(csv.reader(io.StringIO(report.render(gpt_profile, format="csv", sections=["summary"]))))
    assert ["peak_bytes", str(gpt_profile.peak_bytes)] in rows


# -- tensors -------------------------------------------------------------------------------------------------
def test_tensors_are_the_peaks_largest_first(gpt_profile):
    rows = _json(gpt_profile)["tensors"]
    expected = sorted(gpt_profile.peak.tensors, key=lambda t: -t.bytes)
    assert [r["bytes"] for r in rows] == [t.bytes for t in expected]
    first = rows[0]
    assert first["shape"] == list(expected[0].shape) and first["label"] == expected[0].label
    for r in rows:  # a dense tensor's storage is its element count times the element size
        numel = 1
        for d in r["shape"]:
            numel *= d
        assert r["bytes"] == numel * 4  # float32


def test_table_is_render(gpt_profile):
    assert report.table(gpt_profile, format="markdown", depth=2) == report.render(gpt_profile, format="markdown",
                                                                                  depth=2)


# -- diff ----------------------------------------------------------------------------------------------------
def test_diff_of_identical_profiles_shows_no_change(gpt_profile):
    d = report.diff(gpt_profile, gpt_profile)
    assert d.peak.delta_bytes == 0
    assert not any(m.changed for m in d.modules)
    assert not d.exceeds(0.0)


def test_diff_measures_a_module_that_grew_ten_percent(gpt_profile):
    base_act = gpt_profile.modules["blocks.0.mlp"].activation_bytes
    new = grown(gpt_profile, "blocks.0.mlp", "activation_bytes", 1.10)
    d = report.diff(gpt_profile, new)
    (mod,) = [m for m in d.modules if m.changed]
    (change,) = [c for c in mod.changes if c.delta_bytes]
    assert (mod.name, change.field) == ("blocks.0.mlp", "activation")
    assert change.delta_bytes == round(base_act * 1.10) - base_act
    assert change.percent == pytest.approx(10.0, abs=0.01)
    assert d.exceeds(5) and not d.exceeds(15)


def test_diff_flags_peak_growth(gpt_profile):
    new = with_peak(gpt_profile, gpt_profile.peak_bytes + gpt_profile.peak_bytes // 5)  # +20%
    d = report.diff(gpt_profile, new)
    assert d.peak.percent == pytest.approx(20.0, abs=0.01)
    assert d.exceeds(19) and not d.exceeds(21)
    assert d.regressions(19)[0].startswith("peak grew")


def test_shrinking_never_counts_as_a_regression(gpt_profile):
    new = with_peak(grown(gpt_profile, "wte", "param_bytes", 0.5), gpt_profile.peak_bytes // 2)
    d = report.diff(gpt_profile, new)
    assert d.peak.percent == pytest.approx(-50.0, abs=0.01)
    assert not d.exceeds(0)


def test_a_module_only_in_new_counts_as_grown_and_one_only_in_base_does_not(gpt_profile):
    mods = dict(gpt_profile.modules)
    extra = dataclasses.replace(mods["ln_f"], name="ln_extra")
    new = dataclasses.replace(gpt_profile, modules={**mods, "ln_extra": extra})
    d = report.diff(gpt_profile, new)
    added = next(m for m in d.modules if m.name == "ln_extra")
    assert added.status == "added" and added.grew_beyond(1000)
    assert d.exceeds(1000)
    back = report.diff(new, gpt_profile)
    assert next(m for m in back.modules if m.name == "ln_extra").status == "removed"
    assert not back.exceeds(0)


def test_growth_from_zero_has_no_percent_and_exceeds_any_threshold():
    c = report.Change("activation", 0, 10)
    assert c.percent is None and c.grew_beyond(1e9)
    assert report.Change("activation", 0, 0).percent == 0.0


def test_render_diff_json_has_the_numbers_and_the_verdict(gpt_profile):
    new = grown(gpt_profile, "blocks.1.attn", "activation_bytes", 1.5)
    out = json.loads(report.render_diff(report.diff(gpt_profile, new), format="json", fail_over=10))
    assert out["peak"]["base_bytes"] == out["peak"]["new_bytes"] == gpt_profile.peak_bytes
    mod = next(m for m in out["modules"] if m["name"] == "blocks.1.attn")
    act = next(c for c in mod["changes"] if c["field"] == "activation")
    base = gpt_profile.modules["blocks.1.attn"].activation_bytes
    assert act["base_bytes"] == base and act["new_bytes"] == round(base * 1.5)
    assert act["percent"] == pytest.approx(50.0, abs=0.01)
    assert out["exceeds"] is True and len(out["regressions"]) == 1


def test_render_diff_table_flags_rows_over_the_threshold(gpt_profile):
    new = grown(gpt_profile, "blocks.1.attn", "activation_bytes", 1.5)
    text = report.render_diff(report.diff(gpt_profile, new), fail_over=10)
    row = next(ln for ln in text.splitlines() if ln.startswith("blocks.1.attn"))
    assert "+50.0%" in row and "OVER 10%" in row
    assert "FAIL: 1 increase(s) beyond 10%" in text
    ok = report.render_diff(report.diff(gpt_profile, new), fail_over=60, format="markdown")
    assert "OK: nothing grew more than 60%." in ok and "OVER" not in ok
