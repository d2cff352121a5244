"""How fast the chain DP solves a 1,000-unit chain (run: pytest tests/benchmarks/test_solver_bench.py --benchmark-only).

Target: at most 1 s per solve. The numbers are a 1,000-block transformer (hidden 1024, sequence 2048, micro-batch 4,
bf16 activations, flash attention) with parameters, gradients and Adam state sharded over 8 ranks; activation bytes
per block follow Korthikanti et al. 2022 (34·s·b·h bytes kept per layer without the attention-score term).
"""

import random

import pytest

from memprof.policy.solver import ChainProblem, Option, Unit, solve_dp

GiB = 1 << 30
S, B, H = 2048, 4, 1024
SBH = S * B * H  # elements of one hidden-state tensor
PARAMS = 12 * H * H  # per block
N = 1000


def transformer_chain(n=N, budget=80 * GiB, noise=0.0, seed=0) -> ChainProblem:
    """``noise`` > 0 gives each block its own slightly different numbers (as measured profiles do)."""
    rng = random.Random(seed)

    def jitter(x):
        return int(x * (1 + rng.uniform(0, noise))) if noise else x

    def jitter_ms(x):  # timings measured to the microsecond
        return round(x * (1 + rng.uniform(-noise, noise)), 3)

    state = n * PARAMS * (2 + 2 + 12) // 8  # bf16 params + bf16 grads + fp32 master/Adam, sharded over 8 ranks
    grad = PARAMS * 2  # one block's unsharded bf16 grads, alive until reduce-scattered
    units = []
    for i in range(n):
        options = (
            Option("keep", jitter(34 * SBH), jitter(6 * SBH), 0.0),  # all activations; backward temporaries
            Option("selective", jitter(12 * SBH), jitter(28 * SBH), jitter_ms(0.12)),  # recompute the cheap ops
            Option("full", jitter(2 * SBH), jitter(40 * SBH), jitter_ms(0.55)),  # keep the input, recompute all
        )
        # in unit i's backward, units after it have produced their (sharded) grads
        base = state + grad + (n - 1 - i) * grad // 8
        units.append(Unit(f"blocks.{i}", options, base, "" if noise else "block"))
    logits = S * B * 50_304 * 4  # fp32 logits at the end of forward
    return ChainProblem(units, state + logits, budget)


@pytest.mark.benchmark(group="solver-1000-units")
def test_dp_1000_identical_blocks(benchmark):
    problem = transformer_chain()
    sol = benchmark.pedantic(solve_dp, args=(problem,), rounds=5, warmup_rounds=1)
    assert sol.peak_bytes <= problem.budget_bytes and len(sol.choices) == N


@pytest.mark.benchmark(group="solver-1000-units")
def test_dp_1000_measured_blocks(benchmark):
    problem = transformer_chain(noise=0.05)
    sol = benchmark.pedantic(solve_dp, args=(problem,), rounds=5, warmup_rounds=1)
    assert sol.peak_bytes <= problem.budget_bytes and len(sol.choices) == N
