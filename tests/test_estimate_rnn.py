"""The estimator never crashes the user's process on recurrent models, and runs real kernels on made-up inputs
only where their memory cannot depend on the values (memprof.estimation.scratch_safety)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import memprof
from memprof.estimation import scratch_safety
from memprof.estimation.scratch_safety import NEEDS_VALUES, RNN_BACKWARD, RUN, SKIP, decide
from memprof.tracking import scratch

ROOT = Path(__file__).resolve().parents[1]


def _child(*args: str) -> dict:
    """Estimate and train a recurrent LM in a child process (a heap corruption kills the child only)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tests.fixtures.rnn_lm", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind,precision", [("lstm", "fp32"), ("lstm", "bf16-autocast"), ("gru", "fp32")])
def test_recurrent_lm_estimate_exits_cleanly_and_is_within_half_a_percent_of_the_real_run(kind, precision):
    out = _child(kind, precision)
    assert abs(out["estimate"] - out["real"]) <= 0.005 * out["real"], out
    if kind == "lstm":  # the oneDNN LSTM: backward measured on a real forward's workspace, not a made-up one
        assert "aten.mkldnn_rnn_layer_backward.default" in out["assumptions"]["scratch_other_way"]
        assert "bytes" in out["assumptions"]["rnn_workspace"]


@pytest.mark.slow
def test_lstm_workspace_not_sized_over_the_scratch_limit_is_said_and_the_estimate_is_low():
    out = _child("lstm", "fp32", "0")
    assert "keep an empty workspace" in out["assumptions"]["rnn_workspace"]
    assert out["estimate"] < out["real"]


def test_kernels_reading_a_forward_workspace_or_following_values_do_not_run_on_made_up_inputs():
    a = torch.ops.aten
    assert decide(a.mkldnn_rnn_layer_backward.default) == RNN_BACKWARD
    for op in (a._cudnn_rnn_backward.default, a.fbgemm_linear_fp16_weight.default):
        assert decide(op) == SKIP, op
    for op in (a.nonzero.default, a._pack_padded_sequence.default, a._pad_packed_sequence.default,
               a.masked_select.default, a._unique2.default):
        assert decide(op) == NEEDS_VALUES, op
    for op in (a.mm.default, a.embedding_dense_backward.default, a.index_select.default, a.gather.default,
               a.nll_loss_forward.default, a.mkldnn_rnn_layer.default):
        assert decide(op) == RUN, op


# A custom kernel whose working memory follows its index values (as a third-party extension's may): it
# allocates max(idx) + 1 rows of scratch. The estimator cannot know that, so it runs it only on real data.
_SCRATCH_ROWS = 4096
_CALLS: list[torch.Tensor] = []


@torch.library.custom_op("memprof_tests::pick_rows", mutates_args=())
def pick_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    _CALLS.append(idx.clone())
    work = torch.empty(int(idx.max()) + 1, _SCRATCH_ROWS)  # scratch whose size is a value of idx
    work.fill_(1.0)
    out = table.index_select(0, idx) + work[0, : table.shape[1]]
    del work
    return out


@pick_rows.register_fake
def _(table, idx):
    return table.new_empty((idx.shape[0], table.shape[1]))


class _Picker(nn.Module):
    def __init__(self, idx_from_activations: bool):
        super().__init__()
        self.lin = nn.Linear(64, 512)
        self.from_acts = idx_from_activations

    def forward(self, x, idx):
        h = self.lin(x)  # 256 x 512: too large for the estimator to keep real data of
        if self.from_acts:
            idx = h.detach().argmax(1)[:16] % x.shape[0]  # values the estimate does not have
        return h.sum() + pick_rows(x, idx).sum()


def _picker_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 64, generator=g), torch.randint(200, 256, (16,), generator=g)


def _step(model, batch, opt):
    model(*batch).backward()
    opt.step()
    opt.zero_grad()


def _real_peak(model_fn) -> int:
    scratch.clear_cache()
    torch.manual_seed(0)
    model, batch = model_fn(), _picker_batch()
    opt = torch.optim.AdamW(model.parameters())
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            _step(model, batch, opt)
    return tracker.profile.peak_bytes


def test_custom_op_without_real_inputs_is_not_run_on_made_up_values_and_the_profile_says_so():
    scratch.clear_cache()
    _CALLS.clear()
    est = memprof.estimate(lambda: _Picker(True), _picker_batch, step=_step, device="cpu")
    assert _CALLS == []  # neither the measurement nor anything else ran the kernel on made-up indices
    assert "memprof_tests.pick_rows.default" in est.assumptions["scratch_unmeasured"]


def test_custom_op_on_real_inputs_is_measured_on_their_values_within_half_a_percent():
    scratch.clear_cache()
    _CALLS.clear()
    est = memprof.estimate(lambda: _Picker(False), _picker_batch, step=_step, device="cpu")
    real_idx = _picker_batch()[1]
    assert _CALLS and all(torch.equal(c, real_idx) for c in _CALLS)
    assert "memprof_tests.pick_rows.default" not in est.assumptions.get("scratch_unmeasured", "")
    real = _real_peak(lambda: _Picker(False))
    assert abs(est.peak_bytes - real) <= 0.005 * real, (est.peak_bytes, real)


def test_made_up_inputs_copy_a_shadow_so_the_measured_kernel_cannot_write_the_estimators_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(4))
    shadow = torch.arange(4.0).untyped_storage()
    real = scratch_safety.materialize(fake, {}, lambda s: shadow if s is fake.untyped_storage() else None)
    assert torch.equal(real, torch.arange(4.0))
    real.add_(1)
    assert torch.equal(torch.empty(0).set_(shadow), torch.arange(4.0))
