"""The planner's loss-head lever: weighed on estimates of the chunked model, chosen when only it fits, applied
by memprof.apply and undone by remove(); measured on the real step against the plan's prediction."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import memprof
from memprof.errors import MemprofError
from memprof.estimation.sources import EstimateSource
from memprof.plans import load_plan
from memprof.policy.chain_problem import InfeasibleBudget
from memprof.policy.engine import UnweighableLeverError, plan
from memprof.policy.loss_head import chunk_loss_head
from tests.fixtures.nanogpt_model import GPT, GPTConfig

VOCAB = 8192
NANO = GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
CHUNK = 128


def _build():
    torch.manual_seed(0)
    return GPT(NANO)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (8, 64), generator=g), torch.randint(0, VOCAB, (8, 64), generator=g)


def _step(model, opt, batch):
    x, y = batch
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _measured(model, steps=3):
    """The tracker's profile of the model's steady steps (the tracker equals the CPU allocator)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = _batch()
    _step(model, opt, batch)  # optimizer state exists
    with memprof.track(model, opt) as tracker:
        for _ in range(steps - 1):
            _step(model, opt, batch)
    return tracker.profile


@pytest.fixture(scope="module")
def planned():
    prof = _measured(_build())
    source = EstimateSource(_build, _batch, device="cpu", description="nano")
    chunked = source.derived(lambda m: (chunk_loss_head(m, chunk_tokens=CHUNK), m)[1], "chunked").profile("fp32")
    budget = chunked.peak_bytes  # the chunked step fits as it is; without chunking no checkpointing gets there
    return prof, source, chunked, budget


def test_a_budget_only_the_chunked_head_meets_gets_a_plan_that_chunks_it(planned):
    prof, source, chunked, budget = planned
    with pytest.raises(InfeasibleBudget):
        plan(prof, budget, levers=("checkpoint",))
    p = plan(prof, budget, levers=("checkpoint", "loss-head"), source=source, loss_head_chunk_tokens=CHUNK)
    assert p.loss_head_chunk_tokens == CHUNK and p.levers == ("checkpoint", "loss-head")
    assert p.predicted_peak_bytes <= budget
    assert any(line.startswith(f"Loss head chunked by {CHUNK} tokens") for line in p.explanation)
    assert any(x.startswith("Chosen:") and f"loss head chunked by {CHUNK} tokens" in x for x in p.explanation)


def test_the_applied_plan_measures_its_predicted_peak(planned):
    prof, source, chunked, budget = planned
    p = plan(prof, budget, levers=("checkpoint", "loss-head"), source=source, loss_head_chunk_tokens=CHUNK)
    model = _build()
    handle = memprof.apply(model, p)
    measured = _measured(model)
    assert measured.peak_bytes <= budget
    assert abs(measured.peak_bytes / p.predicted_peak_bytes - 1) <= 0.01, (measured.peak_bytes, p.predicted_peak_bytes)
    head = model.lm_head
    assert "forward" in head.__dict__
    handle.remove()
    assert "forward" not in head.__dict__  # the class's forward again
    assert _measured(model).peak_bytes == prof.peak_bytes  # and the step is the plain one again, to the byte


def test_with_room_to_spare_the_head_is_left_as_written(planned):
    prof, source, _, _ = planned
    p = plan(prof, prof.peak_bytes, levers=("checkpoint", "loss-head"), source=source, loss_head_chunk_tokens=CHUNK)
    assert p.loss_head_chunk_tokens == 0 and all(c.mode == "keep" for c in p.checkpoint)


def test_the_lever_needs_a_model_to_estimate_and_a_head_to_chunk(planned):
    prof, _, _, budget = planned
    with pytest.raises(UnweighableLeverError):
        plan(prof, budget, levers=("checkpoint", "loss-head"))

    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x.pow(2).mean()

    def build():
        torch.manual_seed(0)
        return NoHead()

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 16)
    with memprof.track(model, opt) as tracker:
        model(x).backward()
        opt.step()
    src = EstimateSource(build, lambda: torch.randn(4, 16), device="cpu", optimizer="sgd")
    p = plan(tracker.profile, tracker.profile.peak_bytes, levers=("checkpoint", "loss-head"), source=src)
    assert p.loss_head_chunk_tokens == 0
    assert any("loss-head not weighed" in line and "no output head" in line
               for line in p.explanation + tuple(p.assumptions.values()))


def test_the_plan_file_keeps_the_chunk_and_an_older_file_without_it_loads_as_unchunked(planned, tmp_path):
    prof, source, _, budget = planned
    p = plan(prof, budget, levers=("checkpoint", "loss-head"), source=source, loss_head_chunk_tokens=CHUNK)
    path = p.save(tmp_path / "p.toml")
    assert f"loss_head_chunk_tokens = {CHUNK}" in path.read_text()
    assert load_plan(path) == p
    older = tmp_path / "older.toml"
    older.write_text("\n".join(line for line in path.read_text().splitlines()
                               if not line.startswith("loss_head_chunk_tokens")).replace('"loss-head"', '"precision"'))
    assert load_plan(older).loss_head_chunk_tokens == 0
    with pytest.raises(MemprofError, match="loss_head_chunk_tokens"):
        dataclasses.replace(p, loss_head_chunk_tokens=-1)


def cli_build():
    """``--model tests.test_loss_head_plan:cli_build``: the head-heavy nanoGPT of these tests."""
    return _build()


def cli_batch(batch_size, seq_len=None):
    g = torch.Generator().manual_seed(2)
    t = seq_len or NANO.block_size
    return (torch.randint(0, VOCAB, (batch_size, t), generator=g), torch.randint(0, VOCAB, (batch_size, t), generator=g))


def test_memprof_plan_weighs_the_lever_on_the_named_model_and_writes_the_chunk(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from memprof.cli import main
    from memprof.policy.loss_head import chunk_tokens_for

    monkeypatch.chdir(tmp_path)
    model = "tests.test_loss_head_plan:cli_build"
    common = ["--model", model, "--batch", "tests.test_loss_head_plan:cli_batch", "--batch-size", "32"]
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    r = CliRunner().invoke(main, ["estimate", *common, "--device", "cpu", "--out", "est.json"])
    assert r.exit_code == 0, r.output
    source = EstimateSource(cli_build, lambda: cli_batch(32), device="cpu")
    budget = source.derived(lambda m: (chunk_loss_head(m), m)[1], "chunked").profile("fp32").peak_bytes
    r = CliRunner().invoke(main, ["plan", "est.json", "--budget", str(budget), "--levers", "checkpoint,loss-head",
                                  *common, "--out", "plan.toml"])
    assert r.exit_code == 0, r.output
    p = load_plan(tmp_path / "plan.toml")
    # the chunk picked for the step's tokens (32 x 64: 2048, so 512 leaves four chunks)
    assert p.loss_head_chunk_tokens == chunk_tokens_for(memprof.load(tmp_path / "est.json")) == 512
    assert p.predicted_peak_bytes <= budget
    r = CliRunner().invoke(main, ["plan", "est.json", "--budget", str(budget), "--levers", "checkpoint"])
    assert r.exit_code == 2 and "no plan fits" in r.output
