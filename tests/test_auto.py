"""@memprof.auto and `memprof run --policy/--budget`: plans applied to code that was not written for them."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main
from tests.common import hook_registries

FIXTURES = Path(__file__).parent / "fixtures"
GPT_SCRIPT = FIXTURES / "train_gpt.py"
sys.path.insert(0, str(FIXTURES))
from train_gpt import TinyGPT  # noqa: E402


def _measure_tiny(steps=3):
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 512, (4, 65))
    with memprof.track(model, opt) as tracker:
        for _ in range(steps):
            model(data[:, :-1], data[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracker.profile


@pytest.fixture(scope="module")
def tiny_peak():
    return _measure_tiny().peak_bytes


def _train(budget, tmp_path, steps=4):
    """A training function under @memprof.auto; returns (function, peaks of steps 3.., the model)."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 512, (4, 65))
    peaks = []  # of the steps after auto's two that ran with the plan applied

    @memprof.auto(budget=budget, profile_path=str(tmp_path / "auto.json"), plan_path=str(tmp_path / "auto.toml"))
    def train():
        for i in range(steps):
            tracker = memprof.track(model, opt) if i >= 2 else None  # measure the steps after auto's two
            planned = train.session.handle is not None  # the live check times plain steps between planned ones
            if tracker:
                tracker.start()
            model(data[:, :-1], data[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if tracker:
                tracker.stop()
                if planned:
                    peaks.append(tracker.profile.peak_bytes)
        return "done"

    return train, peaks, model, opt


def test_auto_applies_a_plan_before_the_first_step_when_it_would_not_fit(tmp_path, tiny_peak, caplog):
    budget = int(tiny_peak * 0.85)
    train, peaks, model, opt = _train(budget, tmp_path)
    before = hook_registries(model, opt)
    with caplog.at_level(logging.INFO, logger="memprof"):
        assert train() == "done"
    assert peaks and max(peaks) <= budget
    session = train.session
    assert "applied before the first step" in session.action
    assert memprof.load(tmp_path / "auto.toml").predicted_peak_bytes <= budget
    assert memprof.load(tmp_path / "auto.json").peak_bytes <= budget  # the first two steps ran planned
    assert any("memprof.auto:" in r.getMessage() for r in caplog.records)
    assert session.handle is None  # the plan was removed when train() returned
    assert hook_registries(model, opt) == before


def test_auto_changes_nothing_when_the_step_fits(tmp_path, tiny_peak):
    train, peaks, model, opt = _train(int(tiny_peak * 1.5), tmp_path)
    assert train() == "done"
    assert "nothing to change" in train.session.action
    assert all(c.mode == "keep" for c in memprof.load(tmp_path / "auto.toml").checkpoint)


def test_auto_refuses_an_impossible_budget_once_the_first_steps_are_measured(tmp_path, tiny_peak, caplog):
    train, peaks, model, opt = _train(int(tiny_peak * 0.5), tmp_path)
    before = hook_registries(model, opt)
    with caplog.at_level(logging.WARNING, logger="memprof"):
        with pytest.raises(memprof.MemprofError, match="smallest achievable peak") as refused:
            train()
    # the estimate alone is no reason to refuse (the script may save memory itself): it says so and measures
    assert any("by the estimate of the first step" in r.getMessage() for r in caplog.records)
    assert "allow sharding" not in str(refused.value) and "offload" not in str(refused.value)  # only levers auto applies
    assert peaks == []
    assert hook_registries(model, opt) == before
    with pytest.raises(memprof.MemprofError, match="cannot shard"):
        memprof.auto(budget="1GiB", levers=("sharding",))(lambda: None)


def test_run_policy_applies_a_plan_to_an_unmodified_script_and_verifies_it(tmp_path, tiny_peak):
    budget = int(tiny_peak * 0.85)
    plan = memprof.plan(_measure_tiny(), budget)
    plan.save(tmp_path / "plan.toml")
    r = CliRunner().invoke(main, ["run", "--policy", str(tmp_path / "plan.toml"), "--out", str(tmp_path / "p.json"),
                                  "--steps", "3", str(GPT_SCRIPT), "--steps", "3"])
    assert r.exit_code == 0, r.output
    measured = memprof.load(tmp_path / "p.json").peak_bytes
    assert measured <= budget
    assert abs(measured - plan.predicted_peak_bytes) <= 0.02 * plan.predicted_peak_bytes
    assert "Plan verified" in r.stderr and "predicted" in r.stderr


def test_verification_of_a_plan_without_step_times_says_so_instead_of_dividing_by_zero(tiny_peak):
    import dataclasses

    from memprof.cli.run_cmds import _verification

    prof = _measure_tiny()
    plan = memprof.plan(prof, int(tiny_peak * 0.85))
    text = _verification(plan, prof)
    assert f"{100 * (prof.peak_bytes / plan.predicted_peak_bytes - 1):+.2f}%" in text
    untimed = dataclasses.replace(plan, predicted_step_ms=0.0, baseline_step_ms=0.0, predicted_overhead=0.0)
    step_row = next(line for line in _verification(untimed, prof).splitlines() if line.startswith("step time"))
    assert "n/a" in step_row and f"{prof.steady_step_ms:.1f} ms" in step_row and "%" not in step_row


def test_run_budget_trains_stays_under_it_and_writes_plan_and_profile(tmp_path, tiny_peak):
    budget = int(tiny_peak * 0.85)
    out, plan_out = tmp_path / "p.json", tmp_path / "plan.toml"
    r = CliRunner().invoke(main, ["run", "--budget", str(budget), "--out", str(out), "--plan-out", str(plan_out),
                                  str(GPT_SCRIPT), "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert "trained 4 steps" in r.stdout
    prof, plan = memprof.load(out), memprof.load(plan_out)
    assert prof.peak_bytes <= budget  # the tracked steps ran with the plan applied
    assert plan.predicted_peak_bytes <= budget
    assert "applied before the first step" in r.stderr


def test_run_policy_with_a_plan_for_another_model_is_a_clear_error(tmp_path):
    prof = _measure_tiny()
    plan = memprof.plan(prof, int(prof.peak_bytes * 0.85))
    bad = json.loads(json.dumps(plan.to_dict()))
    bad["checkpoint"] = [{"unit": "decoder.layers.0", "mode": "full"}]
    memprof.Plan.from_dict(bad).save(tmp_path / "bad.toml")
    r = CliRunner().invoke(main, ["run", "--policy", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "p.json"),
                                  str(GPT_SCRIPT)])
    assert r.exit_code == 2
    assert "does not have: decoder.layers.0" in r.output
    r = CliRunner().invoke(main, ["run", "--policy", str(tmp_path / "p.json"), str(GPT_SCRIPT)])
    assert r.exit_code == 2


def test_auto_records_an_unfinished_check_in_the_plan_and_profile_when_the_loop_ends_during_it(tmp_path, tiny_peak):
    budget = int(tiny_peak * 0.85)
    train, peaks, model, opt = _train(budget, tmp_path, steps=4)  # the check needs ~12 more steps than this
    assert train() == "done"
    verified = memprof.load(tmp_path / "auto.toml").assumptions["verified"]
    assert verified.endswith("(unfinished)"), verified
    measured = int(verified.split("measured peak ")[1].split(" bytes")[0])
    assert measured == memprof.load(tmp_path / "auto.json").peak_bytes  # the tracked steps ran planned
    assert memprof.load(tmp_path / "auto.json").assumptions["plan_verified"] == verified
    assert train.session.handle is None
