"""Repeated blocks counted instead of run: the profile equals the one running every layer, to the byte."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from memprof.estimation import EstimateError, estimate
from memprof.estimation.blocks import repeated_blocks

# Op times measured on the host (forward_op_ms, recompute_fraction) differ between any two runs.
_HOST_TIMED = ("forward_op_ms", "recompute_fraction")


def _same(x, y) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(x, dict):
        return set(x) == set(y) and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


def assert_same_profile(every, counted) -> None:
    """Peak, categories, steps, timeline and every module's numbers of the two profiles agree (bytes exactly)."""
    assert counted.peak_bytes == every.peak_bytes
    assert dict(counted.peak.by_category) == dict(every.peak.by_category)
    assert dict(counted.peak.by_device) == dict(every.peak.by_device)
    assert (counted.peak.step, counted.peak.phase, counted.peak.module) == (
        every.peak.step, every.peak.phase, every.peak.module)
    assert [d.peak_bytes for d in counted.devices] == [d.peak_bytes for d in every.devices]
    for a, b in zip(every.steps, counted.steps, strict=True):
        assert _same(a.to_dict(), b.to_dict()), (a, b)
    assert len(counted.timeline) == len(every.timeline)
    for a, b in zip(every.timeline, counted.timeline):
        assert _same(a.to_dict(), b.to_dict()), (a, b)
    # What the profile assumed, host bytes and FSDP unit counts included (op-scratch counts depend on the cache).
    skip = ("estimate_seconds", "blocks", "scratch")
    assert {k: v for k, v in counted.assumptions.items() if k not in skip} == {
        k: v for k, v in every.assumptions.items() if k not in skip}
    assert list(counted.modules) == list(every.modules)
    for name, a in every.modules.items():
        da, db = a.to_dict(), counted.modules[name].to_dict()
        for f in da:
            if f not in _HOST_TIMED:
                assert _same(da[f], db[f]), (name, f, da[f], db[f])


def _llama(layers):
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(cfg)


def _ids():
    ids = torch.randint(0, 512, (2, 32))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    dict(precision="bf16-autocast", device="cuda", device_memory="H100-80GB"),
    dict(precision="fp32", device="cpu"),
    dict(precision="bf16-autocast", device="cuda", world_size=4, sharding="full"),
    dict(precision="bf16-autocast", device="cuda", world_size=2, sharding="full", offload=True),
], ids=["bf16-autocast-cuda", "fp32-cpu", "fsdp-full-4", "fsdp-offload-2"])
def test_counted_llama_blocks_give_the_every_layer_profile_to_the_byte(config):
    pytest.importorskip("transformers")  # imported before either estimate: both take the real code paths
    every = estimate(lambda: _llama(8), _ids, blocks="all", **config)
    counted = estimate(lambda: _llama(8), _ids, blocks="repeated", **config)
    assert "8 repeated blocks in model.layers" in counted.assumptions["blocks"]
    assert "blocks" not in every.assumptions
    assert_same_profile(every, counted)


def _tiny_catalog(kind):
    from memprof.estimation import Architecture

    if kind == "llama":
        return Architecture("tiny-llama", "LlamaForCausalLM", "LlamaConfig",
                            dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return Architecture("tiny-gpt2", "GPT2LMHeadModel", "GPT2Config",
                        dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=8, n_head=4))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_catalog_short_models_built_from_the_config_give_the_every_layer_profile_to_the_byte(kind):
    from memprof.estimation.blocks import catalog_layers

    pytest.importorskip("transformers")
    arch = _tiny_catalog(kind)
    assert catalog_layers(arch.build_model) in ("num_hidden_layers", "n_layer")  # its short models: from config
    config = dict(precision="bf16-autocast", device="cuda", device_memory="H100-80GB")
    every = estimate(arch.build_model, lambda: arch.make_batch(2, 32), blocks="all", **config)
    counted = estimate(arch.build_model, lambda: arch.make_batch(2, 32), blocks="repeated", **config)
    assert "8 repeated blocks" in counted.assumptions["blocks"]
    assert_same_profile(every, counted)


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).view(x.shape[0], x.shape[1], 3, 4, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(x.shape))


