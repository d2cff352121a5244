"""pytest-benchmark twin of experiments/overhead.py on a smaller GPT (run: pytest tests/benchmarks --benchmark-only).

Compare the two groups' medians: ``step-plain`` against ``step-memprof``.
"""

import pytest
import torch

import memprof
from memprof.zoo import GPT, GPTConfig, gpt_batch

CFG = GPTConfig(n_layer=4, n_embd=256, n_head=8, block_size=128, vocab_size=8192)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = gpt_batch(CFG, batch_size=2)

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with memprof.track(model, opt):  # calibrate op signatures once, as any process's first tracked step does
        step()
    return model, opt, step


@pytest.mark.benchmark(group="gpt-step")
def test_step_plain(benchmark, setup):
    _, _, step = setup
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)


@pytest.mark.benchmark(group="gpt-step")
def test_step_memprof(benchmark, setup):
    model, opt, step = setup

    def tracked():
        with memprof.track(model, opt):
            step()

    benchmark.pedantic(tracked, rounds=10, warmup_rounds=1)
