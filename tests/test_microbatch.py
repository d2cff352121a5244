"""Micro-batching with gradient accumulation (memprof.policy.microbatch): the accumulated gradient equals
the full batch's (nanoGPT-style, HF labels with ignored tokens, uneven slices), the peak falls with k, and
the estimator sees the micro-batched step to the byte of the real run."""

import copy

import pytest
import torch

import memprof
from memprof.policy.microbatch import MicrobatchError, microbatched, split_batch
from memprof.training import default_step
from tests.common import real_cpu_peak
from tests.fixtures.nanogpt_model import GPT, GPTConfig

NANO = GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def _grads_after(step, model, batch):
    """The gradients the optimizer steps with (captured by a step pre-hook), after one training step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, kw: seen.update({n: p.grad.clone()
                                                              for n, p in model.named_parameters()}))
    step(model, batch, opt)
    return seen


def _assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=atol, msg=n)


@pytest.mark.parametrize("k,n", [(4, 8), (2, 5)])  # even, and uneven (3 + 2) slices
def test_nanogpt_accumulated_gradient_equals_the_full_batch(k, n):
    torch.manual_seed(0)
    model = GPT(NANO)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 512, (n, 32), generator=g), torch.randint(0, 512, (n, 32), generator=g))
    full = _grads_after(default_step, copy.deepcopy(model), batch)
    micro = _grads_after(microbatched(k), copy.deepcopy(model), batch)
    _assert_same(full, micro)


def test_hf_llama_with_ignored_labels_accumulated_gradient_equals_the_full_batch():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :20] = -100  # slices with very different numbers of counted tokens
    labels[3:, 12:] = -100
    batch = {"input_ids": ids, "labels": labels}
    full = _grads_after(default_step, copy.deepcopy(model), batch)
    micro = _grads_after(microbatched(3), copy.deepcopy(model), batch)
    _assert_same(full, micro)


def _build():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64, dropout=0.1))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 512, (8, 64), generator=g), torch.randint(0, 512, (8, 64), generator=g)


def test_the_peak_falls_with_k_and_the_estimator_sees_it_to_the_byte():
    peaks = {}
    for k in (1, 2, 4):
        step = microbatched(k)
        peaks[k] = real_cpu_peak(_build, _batch, step=step)
        est = memprof.estimate(_build, _batch, step=step, device="cpu", blocks="all")
        assert est.peak_bytes == peaks[k], k
    assert peaks[4] < peaks[2] < peaks[1]
    assert real_cpu_peak(_build, _batch) == peaks[1]  # k=1 is the default step


def test_bad_micro_batch_counts_are_memprof_errors():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MicrobatchError, match="positive integer"):
            microbatched(bad)
    with pytest.raises(MicrobatchError, match="batch of 2 cannot"):
        split_batch(torch.zeros(2, 3), 4)
    with pytest.raises(MicrobatchError, match="no tensor"):
        split_batch({"x": 3}, 2)
    parts = split_batch({"x": torch.arange(6).view(6, 1), "scale": torch.tensor(2.0), "flag": True}, 3)
    assert [p["x"].flatten().tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert all(p["flag"] is True and p["scale"].item() == 2.0 for p in parts)
