"""The estimator on code written the way people write it: models that return their own loss, factories that
move and cast, PEFT LoRA, DPO. Each estimate is compared with the same model trained for real on the CPU."""

import sys

import pytest
import torch

from memprof.errors import MemprofError
from memprof.estimation import estimate
from memprof.estimation.finetune import finetune_source
from memprof.tracking import scratch
from memprof.training import CallArgs, find_loss
from tests.common import real_cpu_peak
from tests.fixtures import nanogpt_model as nanogpt


def _llama():
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(cfg)


def _llama_batch(b=2):
    ids = torch.randint(0, 1000, (b, 64))
    return {"input_ids": ids, "labels": ids}


def _real_peak(build, make_batch, step=None, precision="fp32", steps=2):
    """The tracker's peak (the allocator's, to the byte on CPU) of the model really trained."""
    return real_cpu_peak(build, make_batch, precision, step, steps)


def _estimate_and_real(build, make_batch, step=None, precision="fp32", real_build=None):
    scratch.clear_cache()  # the estimator measures op scratch itself, not from the real run's cache
    est = estimate(build, make_batch, step=step, precision=precision, device="cpu")
    scratch.clear_cache()
    return est, _real_peak(real_build or build, make_batch, step, precision)


def _within_half_a_percent(est, real):
    assert abs(est.peak_bytes - real) <= 0.005 * real, (est.peak_bytes, real)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_logits_loss_tuple_model_estimates_within_half_a_percent_with_the_default_step(precision):
    est, real = _estimate_and_real(nanogpt.build, nanogpt.make_batch, precision=precision)
    _within_half_a_percent(est, real)
    assert est.assumptions["loss"] == "the model's own loss (element 1 of its output tuple)"
    assert est.peak.phase == "backward"


def test_summing_the_logits_of_a_logits_loss_model_is_what_the_old_default_missed():
    # The loss head's memory is what output[0].sum() leaves out: that estimate is far below the real step.
    def logits_sum(model, batch, opt):
        model(*batch)[0].sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    scratch.clear_cache()
    low = estimate(nanogpt.build, nanogpt.make_batch, step=logits_sum, device="cpu")
    scratch.clear_cache()
    real = _real_peak(nanogpt.build, nanogpt.make_batch)
    assert low.peak_bytes < 0.97 * real
    assert low.assumptions["loss"] == "the given step's own (step=)"


def test_model_with_a_loss_attribute_estimates_within_half_a_percent_with_the_default_step():
    est, real = _estimate_and_real(_llama, _llama_batch)
    _within_half_a_percent(est, real)
    assert est.assumptions["loss"] == "output.loss (the model's own loss)"


def test_model_without_a_loss_is_summed_and_the_assumptions_say_so():
    est = estimate(lambda: torch.nn.Linear(8, 4), lambda: torch.randn(3, 8), device="cpu")
    assert est.assumptions["loss"] == "output.sum() (the model returned no loss)"


def test_find_loss_picks_the_models_own_loss_first():
    logits, loss = torch.randn(2, 3), torch.tensor(1.5)
    assert find_loss((logits, loss)) == (loss, "the model's own loss (element 1 of its output tuple)")
    assert find_loss([logits, None, loss])[0] is loss
    assert find_loss({"logits": logits, "loss": loss})[0] is loss
    assert find_loss(loss)[0] is loss
    total, said = find_loss((logits, None))  # nanoGPT without targets: no loss
    assert said == "output[0].sum() (the model returned no loss)" and total.item() == pytest.approx(logits.sum())
    assert find_loss({"logits": logits})[1] == "output['logits'].sum() (the model returned no loss)"
    with pytest.raises(MemprofError, match="pass step="):
        find_loss("not a tensor")


def test_positional_and_keyword_arguments_together_use_the_default_step():
    def batch():
        idx, targets = nanogpt.make_batch()
        return CallArgs((idx,), {"targets": targets})  # model(idx, targets=targets)

    est, real = _estimate_and_real(nanogpt.build, batch)
    _within_half_a_percent(est, real)
    assert est.assumptions["loss"] == "the model's own loss (element 1 of its output tuple)"


@pytest.mark.parametrize("factory", ["build_moved", "build_cast_frozen"])
def test_factories_that_move_cast_and_freeze_estimate_within_half_a_percent(factory):
    build = getattr(nanogpt, factory)
    est, real = _estimate_and_real(build, nanogpt.make_batch)
    _within_half_a_percent(est, real)


def test_frozen_parameters_get_no_gradients_or_optimizer_state_in_the_estimate():
    full = estimate(nanogpt.build, nanogpt.make_batch, device="cpu")
    frozen = estimate(nanogpt.build_cast_frozen, nanogpt.make_batch, device="cpu")
    frozen_params = [p for p in nanogpt.build_cast_frozen().parameters() if not p.requires_grad]
    frozen_bytes = sum(p.numel() * 4 for p in frozen_params)
    assert full.modules[""].grad_bytes - frozen.modules[""].grad_bytes == frozen_bytes
    # AdamW keeps two fp32 moments and a 4-byte step count per trained parameter: the frozen ones' are gone
    assert (full.modules[""].optimizer_bytes - frozen.modules[""].optimizer_bytes
            == 2 * frozen_bytes + 4 * len(frozen_params))


