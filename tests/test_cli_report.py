"""``memprof report | plot | diff | gpus`` end to end with click's CliRunner, good input and bad."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from click.testing import CliRunner

from memprof.cli import main
from memprof.errors import DeviceUnavailableError
from memprof.tracking import devices
from memprof.tracking.devices import NvmlDevice
from tests import report_fixtures
from tests.report_fixtures import grown, with_peak

# session fixtures, shared with the other report/plot test files
gpt_profile = report_fixtures.gpt_profile
gpt_profile_path = report_fixtures.gpt_profile_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _nvml_present() -> bool:
    try:
        devices.nvml_devices()
    except DeviceUnavailableError:
        return False
    return True


@pytest.fixture()
def bad_files(tmp_path, gpt_profile_path):
    text = gpt_profile_path.read_text()
    files = {
        "missing": tmp_path / "nope.json",
        "truncated": tmp_path / "truncated.json",
        "schema": tmp_path / "schema.json",
        "not-json": tmp_path / "notes.json",
    }
    files["truncated"].write_text(text[: len(text) // 2])
    files["schema"].write_text(json.dumps({"schema": "memprof.profile/99", "peak": {}}))
    files["not-json"].write_text("peak: 2 GiB\n")
    return files


@pytest.mark.parametrize("command", ["report", "plot", "diff", "gpus"])
def test_every_command_has_help_with_examples(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and f"memprof {command}" in result.output


# -- report --------------------------------------------------------------------------------------------------
def test_report_prints_every_section(gpt_profile, gpt_profile_path):
    result = run("report", gpt_profile_path, "--units", "B")
    assert result.exit_code == 0, result.output
    for title in ("Summary", "Peak by category", "Steps", "Modules", "Largest tensors at the peak"):
        assert f"\n{title}\n" in "\n" + result.stdout
    assert f"{gpt_profile.peak_bytes:,} B" in result.stdout
    assert result.stderr == ""


def test_report_json_has_the_profiles_numbers(gpt_profile, gpt_profile_path):
    result = run("report", gpt_profile_path, "--format", "json", "--depth", "2", "--sort", "param")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["summary"]["peak_bytes"] == gpt_profile.peak_bytes
    assert data["summary"]["by_category"]["optimizer"] == gpt_profile.peak.by_category["optimizer"]
    rows = data["modules"]
    assert all(r["name"].count(".") <= 1 for r in rows)
    assert [r["param_bytes"] for r in rows] == sorted((r["param_bytes"] for r in rows), reverse=True)
    for r in rows:
        assert r["param_bytes"] == gpt_profile.modules[r["name"]].param_bytes


def test_report_csv_top_k(gpt_profile, gpt_profile_path):
    result = run("report", gpt_profile_path, "--format", "csv", "--top", "3", "--sort", "activation")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = sorted((m.activation_bytes for m in gpt_profile.modules.values()), reverse=True)[:3]
    assert [int(r["activation_bytes"]) for r in rows] == expected


def test_report_markdown_section(gpt_profile_path):
    result = run("report", gpt_profile_path, "--format", "markdown", "--section", "tensors")
    assert result.exit_code == 0
    assert result.stdout.startswith("## Largest tensors at the peak\n")
    assert "## Modules" not in result.stdout


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file"),
    ("truncated", "truncated JSON"),
    ("schema", "schema 'memprof.profile/99' is not supported"),
    ("not-json", "not valid JSON"),
])
def test_report_on_a_bad_file_is_one_line_and_exit_2(bad_files, kind, message):
    result = run("report", bad_files[kind])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memprof: error: ") and message in lines[0]


def test_report_unknown_sort_column_lists_the_valid_ones(gpt_profile_path):
    result = run("report", gpt_profile_path, "--sort", "weight")
    assert result.exit_code == 2
    assert "unknown sort column 'weight'" in result.stderr and "activation" in result.stderr


@pytest.mark.parametrize("args", [["--colour"], ["--format", "yaml"], ["--units", "parsecs"], ["--top", "0"]])
def test_report_bad_options_exit_2(gpt_profile_path, args):
    result = run("report", gpt_profile_path, *args)
    assert result.exit_code == 2
    assert result.stdout == ""


# -- plot ----------------------------------------------------------------------------------------------------
def test_plot_writes_the_pngs_and_prints_their_paths(gpt_profile_path, tmp_path):
    out = tmp_path / "plots"
    result = run("plot", gpt_profile_path, "--out", out, "--top", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "timeline.png"), str(out / "modules.png")]
    for name in ("timeline.png", "modules.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    assert not (out / "report.html").exists()


def test_plot_html_writes_a_self_contained_report(gpt_profile_path, tmp_path):
    result = run("plot", gpt_profile_path, "--out", tmp_path, "--html")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == str(tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text()
    assert text.count("data:image/png;base64,") == 2 and not re.search(r"https?://", text)


def test_plot_missing_profile_exit_2(bad_files, tmp_path):
    result = run("plot", bad_files["missing"], "--out", tmp_path)
    assert result.exit_code == 2 and "no such file" in result.stderr
    assert not (tmp_path / "timeline.png").exists()


# -- diff ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def grown_path(gpt_profile, tmp_path):
    """The fixture profile with blocks.0.mlp's activations +25%."""
    path = tmp_path / "grown.json"
    grown(gpt_profile, "blocks.0.mlp", "activation_bytes", 1.25).save(path)
    return path


