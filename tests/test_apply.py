"""Applying plans: numerics unchanged, the model's identity kept, and nothing left after remove()."""

import copy
import dataclasses

import pytest
import torch

import memprof
from memprof.plans import CheckpointChoice, Plan, Sharding, Source
from memprof.policy.apply import ApplyError, apply
from memprof.zoo import GPT, GPTConfig, gpt_batch
from tests.common import hook_registries

CFG = GPTConfig(n_layer=4, n_embd=64, n_head=4, block_size=32, vocab_size=300, dropout=0.1)


def _plan(modes, precision="fp32", strategy="none", world_size=1):
    return Plan(
        created="2026-01-01T00:00:00+00:00", memprof_version="test", budget_bytes=1 << 30, world_size=world_size,
        device="", levers=("checkpoint",), predicted_peak_bytes=1, baseline_step_ms=1.0, predicted_step_ms=1.0,
        predicted_overhead=0.0, precision=precision,
        sharding=Sharding(strategy=strategy, reshard_after_forward=True, offload_optimizer=False,
                          shard_group_size=world_size),
        checkpoint=tuple(CheckpointChoice(f"blocks.{i}", m) for i, m in enumerate(modes)),
        source=Source(profile_hash="sha256:0", model="", estimated=False),
    )


def _grads(model, x, y, seed=1234):
    torch.manual_seed(seed)  # dropout masks
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("modes", [["full"] * 4, ["selective"] * 4, ["full", "keep", "selective", "full"]])
def test_gradients_with_dropout_equal_those_without_the_plan(modes):
    torch.manual_seed(0)
    model = GPT(CFG)
    model.train()
    x, y = gpt_batch(CFG, 2)
    expected = _grads(model, x, y)
    with apply(model, _plan(modes)) as handle:
        assert handle.units == {f"blocks.{i}": m for i, m in enumerate(modes) if m != "keep"}
        got = _grads(model, x, y)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_state_dict_parameters_and_optimizer_are_untouched_and_remove_leaves_no_trace():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    before = hook_registries(model, opt)
    x, y = gpt_batch(CFG, 2)
    handle = apply(model, _plan(["full", "selective", "full", "keep"], precision="bf16-autocast"))
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    model(x, y).backward()
    opt.step()  # the optimizer made before apply still steps the same parameters
    handle.remove()
    assert hook_registries(model, opt) == before
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model(x, y).dtype == torch.float32  # autocast is gone


def test_autocast_plan_runs_forward_in_bf16():
    torch.manual_seed(0)
    model = GPT(CFG)
    x, _ = gpt_batch(CFG, 2)
    with apply(model, _plan(["keep"] * 4, precision="bf16-autocast")):
        assert model(x).dtype == torch.bfloat16
    assert model(x).dtype == torch.float32


def test_bf16_parameters_plan_casts_and_remove_casts_back():
    model = GPT(CFG)
    with apply(model, _plan(["keep"] * 4, precision="bf16")):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fp16_autocast_scales_the_loss_without_changing_the_training_loop():
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, dropout=0.0))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = gpt_batch(CFG, 2)
    with pytest.raises(ApplyError, match="needs the optimizer"):
        apply(model, _plan(["keep"] * 4, precision="fp16-autocast"))
    with apply(model, _plan(["keep"] * 4, precision="fp16-autocast"), optimizer=opt):
        assert "step" in opt.__dict__  # the step that unscales, skips on inf and updates the scale
        loss = model(x, y)
        loss.backward()
        grad = model.lm_head.weight.grad.abs().max().item()
        opt.step()
        opt.zero_grad()
    assert "step" not in opt.__dict__  # restored
    # Parameters moved, and by an unscaled step: close to a plain fp32 SGD step.
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(x, y).backward()
    assert grad > 1000 * ref.lm_head.weight.grad.abs().max().item()  # backward ran on the scaled loss
    ref_opt.step()
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())]
    assert max(moved) < 1e-2


def test_a_plan_naming_missing_modules_lists_them():
    model = GPT(CFG)
    plan = dataclasses.replace(_plan(["full"] * 4), checkpoint=(CheckpointChoice("blocks.9", "full"),
                                                              CheckpointChoice("decoder.*", "full")))
    before = hook_registries(model)
    with pytest.raises(ApplyError, match="does not have: blocks.9, decoder.\\*"):
        apply(model, plan)
    assert hook_registries(model) == before and all("forward" not in m.__dict__ for m in model.modules())


def test_sharded_plan_needs_a_process_group_of_its_world_size():
    model = GPT(CFG)
    with pytest.raises(ApplyError, match="no torch.distributed process group"):
        apply(model, _plan(["keep"] * 4, strategy="full", world_size=2))


def test_patterns_and_class_names_select_units():
    model = GPT(CFG)
    plan = dataclasses.replace(_plan(["full"]), checkpoint=(CheckpointChoice("Block", "selective"),))
    with apply(model, plan) as handle:
        assert handle.units == {f"blocks.{i}": "selective" for i in range(4)}


def test_apply_rejects_non_modules_and_non_plans():
    with pytest.raises(ApplyError, match="needs an nn.Module"):
        apply("model", _plan([]))
    with pytest.raises(ApplyError, match="needs a memprof Plan"):
        apply(GPT(CFG), {"precision": "fp32"})
    assert memprof.MemprofError in ApplyError.__mro__
