"""Estimates made ahead in worker processes are the ones the planner makes itself."""

import os

import pytest

from memprof.estimation import Architecture
from memprof.policy.prefetch import workers_for
from memprof.policy.sources import EstimateSource

_HOST_TIMED = ("forward_op_ms", "recompute_fraction", "estimate_seconds", "created")


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in _HOST_TIMED}
    if isinstance(d, list):
        return [_strip(x) for x in d]
    return d


def _source():
    arch = Architecture("tiny-llama", "LlamaForCausalLM", "LlamaConfig",
                        dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return EstimateSource(arch.build_model, lambda: arch.make_batch(2, 32), device="cuda",
                          device_memory="H100-80GB")


@pytest.mark.slow
def test_profiles_estimated_in_worker_processes_equal_the_ones_made_in_process(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    if workers_for(_source(), 4) < 2:
        pytest.skip("needs two usable cores, Linux and a PyTorch build without CUDA")
    keys = [("bf16-autocast", "none", 1, None, False), ("fp32", "full", 4, None, False),
            ("bf16", "shard-grad-op", 4, None, True), ("fp32", "none", 1, None, False)]
    ahead = _source()
    assert ahead.prefetch(keys) == 3  # the first sharded one is made in this process
    here = _source()  # no cache key: nothing shared, each estimate made in this process
    for key in keys:
        assert ahead.has(*key) and not here.has(*key)
        assert _strip(ahead.profile(*key).to_dict()) == _strip(here.profile(*key).to_dict()), key


def test_no_workers_unless_turned_on_or_with_too_few_estimates(monkeypatch):
    monkeypatch.delenv("MEMPROF_WORKERS", raising=False)
    assert workers_for(_source(), 20) == 0  # off by default
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    assert workers_for(_source(), 2) == 0
    cpu = _source()
    cpu.device = "cpu"  # CPU estimates measure op scratch on the real kernels: in the planner's process
    assert workers_for(cpu, 20) == 0
    assert os.environ.get("MEMPROF_WORKERS") == "2"
