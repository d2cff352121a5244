"""Loss-head chunking (memprof.policy.loss_head) on a nanoGPT-style model, an HF Llama and a loop that
computes its loss outside the model: numerics against the plain step, peaks against the CPU allocator."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memprof
from memprof.errors import MemprofError
from memprof.policy.loss_head import DeferredLogits, LossHeadError, chunk_loss_head
from memprof.tracking.groundtruth import allocator_peak, live_bytes
from tests.fixtures.nanogpt_model import GPT, GPTConfig

VOCAB = 8192
NANO = GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, dropout=0.1)


def _batch(n=8, t=64, vocab=VOCAB):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (n, t), generator=g)


def _nano_step(model, x, y):
    torch.manual_seed(7)  # the same dropout masks in both runs
    logits, loss = model(x, y)
    loss.backward()
    return loss.detach(), logits


def _assert_same_grads(a: nn.Module, b: nn.Module, rtol=1e-5, atol=1e-7):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)


def _nano_pair():
    torch.manual_seed(0)
    plain = GPT(NANO)
    return plain, copy.deepcopy(plain)


@pytest.mark.parametrize("recompute", [False, True])  # gradients made in the loss's forward, or recomputed
def test_nanogpt_chunked_loss_and_gradients_equal_the_plain_step_with_dropout_on(recompute):
    plain, chunked = _nano_pair()
    x, y = _batch()
    want, _ = _nano_step(plain, x, y)
    handle = chunk_loss_head(chunked, chunk_tokens=100, recompute=recompute)  # 5 full chunks and a partial one
    got, logits = _nano_step(chunked, x, y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    _assert_same_grads(plain, chunked)
    assert (handle.chunked, handle.materialised) == (1, 0)
    assert isinstance(logits, DeferredLogits) and logits.shape == (8, 64, VOCAB) and logits.dtype == torch.float32


@pytest.mark.parametrize("recompute", [False, True])
def test_nanogpt_chunked_step_peak_drops_by_at_least_the_logits_and_their_gradient(recompute):
    plain, chunked = _nano_pair()
    x, y = _batch()
    plain_peak, _ = allocator_peak(lambda: _nano_step(plain, x, y))
    chunk_loss_head(chunked, chunk_tokens=128, recompute=recompute)
    chunked_peak, _ = allocator_peak(lambda: _nano_step(chunked, x, y))
    logits_bytes = 8 * 64 * VOCAB * 4
    # Plain holds the logits and their gradient (and log-softmax) at once; chunked holds a few chunks' worth.
    chunk_bytes = 128 * VOCAB * 4
    assert plain_peak - chunked_peak >= 2 * logits_bytes - 4 * chunk_bytes, (plain_peak, chunked_peak)


def test_under_bf16_autocast_the_chunked_step_matches_the_plain_one():
    plain, chunked = _nano_pair()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = _nano_step(plain, x, y)
    chunk_loss_head(chunked, chunk_tokens=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = _nano_step(chunked, x, y)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    _assert_same_grads(plain, chunked, rtol=2e-2, atol=1e-4)


def _llama(vocab=32000):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_hf_llama_with_labels_chunked_equals_plain_and_the_tracker_equals_the_allocator():
    plain = _llama()
    chunked = copy.deepcopy(plain)
    x = torch.randint(0, 32000, (4, 64), generator=torch.Generator().manual_seed(2))
    x[0, :10] = -100  # ignored labels count neither in the sum nor in the mean's denominator

    def step(model):
        out = model(input_ids=x.clamp(min=0), labels=x)
        out.loss.backward()
        return out.loss.detach()

    want = step(plain)
    handle = chunk_loss_head(chunked, chunk_tokens=64)
    got = step(chunked)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    _assert_same_grads(plain, chunked, atol=1e-6)
    assert (handle.chunked, handle.materialised) == (1, 0)
    # The tracker sees the deferred logits as what they are (a 1-element placeholder): to the byte.
    chunked.zero_grad(set_to_none=True)
    before = live_bytes(list(chunked.parameters()) + list(chunked.buffers()) + [x])
    expected, _ = allocator_peak(lambda: step(chunked), before)
    chunked.zero_grad(set_to_none=True)
    with memprof.track(chunked) as tracker:
        step(chunked)
    assert tracker.profile.peak_bytes == expected
    assert handle.materialised == 0


def test_a_loop_that_computes_cross_entropy_outside_the_model_is_chunked_too():
    class Head(nn.Module):  # Lightning-style: the model returns logits, training_step computes the loss
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(32, 32)
            self.lm_head = nn.Linear(32, 4000, bias=True)

        def forward(self, x):
            return self.lm_head(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    plain = Head()
    chunked = copy.deepcopy(plain)
    x, y = torch.randn(6, 50, 32), torch.randint(0, 4000, (6, 50))
    crit = nn.CrossEntropyLoss(ignore_index=3, reduction="sum")
    for model in (plain, chunked):
        if model is chunked:
            handle = chunk_loss_head(model, chunk_tokens=64)
        logits = model(x)
        loss = crit(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        model.loss = loss.detach()
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-6, atol=0)
    _assert_same_grads(plain, chunked, atol=1e-6)
    assert (handle.chunked, handle.materialised) == (1, 0)


def test_callers_that_need_the_logits_get_the_real_values_and_are_counted():
    plain, chunked = _nano_pair()
    plain.eval(), chunked.eval()
    x, _ = _batch(2, 16)
    handle = chunk_loss_head(chunked)
    with torch.no_grad():
        want = plain(x)[0]  # nanoGPT's inference path: the head on the last position only
        got = chunked(x)[0]
        assert isinstance(got, DeferredLogits)
        torch.testing.assert_close(got[:, -1, :] / 0.8, want[:, -1, :] / 0.8)
        torch.testing.assert_close(F.softmax(got, dim=-1), F.softmax(want, dim=-1))
    assert handle.materialised == 1  # one head call, used twice: its logits computed once, when first needed
    # A loss the lever does not chunk (label smoothing) is computed on the real logits: still correct.
    plain.train(), chunked.train()
    x, y = _batch(2, 16)
    torch.manual_seed(3)
    a = F.cross_entropy(plain(x, y)[0].view(-1, VOCAB), y.view(-1), label_smoothing=0.1)
    torch.manual_seed(3)
    b = F.cross_entropy(chunked(x, y)[0].view(-1, VOCAB), y.view(-1), label_smoothing=0.1)
    torch.testing.assert_close(b, a)


def test_remove_restores_the_head_and_a_second_apply_is_refused():
    model = _nano_pair()[1]
    head = model.lm_head
    handle = chunk_loss_head(model)
    with pytest.raises(LossHeadError, match="chunked already"):
        chunk_loss_head(model)
    handle.remove()
    assert "forward" not in head.__dict__ and not hasattr(head, "_memprof_loss_head")
    x, y = _batch(2, 16)
    logits, _ = model(x, y)
    assert type(logits) is torch.Tensor
    handle.remove()  # twice is harmless
    with chunk_loss_head(model, chunk_tokens=7):
        assert isinstance(model(x, y)[0], DeferredLogits)
    assert type(model(x, y)[0]) is torch.Tensor


def test_bad_arguments_are_memprof_errors():
    model = _nano_pair()[1]
    for bad in (0, -4, 2.5, True):
        with pytest.raises(MemprofError, match="chunk_tokens"):
            chunk_loss_head(model, chunk_tokens=bad)
    with pytest.raises(LossHeadError, match="no module"):
        chunk_loss_head(model, head="nope")
    with pytest.raises(LossHeadError, match="nn.Linear"):
        chunk_loss_head(model, head="transformer.ln_f")
    with pytest.raises(LossHeadError, match="no output head"):
        chunk_loss_head(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("recompute", [False, True])
def test_the_estimator_sees_the_chunked_head_to_the_byte_of_the_real_cpu_run(recompute):
    from tests.common import real_cpu_peak

    def build():
        model = GPT(NANO)
        chunk_loss_head(model, chunk_tokens=128, recompute=recompute)
        return model

    est = memprof.estimate(build, _batch, device="cpu", blocks="all")
    assert est.peak_bytes == real_cpu_peak(build, _batch)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_the_estimator_sees_a_chunked_hf_llama_to_the_byte_of_the_real_cpu_run(precision):
    from tests.common import real_cpu_peak

    def build():
        model = _llama()
        chunk_loss_head(model, chunk_tokens=64)
        return model

    def batch():
        x = torch.randint(0, 32000, (4, 64), generator=torch.Generator().manual_seed(5))
        return {"input_ids": x, "labels": x}

    est = memprof.estimate(build, batch, device="cpu", precision=precision)
    assert est.peak_bytes == real_cpu_peak(build, batch, precision=precision)
