"""`memprof plan` and `memprof demo` end to end."""

import json

import pytest
import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main
from memprof.zoo import GPT, GPTConfig, gpt_batch

CFG = GPTConfig(n_layer=4, n_embd=96, n_head=4, block_size=64, vocab_size=500)


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = gpt_batch(CFG, 4)
    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
    path = tmp_path_factory.mktemp("plan") / "prof.json"
    tracker.profile.save(path)
    return path


def test_plan_prints_the_plan_frontier_and_why_and_writes_toml_and_figure(profile_file, tmp_path):
    prof = memprof.load(profile_file)
    budget = int(prof.peak_bytes * 0.8)
    out, fig = tmp_path / "p.toml", tmp_path / "f.png"
    r = CliRunner().invoke(main, ["plan", str(profile_file), "--budget", str(budget), "--out", str(out),
                                  "--plot", str(fig)])
    assert r.exit_code == 0, r.output
    plan = memprof.load(out)
    assert plan.predicted_peak_bytes <= budget and plan.budget_bytes == budget
    assert "Why:" in r.stdout and "Frontier" in r.stdout and "checkpoint:" in r.stdout
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    j = CliRunner().invoke(main, ["plan", str(profile_file), "--budget", str(budget), "--format", "json"])
    assert json.loads(j.stdout)["predicted_peak_bytes"] == plan.predicted_peak_bytes


@pytest.mark.parametrize("args,message", [
    (["--budget", "1KiB"], "no plan fits"),
    (["--budget", "lots"], "unknown device 'lots'"),
    (["--budget", "1GiB", "--levers", "checkpoint,magic"], "choose from"),
    (["--budget", "1GiB", "--units", "decoder.*"], "no module of the profile matches"),
])
def test_plan_bad_input_is_one_line_and_exit_2(profile_file, args, message):
    r = CliRunner().invoke(main, ["plan", str(profile_file), *args])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output


def test_plan_refuses_files_that_are_not_profiles(tmp_path, profile_file):
    prof = memprof.load(profile_file)
    memprof.plan(prof, "1GiB").save(tmp_path / "p.toml")
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "p.toml"), "--budget", "1GiB"])
    assert r.exit_code == 2 and "not a profile" in r.output
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "missing.json"), "--budget", "1GiB"])
    assert r.exit_code == 2 and "no such file" in r.output


def test_demo_measures_plans_applies_and_measures_again(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    before, after = memprof.load(tmp_path / "before.json"), memprof.load(tmp_path / "after.json")
    plan = memprof.load(tmp_path / "plan.toml")
    assert after.peak_bytes <= plan.budget_bytes < before.peak_bytes
    assert abs(after.peak_bytes - plan.predicted_peak_bytes) <= 0.02 * plan.predicted_peak_bytes
    for name in ("timeline.png", "timeline-after.png", "modules.png", "frontier.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    assert "measured peak vs prediction" in r.output
    # the time row is the verification's: untracked steps, plain and planned in pairs (not tracked times)
    assert "step time (untracked, median of 5 pairs)" in r.output and "tracked, fastest" not in r.output


def test_every_command_has_help_with_examples():
    for command in ("demo", "run", "report", "plot", "diff", "gpus", "estimate", "plan"):
        r = CliRunner().invoke(main, [command, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output, command
    assert CliRunner().invoke(main, ["frobnicate"]).exit_code == 2
