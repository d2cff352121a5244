"""Fake kernels whose output dtypes differ from the real CPU kernel's: the estimate follows the real ones."""

import torch

import memprof
from memprof.estimation import estimate
from memprof.tracking import scratch
from memprof.training import default_step, make_optimizer


class _NarrowNorms(torch.nn.Module):
    """Linear + LayerNorm blocks on 4 features: under CPU bf16-autocast each LayerNorm gets a bf16 input and
    float32 weights, for which the real kernel saves float32 mean/rstd (the fake one bfloat16), a large share
    of the activations at this width."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 4)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
                                          for _ in range(4))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


def _batch():
    return torch.randn(4096, 16)


def test_layernorm_on_bf16_input_estimates_the_real_kernels_float32_statistics():
    scratch.clear_cache()
    est = estimate(_NarrowNorms, _batch, precision="bf16-autocast", device="cpu")
    scratch.clear_cache()
    torch.manual_seed(0)
    model, batch = _NarrowNorms(), _batch()
    opt = make_optimizer("adamw", model.parameters())
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            default_step(model, batch, opt, "bf16-autocast")
    real = tracker.profile.peak_bytes
    # with the fake kernel's bfloat16 mean/rstd the estimate read 5.3% low here
    assert abs(est.peak_bytes - real) <= 0.005 * real, (est.peak_bytes, real)
    assert "fake_dtypes" in est.assumptions


def test_fp32_layernorm_needs_no_dtype_correction():
    est = estimate(_NarrowNorms, _batch, precision="fp32", device="cpu")
    assert "fake_dtypes" not in est.assumptions
