"""Deciding inside the user's process leaves it alone: random numbers, evaluation forwards, levers it cannot weigh.

The nanoGPT-style script (tests/fixtures/nanogpt/train.py) evaluates under ``no_grad`` at iteration 0,
returns ``(logits, loss)`` and trains with dropout on, as karpathy/nanoGPT's train.py does.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main
from memprof.policy.engine import UnweighableLeverError
from memprof.rng import rng_states
from memprof.tracking.first_forward import FirstRootForward
from memprof.zoo import GPT, GPTConfig, gpt_batch

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = ROOT / "tests" / "fixtures" / "nanogpt" / "train.py"
CFG = GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=256, dropout=0.1)


def _python(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_first_root_forward_with_grad_only_waits_for_a_forward_that_builds_a_graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    seen = []
    hook = FirstRootForward(lambda mod, args, kwargs: seen.append((mod, args[0].shape)), grad_only=True).install()
    try:
        with torch.no_grad():
            model(torch.ones(2, 4))
        with torch.inference_mode():
            model(torch.ones(3, 4))
        assert seen == []  # evaluation forwards are passed over
        model(torch.ones(5, 4))
        model(torch.ones(6, 4))
    finally:
        hook.remove()
    assert seen == [(model, torch.Size([5, 4]))]  # the first training forward, at the root, once
    plain = []
    hook = FirstRootForward(lambda mod, args, kwargs: plain.append(args[0].shape)).install()
    try:
        with torch.no_grad():
            model(torch.ones(2, 4))
    finally:
        hook.remove()
    assert plain == [torch.Size([2, 4])]  # without grad_only the first forward counts, as before


def test_an_estimate_in_the_users_process_leaves_every_global_generator_as_it_was():
    torch.manual_seed(1234)
    random.seed(99)
    np.random.seed(7)
    expected_torch, expected_py, expected_np = torch.rand(8), random.random(), np.random.rand(3)
    torch.manual_seed(1234)
    random.seed(99)
    np.random.seed(7)
    before = rng_states()
    est = memprof.estimate(lambda: GPT(CFG), lambda: gpt_batch(CFG, 2), device="cpu")  # dropout on; real scratch
    assert est.peak_bytes > 0
    after = rng_states()
    assert torch.equal(before["torch"], after["torch"]) and before["random"] == after["random"]
    assert repr(before["numpy"]) == repr(after["numpy"])
    assert torch.equal(torch.rand(8), expected_torch) and random.random() == expected_py
    assert np.array_equal(np.random.rand(3), expected_np)


@pytest.mark.slow
def test_run_budget_that_fits_leaves_a_seeded_scripts_printed_losses_identical(tmp_path):
    plain = _python(str(NANOGPT), "--max_iters=3", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    under = _python("-m", "memprof", "run", "--budget", "1GiB", str(NANOGPT), "--max_iters=3", cwd=tmp_path)
    assert under.returncode == 0, under.stderr
    losses = [line for line in plain.stdout.splitlines() if "loss" in line]
    assert len(losses) == 4  # the evaluation at iteration 0 and three training iterations
    assert [line for line in under.stdout.splitlines() if "loss" in line] == losses
    assert "fits" in under.stderr and "nothing to change" in under.stderr


def test_an_evaluation_under_no_grad_before_training_does_not_disable_the_pre_step_estimate(tmp_path):
    # 14 MiB is below this script's estimated and measured peak (~19.6 MiB): a plan is due before step 1
    r = CliRunner().invoke(main, ["run", "--budget", "14MiB", "--levers", "checkpoint", "--out",
                                  str(tmp_path / "p.json"), "--plan-out", str(tmp_path / "plan.toml"),
                                  str(NANOGPT), "--max_iters=3"])
    assert r.exit_code == 0, r.output
    assert "applied before the first step" in r.stderr
    assert "could not estimate" not in r.stderr
    assert memprof.load(tmp_path / "plan.toml").predicted_peak_bytes <= 14 * 2**20


BRANCHY = '''
import torch
class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    def forward(self, x):
        h = self.a(x)
        return (self.b(h) if h.mean().item() > -1e9 else h).square().mean()  # reads a large tensor's value
torch.manual_seed(0)
model = Branchy()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(512, 256)
for _ in range(3):
    model(x).backward(); opt.step(); opt.zero_grad()
print("done")
'''


def test_when_the_pre_step_estimate_cannot_run_one_line_on_stderr_says_why(tmp_path):
    script = tmp_path / "branchy.py"
    script.write_text(BRANCHY)
    r = CliRunner().invoke(main, ["run", "--budget", "1GiB", "--out", str(tmp_path / "p.json"),
                                  "--plan-out", str(tmp_path / "plan.toml"), str(script)])
    assert r.exit_code == 0, r.output
    assert "done" in r.stdout
    lines = [line for line in r.stderr.splitlines() if "could not estimate the first step" in line]
    assert len(lines) == 1 and "reads the value of a large tensor" in lines[0], r.stderr


@pytest.fixture(scope="module")
def measured_profile(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = gpt_batch(CFG, 2)
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    path = tmp_path_factory.mktemp("hold") / "measured.json"
    tracker.profile.save(path)
    return path


def test_plan_refuses_a_lever_it_cannot_weigh_and_says_how_to_weigh_it(measured_profile):
    budget = str(int(memprof.load(measured_profile).peak_bytes * 0.9))
    r = CliRunner().invoke(main, ["plan", str(measured_profile), "--budget", budget, "--levers",
                                  "checkpoint,precision"])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert "--levers precision cannot be weighed" in r.output and "--model" in r.output
    with pytest.raises(UnweighableLeverError, match="precision cannot be weighed"):
        memprof.plan(memprof.load(measured_profile), int(budget), levers=("checkpoint", "precision"))


def test_plan_weighs_precision_when_the_model_is_named_on_the_command_line(measured_profile):
    budget = str(int(memprof.load(measured_profile).peak_bytes * 0.9))
    r = CliRunner().invoke(main, ["plan", str(measured_profile), "--budget", budget, "--levers",
                                  "checkpoint,precision", "--model", "tests.fixtures.tiny_models:build",
                                  "--batch-size", "2", "--format", "json"])
    assert r.exit_code == 0, r.output
    described = [f["description"] for f in json.loads(r.stdout)["frontier"]]
    assert any(not d.startswith("fp32") for d in described), described  # other precisions were weighed


def test_plan_never_imports_a_factory_named_in_a_profile(measured_profile, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "pwn.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef build():\n    return None\n")
    data = json.loads(Path(measured_profile).read_text())
    data["assumptions"]["source"] = "factory:pwn:build:pwn:build:batch=2:seq="
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)  # the folder holding pwn.py, as a downloaded profile's would
    r = CliRunner().invoke(main, ["plan", str(evil), "--budget", "1GiB", "--levers", "checkpoint,precision"])
    assert r.exit_code == 2
    assert "never imports code named in a file" in r.output and "--model pwn:build" in r.output
    assert not marker.exists() and "pwn" not in sys.modules


AUTOCAST_SCRIPT = '''
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(256, 256)
for _ in range(4):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the script's own precision, as TRL's bf16 default
        loss = model(x).float().square().mean()
    loss.backward(); opt.step(); opt.zero_grad()
print("done")
'''


def test_a_budget_the_script_already_meets_with_its_own_autocast_is_never_refused(tmp_path):
    script = tmp_path / "amp.py"
    script.write_text(AUTOCAST_SCRIPT)
    measured = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "m.json"), str(script)])
    assert measured.exit_code == 0, measured.output
    peak = memprof.load(tmp_path / "m.json").peak_bytes
    budget = str(int(peak * 1.01))  # what the script already meets in bf16 autocast (an fp32 estimate would not)
    r = CliRunner().invoke(main, ["run", "--budget", budget, "--out", str(tmp_path / "p.json"), "--plan-out",
                                  str(tmp_path / "plan.toml"), str(script)])
    assert r.exit_code == 0, r.output
    assert "done" in r.stdout and "nothing to change" in r.stderr
    plan = memprof.load(tmp_path / "plan.toml")
    assert plan.precision == "bf16-autocast" and all(c.mode == "keep" for c in plan.checkpoint)
