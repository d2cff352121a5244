"""Loss-head chunking on the live path (run --budget, @memprof.auto) and the levers that path refuses.

The head-heavy models here are nanoGPT's (tests/fixtures/nanogpt_model.py, tests/fixtures/nanogpt/train.py):
their peak is the logits and the loss's temporaries, which checkpointing cannot reach and chunking can.
Peaks are the tracker's, which equals the CPU allocator to the byte (tests/test_accuracy.py).
"""

import dataclasses
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import memprof
from memprof.cli import main
from memprof.errors import MemprofError
from memprof.policy.calibrate import Calibration, variant_plan
from memprof.policy.engine import plan
from memprof.policy.loss_head import chunk_loss_head, chunk_tokens_for
from memprof.policy.variants import StepVariant
from tests.fixtures.nanogpt_model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = ROOT / "tests" / "fixtures" / "nanogpt" / "train.py"
# 8 x 64 = 512 tokens a step, a 8192-word vocabulary: the logits hold most of the peak
HEAVY = GPTConfig(block_size=64, vocab_size=8192, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def _model():
    torch.manual_seed(0)
    return GPT(HEAVY)


def _batch(rows=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, HEAVY.vocab_size, (rows, 64), generator=g),
            torch.randint(0, HEAVY.vocab_size, (rows, 64), generator=g))


