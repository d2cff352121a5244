"""The peak in words (memprof.peak_words): a head-heavy nanoGPT's peak is named as its loss head, with the
logits' shape and the share counted by hand; the lever that removes it makes the sentence go away."""

import pytest
import torch

import memprof
from memprof.peak_words import loss_head, shape_text
from memprof.policy.loss_head import chunk_loss_head
from memprof.profiles import TensorInfo
from memprof.report import render
from memprof.training import default_step, make_optimizer
from tests.fixtures.nanogpt_model import GPT, GPTConfig

HEAVY = GPTConfig(block_size=128, vocab_size=16384, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def _profile(chunked: bool = False, cfg: GPTConfig = HEAVY):
    torch.manual_seed(0)
    model = GPT(cfg)
    if chunked:
        chunk_loss_head(model, chunk_tokens=128)
    opt = make_optimizer("adamw", model.parameters())
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, cfg.vocab_size, (4, 128), generator=g),
             torch.randint(0, cfg.vocab_size, (4, 128), generator=g))
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            default_step(model, batch, opt)
    return tracker.profile


@pytest.fixture(scope="module")
def heavy():
    return _profile()


def test_a_head_heavy_peak_is_named_as_the_loss_head_with_the_logits_shape(heavy):
    head = loss_head(heavy)
    assert head is not None and head.module == "lm_head"
    assert head.logits_shape == (512, 16384) and head.dtype == "float32"
    logits = 4 * 128 * 16384 * 4
    assert head.logits_bytes == logits
    # At the start of backward: the logits, their log-softmax (kept for cross-entropy's backward), the
    # gradient of the log-softmax and that of the logits: four tensors of the logits' size.
    assert (head.tensors, head.bytes_at_peak) == (4, 4 * logits)
    text = render(heavy, "table")
    assert "Peak is in   the loss head: lm_head's logits 512×16384 float32 (32.00 MiB)" in text
    # The backward's two logits-sized temporaries (the gradients of the log-softmax and of the logits), seen
    # by the allocation recorder by size only, carry the shape of the gradient of that size.
    rows = [line.split() for line in text.split("Largest tensors")[1].splitlines() if " backward " in line]
    assert sum(r[:5] == ["32.00", "MiB", "512×16384", "float32", "temporary"] for r in rows) == 2
    assert all(" ".join(r[-3:]) == "shape by size" for r in rows if r[2] == "512×16384")
    assert " scalar " not in text.split("Largest tensors")[1]


def test_with_the_loss_head_chunked_the_peak_is_no_longer_the_head():
    prof = _profile(chunked=True)
    assert loss_head(prof) is None
    assert "Peak is in" not in render(prof, "table")


def test_a_model_whose_head_is_small_gets_no_sentence():
    small = _profile(cfg=GPTConfig(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    assert loss_head(small) is None


def test_shapes_print_as_scalar_only_when_the_dtype_is_known():
    t = TensorInfo(bytes=4, category="temporary", module="", phase="backward", shape=(), dtype="", device="cpu")
    assert shape_text(t) == "(not recorded)"
    assert shape_text(TensorInfo(4, "activation", "", "forward", (), "float32", "cpu")) == "scalar"
    assert shape_text(TensorInfo(64, "activation", "", "forward", (4, 4), "float32", "cpu")) == "4×4"
