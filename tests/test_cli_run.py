"""``memprof run`` end to end with click's CliRunner: the script owns stdout and its exit code; memprof
prints to stderr; bad usage is exit 2 with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import memprof
from memprof.cli import main
from tests.fixtures import train_script

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
TRAIN_SCRIPT = FIXTURES / "train_script.py"
FAILING_SCRIPT = FIXTURES / "failing_script.py"


def run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_help_has_examples():
    result = run("--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "memprof run train.py --lr 3e-4" in result.output


def test_run_writes_the_profile_and_prints_the_summary_to_stderr(tmp_path):
    out = tmp_path / "prof.json"
    result = run("--out", out, TRAIN_SCRIPT, "--steps", "3")
    assert result.exit_code == 0, result.output
    losses = train_script.train(train_script.parse_args(["--steps", "3"]))  # the same script, run plainly
    assert result.stdout.splitlines() == ["argv: ['--steps', '3']", *(f"step {i} loss {x:.4f}"
                                                                      for i, x in enumerate(losses))]
    prof = memprof.load(out)
    assert len(prof.steps) == 2  # memprof's default --steps
    assert "\nSummary\n" in "\n" + result.stderr and "Peak by category" in result.stderr
    assert f"Peak         {memprof.units.format_bytes(prof.peak_bytes)}" in result.stderr
    assert result.stderr.rstrip().endswith(f"memprof: profile written to {out} (details: memprof report {out})")


def test_everything_after_the_script_goes_to_the_script(tmp_path):
    result = run("--out", tmp_path / "p.json", TRAIN_SCRIPT, "--steps", "1", "--lr", "3e-4", "-m", "hi",
                 "--out", "x")
    # the script's argparse rejects --out: proof that memprof did not take it (nor --steps, nor -m)
    assert result.exit_code == 2
    assert "unrecognized arguments: --out x" in result.stderr
    result = run("--out", tmp_path / "p.json", TRAIN_SCRIPT, "--steps", "1", "--lr", "3e-4", "-m", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == ["argv: ['--steps', '1', '--lr', '3e-4', '-m', 'hi']", "message: hi"]
    assert len(memprof.load(tmp_path / "p.json").steps) == 1  # the script ran one step


def test_module_runs_with_dash_m(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "p.json"
    result = run("--steps", "1", "--out", out, "-m", "tests.fixtures.train_pkg", "--steps", "2", "-m", "pkg")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:3] == ["running as __main__", "argv: ['--steps', '2', '-m', 'pkg']",
                                              "message: pkg"]
    assert len(memprof.load(out).steps) == 1


def test_the_scripts_own_exit_code_passes_through(tmp_path):
    result = run("--out", tmp_path / "p.json", TRAIN_SCRIPT, "--steps", "1", "--exit-code", "3")
    assert result.exit_code == 3
    assert (tmp_path / "p.json").exists() and "memprof: profile written to" in result.stderr


def test_a_script_that_raises_exits_1_with_its_traceback_and_a_partial_profile(tmp_path):
    out = tmp_path / "p.json"
    result = run("--out", out, FAILING_SCRIPT, "--fail", "error")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2:] == ["ValueError: loss is nan", f"memprof: partial profile written to {out}"]
    package = str(Path(memprof.__file__).resolve().parent)  # no frame of memprof's own code, wherever it lives
    assert "runpy" not in result.stderr and package not in "\n".join(lines[:-1])
    assert len(memprof.load(out).steps) == 1


@pytest.mark.parametrize("args, message", [
    (["nope.py"], "memprof: error: nope.py: no such script file"),
    (["-m", "no_such_module_xyz"], "memprof: error: no module named 'no_such_module_xyz'"),
    (["--device-memory", "lots", "x.py"], "memprof: error: not a memory size: 'lots'"),
    (["--device-memory", "0", "x.py"], "memprof: error: --device-memory must be more than 0 bytes, got '0'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0].startswith(message) and len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--stepz", "3", TRAIN_SCRIPT], "No such option '--stepz'. Did you mean '--steps'?"),
    (["--frobnicate", TRAIN_SCRIPT], "No such option '--frobnicate'"),
    ([], "missing the script to run"),
])
def test_unknown_option_before_the_script_is_a_usage_error(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr and "(see main run --help)" in result.stderr  # "main": CliRunner's prog name
    assert result.stderr.count("\n") == 1  # one line
