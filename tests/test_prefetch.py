"""Estimates made ahead in worker processes are the ones the planner makes itself."""

import os

import pytest

from memprof.estimation import Architecture
from memprof.estimation.prefetch import workers_for
from memprof.estimation.sources import EstimateSource

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


def test_workers_only_where_a_core_is_free_or_asked_for_and_not_for_few_estimates(monkeypatch):
    monkeypatch.delenv("MEMPROF_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))  # both cores busy
    assert workers_for(_source(), 20) == 0
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # the planner alone: a core is free
    assert workers_for(_source(), 20) == 2
    monkeypatch.setenv("MEMPROF_WORKERS", "1")
    assert workers_for(_source(), 20) == 0
    monkeypatch.setenv("MEMPROF_WORKERS", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert workers_for(_source(), 20) == 2  # asked for: whatever the load
    assert workers_for(_source(), 2) == 0
    cpu = _source()
    cpu.device = "cpu"  # CPU estimates measure op scratch on the real kernels: in the planner's process
    assert workers_for(cpu, 20) == 0
    assert os.environ.get("MEMPROF_WORKERS") == "2"