class _Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TwoKinds(nn.Module):
    """Attention and MLP blocks alternating in one ModuleList: two kinds of block, period 2."""

    def __init__(self, pairs=6, d=64, vocab=300):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(m for _ in range(pairs) for m in (_Attn(d), _Mlp(d)))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, targets):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _two_kinds_step(model, batch, opt):
    _, loss = model(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _tokens():
    ids = torch.randint(0, 300, (4, 48))
    return ids, ids


def test_two_kinds_of_blocks_are_found_with_their_period():
    assert repeated_blocks(TwoKinds(pairs=6)) == ("blocks", 12, 2)
    assert repeated_blocks(TwoKinds(pairs=2)) is None  # under 5 units: nothing worth counting


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    dict(precision="fp32", device="cpu"),
    dict(precision="bf16-autocast", device="cuda", device_memory="H100-80GB"),
], ids=["fp32-cpu", "bf16-autocast-cuda"])
def test_counted_alternating_blocks_give_the_every_layer_profile_to_the_byte(config):
    every = estimate(TwoKinds, _tokens, step=_two_kinds_step, blocks="all", **config)
    counted = estimate(TwoKinds, _tokens, step=_two_kinds_step, blocks="repeated", **config)
    assert "(2 kinds, period 2)" in counted.assumptions["blocks"]
    assert_same_profile(every, counted)


def test_a_model_without_enough_repeated_blocks_runs_every_layer():
    prof = estimate(lambda: TwoKinds(pairs=2), _tokens, step=_two_kinds_step, device="cpu", blocks="repeated")
    assert "blocks" not in prof.assumptions
    assert prof.modules["blocks.3"].param_bytes > 0


def test_blocks_must_be_auto_repeated_or_all():
    with pytest.raises(EstimateError, match="blocks must be"):
        estimate(TwoKinds, _tokens, blocks="some")


def test_sources_with_one_cache_key_estimate_each_configuration_once(monkeypatch):
    import memprof.estimation.sources as est
    from memprof.estimation.sources import EstimateSource

    calls = []
    real = est.estimate

    def counting(*args, **kwargs):
        calls.append(kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(est, "estimate", counting)
    key = f"test:two-kinds:{id(calls)}"

    def source(cache_key):
        return EstimateSource(lambda: TwoKinds(pairs=2), _tokens, device="cpu", step=None, cache_key=cache_key)

    def step_source(cache_key):
        return EstimateSource(lambda: TwoKinds(pairs=2), _tokens, device="cpu", step=_two_kinds_step,
                              cache_key=cache_key)

    first = step_source(key).profile("fp32")
    assert calls == ["fp32"]
    assert step_source(key).profile("fp32") is not first and calls == ["fp32"] * 2  # a user step: not shared

    a = source(key).profile("bf16")
    b = source(key).profile("bf16")  # a new source (a later planner call): the same estimate, not run again
    assert b is a and calls == ["fp32", "fp32", "bf16"]
    source(key + ":other").profile("bf16")
    assert calls == ["fp32", "fp32", "bf16", "bf16"]


class _Quirky(nn.Module):
    """Same structure in every block, but every other one keeps a wider activation (by its index)."""

    def __init__(self, index, d=64):
        super().__init__()
        self.wide = index % 2 == 1
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        h = F.gelu(self.up(x))
        if self.wide:
            h = torch.cat([h, h.sin()], dim=-1)[..., : h.shape[-1]] * 2
        return x + self.down(h)


class QuirkyStack(nn.Module):
    def __init__(self, n=12, d=64):
        super().__init__()
        self.blocks = nn.ModuleList(_Quirky(i, d) for i in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _quirky_step(model, batch, opt):
    model(batch).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_blocks_that_look_alike_but_differ_fall_back_to_every_layer():
    def batch():
        return torch.randn(8, 64)

    assert repeated_blocks(QuirkyStack()) == ("blocks", 12, 1)  # the structure cannot tell them apart
    every = estimate(QuirkyStack, batch, step=_quirky_step, device="cpu", blocks="all")
    counted = estimate(QuirkyStack, batch, step=_quirky_step, device="cpu", blocks="repeated")
    assert "blocks" not in counted.assumptions
    assert any("every layer run: repeated blocks not counted (middle blocks differ" in n for n in counted.notes)
    assert counted.peak_bytes == every.peak_bytes
    assert dict(counted.peak.by_category) == dict(every.peak.by_category)
