"""Models, steps and independent expectations shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from memprof.tracking.groundtruth import allocator_peak, live_bytes
from memprof.zoo import GPT, ConvNet, GPTConfig, TiedMLP, gpt_batch

SMALL_GPT = GPTConfig(n_layer=2, n_embd=128, n_head=4, block_size=64, vocab_size=1000)
POLICY_GPT = GPTConfig(n_layer=6, n_embd=128, n_head=4, block_size=64, vocab_size=1000)  # the `gpt` fixture


class Case:
    """A model, its batch and a loss function: ``loss(model)`` runs one forward."""

    def __init__(self, model, batch, loss):
        self.model, self.batch, self.loss = model, list(batch), loss


def gpt_case():
    model = GPT(SMALL_GPT)
    x, y = gpt_batch(SMALL_GPT, 4)
    return Case(model, [x, y], lambda m: m(x, y))


def hf_llama_case():
    transformers = __import__("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    return Case(model, [ids], lambda m: m(input_ids=ids, labels=ids).loss)


def cnn_case():
    model = ConvNet()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return Case(model, [x, y], lambda m: F.cross_entropy(m(x), y))


def tied_case():
    model = TiedMLP()
    x = torch.randn(64, 1024)
    return Case(model, [x], lambda m: m(x).square().mean())


CASES = {"gpt": gpt_case, "hf-llama": hf_llama_case, "cnn-batchnorm": cnn_case, "tied-inplace": tied_case}


def make_optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    raise ValueError(name)


def train_step(case, model, opt, set_to_none=True):
    loss = case.loss(model)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)


def state_tensors(opt):
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def live_before_step(case, model, opt):
    """Hand count of what is live before a step: params, buffers, grads, optimizer state, the batch."""
    tensors = list(model.parameters()) + list(model.buffers()) + case.batch + state_tensors(opt)
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return live_bytes(tensors)


def twin(case, opt_name):
    """An identical copy of model and optimizer, to run the same step under the allocator's profiler."""
    model = copy.deepcopy(case.model)
    return model, make_optimizer(opt_name, model.parameters())


def gpt_adamw_step(cfg: GPTConfig, batch_size: int = 2):
    """A GPT of ``cfg`` (seeded), its AdamW and a training step on one batch (grads set to None after)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = gpt_batch(cfg, batch_size)

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def allocator_step_peak(case, model, opt, **kw):
    peak, _ = allocator_peak(lambda: train_step(case, model, opt, **kw), live_before_step(case, model, opt))
    return peak


def _profiler_can_start() -> bool:
    """Whether torch.profiler can start on this thread (nothing left in its thread-local slot)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU]):
            pass
    except RuntimeError:
        return False
    return True


def _c10_log_level():
    from memprof.tracking import native

    flag = native.log_level_flag()
    return None if flag is None else flag.value


def hook_registries(model=None, opt=None):
    """Every hook registry the tracker could touch, as comparable plain data."""
    from torch.nn.modules import module as m
    from torch.optim import optimizer as o

    state = {
        "global_module": [
            dict(m._global_forward_pre_hooks), dict(m._global_forward_hooks),
            dict(m._global_forward_hooks_always_called), dict(m._global_forward_hooks_with_kwargs),
            dict(m._global_backward_hooks), dict(m._global_backward_pre_hooks),
        ],
        "global_optimizer": [dict(o._global_optimizer_pre_hooks), dict(o._global_optimizer_post_hooks)],
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "in_dispatch_mode_flags": [getattr(torch.utils._python_dispatch, f, None) for f in (
            "_is_in_torch_dispatch_mode", "_is_in_non_infra_torch_dispatch_mode",
            "_is_in_any_mode_without_ignore_compile_internals")],
        "storage_resize_patched": "resize_" in torch.UntypedStorage.__dict__,
        "autograd_engine_entry": torch.autograd._engine_run_backward,
        "profiler_slot_free": not torch.autograd._profiler_enabled() and _profiler_can_start(),
        "c10_log_level": _c10_log_level(),
    }
    if model is not None:
        state["modules"] = [
            (name, dict(mod._forward_pre_hooks), dict(mod._forward_hooks), dict(mod._backward_hooks),
             dict(mod._backward_pre_hooks))
            for name, mod in model.named_modules()
        ]
        state["params"] = [
            (name, dict(p._post_accumulate_grad_hooks or {}), dict(p._backward_hooks or {}))
            for name, p in model.named_parameters()
        ]
    if opt is not None:
        state["optimizer"] = [dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)]
    return state


class LossModule(nn.Module):
    def forward(self, logits, targets):
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def real_cpu_peak(build, make_batch, precision="fp32", step=None, steps=2) -> int:
    """The tracker's peak (the CPU allocator's, to the byte) of the model really trained ``steps`` steps, with
    ``step(model, batch, opt)`` under the precision's autocast, or the estimator's default step."""
    import memprof
    from memprof.training import autocast, default_step
    from memprof.training import make_optimizer as make_opt

    torch.manual_seed(0)
    model, batch = build(), make_batch()
    opt = make_opt("adamw", model.parameters())
    with memprof.track(model, opt) as tracker:
        for _ in range(steps):
            if step is None:
                default_step(model, batch, opt, precision)
            else:
                with autocast(precision, "cpu"):
                    step(model, batch, opt)
    return tracker.profile.peak_bytes