def _step(model, opt, batch):
    _, loss = model(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _steady_peak(model, batch=None):
    """The tracked peak of two steady steps (optimizer state made by a first, untracked step)."""
    batch = batch or _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _step(model, opt, batch)
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            _step(model, opt, batch)
    return tracker.profile


@pytest.fixture(scope="module")
def heavy_profile():
    return _steady_peak(_model())


# -- refusals ------------------------------------------------------------------------------------------------

@pytest.fixture
def script(tmp_path):
    """A script that leaves a mark if it runs at all."""
    path = tmp_path / "train.py"
    path.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    return path


@pytest.mark.parametrize("lever, says", [
    ("micro-batches", "--gradient_accumulation_steps"),
    ("optimizer-in-backward", "memprof.apply(model, plan, optimizer=opt)"),
    ("bf16-moments", "memprof.apply(model, plan, optimizer=opt)"),
    ("activation-offload", "memprof run --policy PLAN.toml"),
])
def test_run_budget_refuses_a_lever_it_cannot_apply_to_a_running_script_in_one_line(tmp_path, script, lever, says):
    r = CliRunner().invoke(main, ["run", "--budget", "1GiB", "--levers", f"checkpoint,{lever}", "--out",
                                  str(tmp_path / "p.json"), str(script)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memprof: error: --budget ") and says in lines[0], r.output
    assert not (tmp_path / "ran").exists() and not (tmp_path / "p.json").exists()
    with pytest.raises(MemprofError, match="@memprof.auto"):
        memprof.auto(lambda: None, budget="1GiB", levers=("checkpoint", lever))


@pytest.mark.parametrize("change, says", [
    ({"micro_batches": 2}, "gradient accumulation to 2"),
    ({"optimizer_in_backward": True}, "the optimizer step in backward"),
    ({"bf16_moments": True}, "bf16 optimizer moments"),
])
def test_run_policy_refuses_a_plan_for_the_scripts_loop_or_optimizer_before_it_runs(tmp_path, script, change, says,
                                                                                    heavy_profile):
    prof = heavy_profile
    made = dataclasses.replace(plan(prof, prof.peak_bytes), **change)
    made.save(tmp_path / "plan.toml")
    before = (tmp_path / "plan.toml").read_bytes()
    r = CliRunner().invoke(main, ["run", "--policy", str(tmp_path / "plan.toml"), "--out", str(tmp_path / "p.json"),
                                  str(script)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memprof: error: ") and says in lines[0], r.output
    assert not (tmp_path / "ran").exists() and not (tmp_path / "p.json").exists()
    assert (tmp_path / "plan.toml").read_bytes() == before


# -- the chunk ----------------------------------------------------------------------------------------------

def test_the_live_chunk_leaves_at_least_four_chunks_in_a_step(heavy_profile):
    assert chunk_tokens_for(heavy_profile) == 128  # 512 tokens: 1024 halved three times
    assert chunk_tokens_for(_steady_peak(_model(), _batch(rows=64))) == 1024  # 4096 tokens: the planner's default
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    with memprof.track(tiny, opt) as tracker:
        for _ in range(2):
            tiny(torch.ones(4, 8)).sum().backward()
            opt.step()
    assert chunk_tokens_for(tracker.profile) == 1024  # no loss head: the default


# -- calibration ----------------------------------------------------------------------------------------------

class StubSession:
    """What Calibration needs of a session: apply and remove plans on the real model."""

    def __init__(self, model):
        self.model, self.handle = model, None

    def apply_plan(self, p):
        self.handle = memprof.apply(self.model, p)

    def remove_plan(self):
        self.handle.remove()
        self.handle = None


def test_calibration_tracks_the_chunked_step_to_the_byte_and_its_time_reaches_the_plan():
    model, batch = _model(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    chunked = StepVariant(loss_head_chunk_tokens=128)
    session, done = StubSession(model), []
    cal = Calibration(session, opt, plain_profile=None, base_precision="fp32", variants=(chunked,),
                      on_done=done.append, notify=print).install()
    for _ in range(40):
        _step(model, opt, batch)
        if cal.done:
            break
    assert done == [cal] and not cal.error and session.handle is None
    # the independent expectation: the same steps tracked on a twin with its head chunked by hand
    twin = _model()
    chunk_loss_head(twin, chunk_tokens=128)
    assert cal.variant_profiles[("fp32", chunked)].peak_bytes == _steady_peak(twin, batch).peak_bytes
    assert cal.plain_profile.peak_bytes == _steady_peak(_model(), batch).peak_bytes
    assert set(cal.variant_ratios) == {chunked} and "loss head chunked by 128 tokens" in cal.describe()
    budget = cal.plain_profile.peak_bytes // 2
    made = plan(cal.plain_profile, budget, levers=("checkpoint", "loss-head"), loss_head_chunk_tokens=128,
                profiles={("fp32", "none", False, chunked): cal.variant_profiles[("fp32", chunked)]},
                variant_ratios=cal.variant_ratios)
    assert made.loss_head_chunk_tokens == 128
    assert made.predicted_peak_bytes == cal.variant_profiles[("fp32", chunked)].peak_bytes
    ratio = cal.variant_ratios[chunked]
    notes = [v for k, v in made.assumptions.items() if k.startswith("note")]
    assert any(n.startswith(f"step time of loss head chunked by 128 tokens x{ratio:.3f} measured on this device")
               for n in notes)
    assert variant_plan(chunked, "fp32").loss_head_chunk_tokens == 128


# -- @memprof.auto -----------------------------------------------------------------------------------------------

class Passthrough(torch.autograd.Function):
    """An identity on the logits, as a soft-capping or logging autograd.Function in user code would sit there."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class WrappedLogitsLM(torch.nn.Module):
    def __init__(self, vocab=4096, d=64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU())
                                          for _ in range(2))
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for block in self.blocks:
            x = x + block(x)
        logits = Passthrough.apply(self.lm_head(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def test_auto_leaves_the_loss_head_out_when_the_chunked_step_cannot_be_planned_and_trains_on(caplog):
    torch.manual_seed(0)
    model = WrappedLogitsLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randint(0, 4096, (4, 64)), torch.randint(0, 4096, (4, 64))
    twin = WrappedLogitsLM()
    twin.load_state_dict(model.state_dict())
    budget = int(0.97 * _steady_peak(twin, (x, y)).peak_bytes)  # below the estimate: a plan before step 1
    losses = []

    @memprof.auto(budget=budget, profile_path=None, plan_path=None)  # the default levers, loss-head among them
    def train():
        for _ in range(3):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

    with caplog.at_level(logging.WARNING, logger="memprof"):
        train()
    session = train.session
    # the planner leaves the variant out and says why (a note in the plan), or the session drops the lever
    said = any("loss-head not weighed" in v for v in session.plan.assumptions.values()) or any(
        "loss-head chunking left out" in r.getMessage() for r in caplog.records)
    assert said, session.plan.assumptions
    assert "applied before the first step" in session.action, session.action
    assert session.plan.loss_head_chunk_tokens == 0 and session.plan.predicted_peak_bytes <= budget
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert "forward" not in model.lm_head.__dict__

@pytest.mark.slow
def test_auto_with_the_loss_head_fits_half_the_peak_of_a_head_heavy_model_as_predicted(tmp_path):
    batch = _batch()
    plain = _steady_peak(_model(), batch).peak_bytes
    budget = plain // 2  # checkpointing both blocks alone cannot get there: the logits dominate
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    @memprof.auto(budget=budget, levers=("checkpoint", "loss-head"), profile_path=str(tmp_path / "p.json"),
                  plan_path=str(tmp_path / "plan.toml"))
    def train():
        for _ in range(120):
            _step(model, opt, batch)
            if train.session.check is not None and train.session.check.done:
                break

    train()
    session = train.session
    r, final = session.verification, session.plan
    assert r is not None and r.finished, session.action
    assert final.loss_head_chunk_tokens == session.loss_head_chunk_tokens == 128, session.action
    assert r.measured_peak_bytes <= budget < plain, r.describe()
    assert abs(r.measured_peak_bytes - r.predicted_peak_bytes) <= 0.01 * r.predicted_peak_bytes, r.describe()
    assert session.handle is None and "forward" not in model.lm_head.__dict__  # removed when train() returned
    # the plan file records the chunked head's step time measured in the loop, and the check
    saved = memprof.load(tmp_path / "plan.toml")
    assert saved.loss_head_chunk_tokens == 128 and "verified" in saved.assumptions
    assert any("loss head chunked by 128 tokens" in v and "measured on this device" in v
               for k, v in saved.assumptions.items() if k.startswith("note"))
    # the plan kept, applied to a fresh model by hand, measures what the check measured
    twin = _model()
    memprof.apply(twin, final)
    assert _steady_peak(twin, batch).peak_bytes == r.measured_peak_bytes


# -- memprof run --budget on an unmodified nanoGPT script ---------------------------------------------------------

HEAVY_FLAGS = ["--vocab_size=8192", "--n_embd=64", "--block_size=256", "--batch_size=4", "--dropout=0.0"]


def _memprof(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "memprof", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_run_budget_fits_an_unmodified_nanogpt_script_into_half_its_peak_with_the_default_levers(tmp_path):
    r = _memprof("run", "--out", "prof.json", str(NANOGPT), *HEAVY_FLAGS, "--max_iters=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plain = memprof.load(tmp_path / "prof.json").peak_bytes
    budget = plain // 2
    # no --levers: a user who names none gets the chunked head; 120 iterations leave room for calibration
    # (about 50 steps) and the live check (about 13 steps a plan)
    r = _memprof("run", "--budget", str(budget), "--plan-out", "plan.toml", "--out", "out.json", str(NANOGPT),
                 *HEAVY_FLAGS, "--max_iters=120", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "iter 119: loss" in r.stdout  # the script trained to its end
    final = memprof.load(tmp_path / "plan.toml")
    assert final.loss_head_chunk_tokens == 256  # 1024 tokens a step: a quarter of them at a time
    verified = final.assumptions["verified"]
    measured = int(verified.split("measured peak ")[1].split(" bytes")[0])
    predicted = int(verified.split("(predicted ")[1].split(")")[0])
    assert predicted == final.predicted_peak_bytes
    assert measured <= budget < plain, verified
    assert abs(measured - predicted) <= 0.01 * predicted, verified
    printed = r.stderr[r.stderr.index("Applied plan checked in the running script"):]
    assert "within the budget" in printed.splitlines()[0] and "unfinished" not in printed
    peak_row = next(line for line in printed.splitlines() if line.startswith("peak (tracked)"))
    assert f"{measured / 2**20:.2f} MiB" in peak_row and f"{predicted / 2**20:.2f} MiB" in peak_row
    time_row = next(line for line in printed.splitlines() if line.startswith("step time (untracked, median)"))
    assert f"{final.predicted_step_ms:.1f} ms" in time_row and "ms planned" in time_row
    assert any("loss head chunked by 256 tokens" in v and "measured on this device" in v
               for k, v in final.assumptions.items() if k.startswith("note"))