def test_half_and_float_in_a_factory_change_the_parameter_bytes_as_for_real():
    half = estimate(lambda: nanogpt.build().half(), nanogpt.make_batch, device="cpu", steps=1)
    back = estimate(lambda: nanogpt.build().half().float(), nanogpt.make_batch, device="cpu", steps=1)
    n = sum(p.numel() for p in nanogpt.build().parameters())
    assert half.modules[""].param_bytes == 2 * n
    assert back.modules[""].param_bytes == 4 * n


def test_a_factory_that_calls_cuda_is_estimated_on_the_estimates_device():
    moved = estimate(nanogpt.build_cuda, nanogpt.make_batch, device="cpu")
    plain = estimate(nanogpt.build, nanogpt.make_batch, device="cpu")
    assert moved.peak_bytes == plain.peak_bytes
    assert "moves to CUDA" in moved.assumptions["cuda_moves"]
    if not torch.cuda.is_available():  # CUDA emulated on the CPU kernels: the same moves are kept on the CPU
        def to_cuda_batch():
            return tuple(t.to("cuda:0", non_blocking=True) for t in nanogpt.make_batch())

        emulated = estimate(lambda: nanogpt.build().to(torch.device("cuda")), to_cuda_batch, device="cuda")
        assert emulated.peak_bytes == estimate(nanogpt.build, nanogpt.make_batch, device="cuda").peak_bytes
        assert "moves to CUDA" in emulated.assumptions["cuda_moves"]


def test_a_torch_compile_wrapper_is_estimated_as_its_eager_module():
    est, real = _estimate_and_real(nanogpt.build_compiled, nanogpt.make_batch, real_build=nanogpt.build)
    _within_half_a_percent(est, real)
    assert "eager" in est.assumptions["compile"]


def test_the_users_torch_state_is_as_before_after_an_estimate_of_moving_factories():
    from torch.overrides import _get_current_function_mode_stack

    swap, modes = torch.utils.swap_tensors, len(_get_current_function_mode_stack())
    estimate(nanogpt.build_cuda, nanogpt.make_batch, device="cpu", steps=1)
    assert torch.utils.swap_tensors is swap and len(_get_current_function_mode_stack()) == modes
    with pytest.raises(RuntimeError, match="weakref"):  # outside an estimate torch refuses as before
        import weakref

        t = torch.nn.Parameter(torch.ones(2))
        _keep = weakref.ref(t)
        torch.utils.swap_tensors(t, torch.nn.Parameter(torch.zeros(2)))


def test_peft_lora_model_estimates_within_half_a_percent():
    pytest.importorskip("peft")
    build, make_batch, step, said = finetune_source(_llama, _llama_batch, lora=8)
    est, real = _estimate_and_real(build, make_batch, step)
    _within_half_a_percent(est, real)
    assert "LoRA r=8" in said and est.assumptions["loss"] == "output.loss (the model's own loss)"
    trained = [p for p in build().parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, p in build().named_parameters() if p.requires_grad)
    # AdamW's two fp32 moments and a 4-byte step count for the adapters only
    assert est.modules[""].optimizer_bytes == sum(2 * 4 * p.numel() + 4 for p in trained)
    assert est.modules[""].grad_bytes == sum(4 * p.numel() for p in trained)


@pytest.mark.parametrize("case", ["reference-model", "precomputed", "lora-adapters-off", "nanogpt"])
def test_dpo_step_estimates_within_half_a_percent(case):
    base, batch = (nanogpt.build, nanogpt.make_batch) if case == "nanogpt" else (_llama, _llama_batch)
    if case == "lora-adapters-off":
        pytest.importorskip("peft")
    kwargs = {"reference-model": {}, "nanogpt": {}, "precomputed": {"dpo_reference": "precomputed"},
              "lora-adapters-off": {"lora": 8}}[case]
    build, batch_for, step, _ = finetune_source(base, batch, method="dpo", **kwargs)
    est, real = _estimate_and_real(build, lambda: batch_for(2), step)
    _within_half_a_percent(est, real)
    assert est.assumptions["loss"].startswith("the DPO loss")


def test_dpo_with_a_reference_model_holds_a_frozen_second_copy():
    build, batch_for, step, _ = finetune_source(nanogpt.build, nanogpt.make_batch, method="dpo")
    est = estimate(build, lambda: batch_for(2), step=step, device="cpu")
    n_bytes = sum(p.numel() * 4 for p in nanogpt.build().parameters())
    assert est.modules["reference"].param_bytes == n_bytes
    assert est.modules["reference"].grad_bytes == 0 and est.modules["reference"].optimizer_bytes == 0


def test_lora_without_peft_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(MemprofError, match="pip install peft"):
        finetune_source(_llama, _llama_batch, lora=8)


def test_lora_on_a_model_peft_does_not_know_asks_for_targets():
    pytest.importorskip("peft")
    build, make_batch, _, _ = finetune_source(nanogpt.build, nanogpt.make_batch, lora=8)
    with pytest.raises(MemprofError, match="--lora-targets"):
        estimate(build, make_batch, device="cpu")
    build, make_batch, step, _ = finetune_source(nanogpt.build, nanogpt.make_batch, lora=8,
                                                 lora_targets=["c_attn"])
    est, real = _estimate_and_real(build, make_batch, step)
    _within_half_a_percent(est, real)