def test_diff_exits_1_past_the_threshold(gpt_profile_path, grown_path):
    result = run("diff", gpt_profile_path, grown_path, "--fail-over", "10")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout and "blocks.0.mlp activation grew" in result.stdout


def test_diff_exits_0_within_the_threshold(gpt_profile_path, grown_path):
    result = run("diff", gpt_profile_path, grown_path, "--fail-over", "30")
    assert result.exit_code == 0, result.output
    assert "OK: nothing grew more than 30%." in result.stdout


def test_diff_without_a_threshold_always_exits_0(gpt_profile_path, grown_path):
    assert run("diff", gpt_profile_path, grown_path).exit_code == 0


def test_diff_peak_growth_trips_the_threshold(gpt_profile, gpt_profile_path, tmp_path):
    path = tmp_path / "bigger.json"
    with_peak(gpt_profile, gpt_profile.peak_bytes * 2).save(path)
    result = run("diff", gpt_profile_path, path, "--fail-over", "50", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["peak"] == {"field": "peak", "base_bytes": gpt_profile.peak_bytes,
                            "new_bytes": 2 * gpt_profile.peak_bytes, "delta_bytes": gpt_profile.peak_bytes,
                            "percent": 100.0}
    assert data["exceeds"] is True


def test_diff_json_has_the_right_numbers(gpt_profile, gpt_profile_path, grown_path):
    result = run("diff", gpt_profile_path, grown_path, "--format", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    mod = next(m for m in data["modules"] if m["name"] == "blocks.0.mlp")
    act = next(c for c in mod["changes"] if c["field"] == "activation")
    base = gpt_profile.modules["blocks.0.mlp"].activation_bytes
    assert (act["base_bytes"], act["new_bytes"]) == (base, round(base * 1.25))
    assert act["percent"] == pytest.approx(25.0, abs=0.01)
    assert "exceeds" not in data  # no threshold, no verdict


def test_diff_with_a_bad_file_exits_2(gpt_profile_path, bad_files):
    result = run("diff", gpt_profile_path, bad_files["schema"], "--fail-over", "5")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_diff_rejects_a_negative_threshold(gpt_profile_path):
    assert run("diff", gpt_profile_path, gpt_profile_path, "--fail-over", "-5").exit_code == 2


# -- gpus ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(_nvml_present(), reason="an NVIDIA driver is present")
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_gpus_without_a_driver_is_one_line_and_nonzero(fmt):
    result = run("gpus", "--format", fmt)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NVIDIA driver" in lines[0]


FAKE_GPUS = [
    NvmlDevice(0, "NVIDIA H100 80GB HBM3", 85_520_809_984, 10 * 2**30, 85_520_809_984 - 10 * 2**30,
               ((4242, 9 * 2**30),)),
    NvmlDevice(1, "NVIDIA H100 80GB HBM3", 85_520_809_984, 0, 85_520_809_984, ()),
]


def test_gpus_table_lists_each_gpu(monkeypatch):
    monkeypatch.setattr(devices, "nvml_devices", lambda: FAKE_GPUS)
    result = run("gpus")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4  # header, rule, two GPUs
    assert "79.65 GiB" in lines[2] and "10.00 GiB" in lines[2] and "4242 (9.00 GiB)" in lines[2]


def test_gpus_json_has_bytes_as_ints(monkeypatch):
    monkeypatch.setattr(devices, "nvml_devices", lambda: FAKE_GPUS)
    result = run("gpus", "--format", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [d["total_bytes"] for d in data] == [85_520_809_984] * 2
    assert data[0]["processes"] == [{"pid": 4242, "used_bytes": 9 * 2**30}]
    assert data[1]["free_bytes"] == 85_520_809_984
