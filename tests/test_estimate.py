"""The estimator (fake tensors) against real runs measured by the tracker, hand counts, and bad input."""

import pytest
import torch

import memprof
from memprof.errors import MemprofError
from memprof.estimation import EstimateError, estimate, get_architecture
from memprof.tracking import scratch
from memprof.training import default_step, make_optimizer
from tests.common import CASES, real_cpu_peak


def _hf_llama():
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"  # grouped-query attention through SDPA
    return tf.LlamaForCausalLM(cfg)


def _hf_bert():
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return tf.BertForMaskedLM(cfg)


def _ids(mask=False):
    ids = torch.randint(0, 1000, (2, 64))
    batch = {"input_ids": ids, "labels": ids}
    if mask:
        batch["attention_mask"] = torch.ones(2, 64, dtype=torch.long)  # a padding mask with no padding
    return batch


def _gpt_step(model, batch, opt):
    x, y = batch
    model(x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _cnn_step(model, batch, opt):
    x, y = batch
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _tied_step(model, batch, opt):
    model(batch).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _model_and_batch(name):
    """(build_model, make_batch, step) for the tracker's accuracy models and the two HF models."""
    if name in CASES:
        def build():
            return CASES[name]().model

        def batch():
            case = CASES[name]()
            return tuple(case.batch) if name != "tied-inplace" else case.batch[0]
        return build, batch, {"gpt": _gpt_step, "cnn-batchnorm": _cnn_step, "tied-inplace": _tied_step}[name]
    return {"hf-llama-gqa": (_hf_llama, _ids, None), "hf-bert": (_hf_bert, _ids, None)}[name]


def _measured_peak(build, make_batch, precision, step=None, steps=2):
    return real_cpu_peak(build, make_batch, precision, step, steps)


MODELS = ["gpt", "hf-llama-gqa", "hf-bert", "cnn-batchnorm", "tied-inplace"]


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", MODELS)
def test_estimate_equals_a_real_cpu_run_within_half_a_percent(name, precision):
    build, make_batch, step = _model_and_batch(name)
    scratch.clear_cache()  # the estimator measures op scratch on its own, not from the real run's cache
    est = estimate(build, make_batch, step=step, precision=precision, device="cpu")
    scratch.clear_cache()
    real = _measured_peak(build, make_batch, precision, step)
    assert est.estimated and not est.peak_bytes == 0
    assert abs(est.peak_bytes - real) <= 0.005 * real, (est.peak_bytes, real)


def test_transformers_follows_the_real_code_path_under_fake_tensors():
    # transformers builds an explicit causal mask when it sees fake tensors; a real run drops an all-ones mask.
    real = _measured_peak(_hf_llama, lambda: _ids(mask=True), "fp32")
    follows = estimate(_hf_llama, lambda: _ids(mask=True), device="cpu")
    fake_path = estimate(_hf_llama, lambda: _ids(mask=True), device="cpu", hf_real_paths=False)
    assert abs(follows.peak_bytes - real) <= 0.005 * real
    assert fake_path.peak_bytes > real * 1.01  # what the estimate would be without following the real path
    assert "transformers" in follows.assumptions


@pytest.mark.slow
def test_llama_2_7b_fp32_adamw_bytes_are_4n_4n_8n_and_an_eighth_under_full_sharding():
    arch = get_architecture("llama-2-7b")
    n_params = arch.parameters()
    n_tensors = sum(1 for _ in _meta_params(arch))
    batch = lambda: arch.make_batch(1, 32)  # noqa: E731 - a short sequence: params, not activations, matter here
    prof = estimate(arch.build_model, batch, precision="fp32", optimizer="adamw", device="cpu",
                    scratch_limit_bytes=0)
    root = prof.modules[""]
    assert n_params > 6.7e9
    assert root.param_bytes == 4 * n_params
    assert root.grad_bytes == 4 * n_params
    assert root.optimizer_bytes == 8 * n_params + 4 * n_tensors  # exp_avg, exp_avg_sq + a float32 step each
    sharded = estimate(arch.build_model, batch, precision="fp32", optimizer="adamw", device="cpu",
                       scratch_limit_bytes=0, world_size=8, sharding="full")
    root8 = sharded.modules[""]
    at_start = sharded.timeline[0].category("param")  # sharded parameters before any all-gather
    padding = 8 * 4 * 4096 * n_tensors  # FSDP pads dim 0 to a multiple of 8: at most 7 rows of <= 4096 floats
    assert 4 * n_params / 8 <= at_start <= 4 * n_params / 8 + padding
    assert 4 * n_params / 8 <= root8.grad_bytes <= 4 * n_params / 8 + padding
    assert 8 * n_params / 8 <= root8.optimizer_bytes - 4 * n_tensors <= 8 * n_params / 8 + 2 * padding
    assert sharded.environment.world_size == 8


def _meta_params(arch):
    with torch.device("meta"):
        model = arch.build_model()
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def test_cuda_estimate_rounds_like_the_caching_allocator_and_says_whether_it_fits():
    build, make_batch, _ = _model_and_batch("gpt")
    cpu = estimate(build, make_batch, device="cpu")
    cuda = estimate(build, make_batch, device="cuda", device_memory="L4-24GB")
    assert cuda.peak_bytes >= cpu.peak_bytes  # every storage rounds up to a multiple of 512 bytes
    assert all(t.bytes % 512 == 0 for t in cuda.peak.tensors)
    assert cuda.environment.device_capacity_bytes == 23034 * 1024**2
    assert cuda.environment.device_name == "L4-24GB"
    assert "allocator" in cuda.assumptions


def test_bf16_parameters_halve_param_grad_and_adam_state():
    build, make_batch, _ = _model_and_batch("gpt")
    fp32 = estimate(build, make_batch, device="cpu").modules[""]
    bf16 = estimate(build, make_batch, device="cpu", precision="bf16").modules[""]
    assert bf16.param_bytes * 2 == fp32.param_bytes
    assert bf16.grad_bytes * 2 == fp32.grad_bytes
    n_tensors = len({id(p) for p in build().parameters()})
    assert (bf16.optimizer_bytes - 4 * n_tensors) * 2 == fp32.optimizer_bytes - 4 * n_tensors


@pytest.mark.parametrize("optimizer,state_per_param", [("sgd", 1), ("adamw-foreach", 2), ("adam-fused", 2),
                                                       ("adamw-forloop", 2)])
def test_optimizer_state_matches_the_optimizer(optimizer, state_per_param):
    build, make_batch, _ = _model_and_batch("gpt")
    prof = estimate(build, make_batch, device="cpu", optimizer=optimizer)
    params = prof.modules[""].param_bytes
    steps = 0 if optimizer == "sgd" else 4 * len({id(p) for p in build().parameters()})
    assert prof.modules[""].optimizer_bytes == state_per_param * params + steps


def test_fp16_autocast_with_grad_scaler_matches_a_real_run():
    from memprof.training import make_scaler

    build, make_batch, _ = _model_and_batch("hf-llama-gqa")
    scratch.clear_cache()
    est = estimate(build, make_batch, device="cpu", precision="fp16-autocast")
    scratch.clear_cache()
    torch.manual_seed(0)
    model, batch = build(), make_batch()
    opt = make_optimizer("adamw", model.parameters())
    scaler = make_scaler("fp16-autocast", "cpu")
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            default_step(model, batch, opt, "fp16-autocast", scaler)
    real = tracker.profile.peak_bytes
    assert abs(est.peak_bytes - real) <= 0.005 * real, (est.peak_bytes, real)
    assert est.assumptions["precision"] == "fp16-autocast"


def test_estimated_times_are_modelled_and_positive():
    build, make_batch, _ = _model_and_batch("gpt")
    prof = estimate(build, make_batch, device="cuda", device_memory="H100-80GB")
    assert prof.modules["blocks.0"].forward_ms > 0 and prof.modules["blocks.0"].backward_ms > 0
    assert prof.steps[-1].duration_ms > 0
    assert "roofline" in prof.assumptions["time"]


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(MemprofError, match="unknown model 'llama-2-7' ; did you mean llama-2-7b".replace(" ;", ";")):
        get_architecture("llama-2-7")


def test_a_factory_that_raises_is_named_with_its_cause():
    def broken_model():
        raise ValueError("hidden_size must be divisible by heads")

    with pytest.raises(EstimateError, match="build_model .*broken_model failed.*ValueError: hidden_size"):
        estimate(broken_model, lambda: torch.zeros(1))


def test_a_config_that_does_not_build_is_a_clear_error():
    tf = pytest.importorskip("transformers")

    def bad_config():
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=100, num_attention_heads=3, num_hidden_layers=1))

    with pytest.raises(EstimateError, match="(?s)build_model .*bad_config failed.*hidden size"):
        estimate(bad_config, lambda: torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=0), "world_size must be a positive integer"),
    (dict(world_size=1, sharding="full"), "needs world_size > 1"),
    (dict(precision="fp8"), "unknown precision"),
    (dict(optimizer="lion"), "unknown optimizer"),
    (dict(sharding="zero3"), "unknown sharding"),
    (dict(device="tpu"), "device must be"),
    (dict(device_memory="H100"), "unknown device 'H100'; did you mean H100-80GB"),
    (dict(device_memory="-3GB"), "not a memory size"),
    (dict(world_size=4, sharding="hybrid", shard_group_size=3), "shard_group_size dividing"),
])
def test_impossible_settings_are_clear_errors(kwargs, match):
    with pytest.raises(MemprofError, match=match):
        estimate(lambda: torch.nn.Linear(2, 2), lambda: torch.zeros(1, 2), **kwargs)


def test_estimate_leaves_no_process_group_or_mode_behind():
    import torch.distributed as dist

    build, make_batch, _ = _model_and_batch("gpt")
    estimate(build, make_batch, device="cpu", world_size=2, sharding="full")
    assert not dist.is_initialized()
    assert torch._C._len_torch_dispatch_stack() == 0
    from torch._subclasses.fake_tensor import FakeTensor

    assert not isinstance(torch.zeros(1), FakeTensor)


class _WithConstant(torch.nn.Module):
    """Makes a 400 KB tensor from a Python list in every forward (``torch.tensor`` is ``aten.lift_fresh``)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.values = [float(i % 7) for i in range(100_000)]

    def forward(self, x):
        c = torch.tensor(self.values)
        return self.lin(x).sum() + c[:64].sum()


def test_tensor_constants_made_in_the_step_count_once():
    est = estimate(_WithConstant, lambda: torch.randn(8, 64), device="cpu")
    real = _measured_peak(_WithConstant, lambda: torch.randn(8, 64), "fp32")
    # Without lifting the constant as the op's output only, the fake run counted it twice (its real
    # constant and its fake tensor): 400,000 bytes over.
    assert est.peak_bytes == real
