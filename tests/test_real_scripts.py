"""``memprof run --budget`` on training scripts written the way their projects write them (tests/fixtures).

Each script runs in a fresh interpreter, as a user would run it, with a budget below its plain peak (about 85%
of the peak measured on it; memprof's own line "measured/estimated X > budget" shows the plan was needed).
The expectation is the live check's own measurement of the applied steps (tracked, equal to the allocator on
CPU): at most the budget and within 1% of the peak the kept plan predicted.

Before the plan is made, the loop's own steps are tracked (plain and in bf16-autocast) and timed
(memprof.policy.calibrate): the plan's peak comes from them, whatever the loop does around the model. The
checkpoint lever is tested on every script that has units to checkpoint; the precision lever alone on the
three where bf16-autocast reaches the budget (its step time is the live check's business). TRL's SFTTrainer already checkpoints every layer and runs bf16: a budget it
meets goes through untouched; below its peak nothing run --budget applies can help, and the refusal (exit 2,
one line) must say so without advising levers it cannot apply.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import memprof

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MiB = 2**20
VERIFIED = re.compile(r"measured peak (\d+) bytes \(predicted (\d+)\)")
NEEDED = re.compile(r"memprof: (measured|estimated) [\d.]+ \w+ > budget: applied")


def _memprof_run(tmp_path, script, args, budget, levers):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "memprof", "run", "--budget", str(budget), "--levers", levers,
                           "--plan-out", str(tmp_path / "plan.toml"), "--out", str(tmp_path / "prof.json"),
                           str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _run_budget(tmp_path, script, args, budget, levers, time_may_fail=False):
    """``time_may_fail``: the plan's step time is left to the live check (a plan it drops for being slower
    than predicted on this CPU ends reverted, as it should); its measured peak is still asserted."""
    r = _memprof_run(tmp_path, script, args, budget, levers)
    plan_out = tmp_path / "plan.toml"
    assert r.returncode == 0, r.stderr[-4000:]
    assert NEEDED.search(r.stderr), r.stderr[-4000:]  # the plain step was over the budget
    assert "Applied plan checked" in r.stderr, r.stderr[-4000:]
    verified = memprof.load(plan_out).assumptions["verified"]
    assert "unfinished" not in verified, verified
    assert time_may_fail or "plain step restored" not in verified, verified
    if "plain step restored" in verified:
        assert "slow on this device" in r.stderr or "above the predicted" in r.stderr, r.stderr[-4000:]
    measured, predicted = (int(v) for v in VERIFIED.search(verified).groups())
    return measured, predicted, verified


def _assert_held(measured, predicted, budget, verified):
    assert measured <= budget, verified
    assert abs(measured - predicted) <= 0.01 * predicted, verified


@pytest.mark.slow
def test_nanogpt_script_checkpoint_plan_measures_within_budget_and_one_percent(tmp_path):
    budget = int(16.6 * MiB)  # plain peak 19.58 MiB
    m, p, v = _run_budget(tmp_path, FIXTURES / "nanogpt" / "train.py", ["--max_iters=60"], budget, "checkpoint")
    _assert_held(m, p, budget, v)


# The pre-step estimate sees the model's forward, not the loop around it: Lightning computes the loss in
# training_step (the plan made from the estimate alone measured +14.6% over its prediction), HF Trainer drops
# the model's output before backward (-9 to -18%). The plan kept is made from the loop's own tracked steps.
@pytest.mark.slow
def test_lightning_script_checkpoint_plan_measures_within_budget_and_one_percent(tmp_path):
    pytest.importorskip("lightning")  # the fixture's framework (the dev extra installs it)
    budget = int(14.4 * MiB)  # plain peak 16.99 MiB
    m, p, v = _run_budget(tmp_path, FIXTURES / "lightning_train.py", ["--max-steps", "60"], budget, "checkpoint")
    _assert_held(m, p, budget, v)


@pytest.mark.slow
def test_peft_lora_script_checkpoint_plan_measures_within_budget_and_one_percent(tmp_path):
    pytest.importorskip("peft")  # the fixture's framework (the dev extra installs it)
    budget = int(19.5 * MiB)  # plain peak 22.00 MiB; checkpointing all 3 layers reaches 18.9 MiB
    m, p, v = _run_budget(tmp_path, FIXTURES / "peft_lora_train.py", ["--steps", "60"], budget, "checkpoint")
    _assert_held(m, p, budget, v)


@pytest.mark.slow
def test_hf_trainer_script_checkpoint_plan_measures_within_budget_and_one_percent(tmp_path):
    pytest.importorskip("accelerate")  # the fixture's framework (the dev extra installs it)
    budget = int(21.3 * MiB)  # plain peak 25.06 MiB
    m, p, v = _run_budget(tmp_path, FIXTURES / "hf_trainer_train.py", ["--max_steps", "60"], budget, "checkpoint")
    _assert_held(m, p, budget, v)


# bf16-autocast peaks come from two steps of the loop tracked in bf16-autocast before the plan is made.
@pytest.mark.slow
def test_nanogpt_script_bf16_plan_measures_within_one_percent_of_prediction(tmp_path):
    budget = int(17.6 * MiB)  # plain peak 19.58 MiB; bf16-autocast alone reaches it
    m, p, v = _run_budget(tmp_path, FIXTURES / "nanogpt" / "train.py", ["--max_iters=60"], budget, "precision",
                          time_may_fail=True)
    _assert_held(m, p, budget, v)


@pytest.mark.slow
def test_lightning_script_bf16_plan_measures_within_one_percent_of_prediction(tmp_path):
    pytest.importorskip("lightning")  # the fixture's framework (the dev extra installs it)
    budget = int(14.4 * MiB)  # plain peak 16.99 MiB; bf16-autocast alone reaches 13.57 MiB, loss head included
    m, p, v = _run_budget(tmp_path, FIXTURES / "lightning_train.py", ["--max-steps", "60"], budget, "precision",
                          time_may_fail=True)
    _assert_held(m, p, budget, v)


@pytest.mark.slow
def test_peft_lora_script_bf16_plan_measures_within_one_percent_of_prediction(tmp_path):
    pytest.importorskip("peft")  # the fixture's framework (the dev extra installs it)
    budget = int(19.8 * MiB)  # plain peak 22.00 MiB; bf16-autocast alone reaches it
    m, p, v = _run_budget(tmp_path, FIXTURES / "peft_lora_train.py", ["--steps", "60"], budget, "precision",
                          time_may_fail=True)
    _assert_held(m, p, budget, v)


@pytest.mark.slow
def test_trl_sft_script_with_a_budget_it_meets_trains_untouched(tmp_path):
    pytest.importorskip("trl")  # the fixture's framework (the dev extra installs it)
    pytest.importorskip("datasets")  # the fixture's framework (the dev extra installs it)
    budget = int(42.2 * MiB)  # plain peak 41.72 MiB, with TRL's gradient checkpointing and bf16
    r = _memprof_run(tmp_path, FIXTURES / "trl_sft_train.py", ["--max_steps", "20"], budget, "checkpoint,precision")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "nothing to change" in r.stderr, r.stderr[-4000:]
    assert "train_loss" in r.stdout  # the script ran to its end


@pytest.mark.slow
def test_trl_sft_script_refusal_names_only_what_run_budget_can_apply(tmp_path):
    pytest.importorskip("trl")  # the fixture's framework (the dev extra installs it)
    pytest.importorskip("datasets")  # the fixture's framework (the dev extra installs it)
    budget = int(35.5 * MiB)  # plain peak 41.72 MiB: 83% of it are the loss head's temporaries
    r = _memprof_run(tmp_path, FIXTURES / "trl_sft_train.py", ["--max_steps", "20"], budget, "checkpoint,precision")
    refusal = [line for line in r.stderr.splitlines() if line.startswith("memprof: error:")]
    assert r.returncode == 2 and refusal, r.stderr[-4000:]
    assert "allow sharding" not in refusal[-1] and "offload" not in refusal[-1], refusal[-1]
    assert "fp32" not in refusal[-1], refusal[-1]
