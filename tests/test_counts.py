"""Category totals against hand counts, and per-module attribution against the category totals."""

import dataclasses

import memprof
from memprof.tracking.groundtruth import live_bytes
from memprof.zoo import GPT, gpt_batch
from tests.common import CASES, SMALL_GPT, LossModule, make_optimizer, state_tensors, train_step


def test_param_grad_optimizer_bytes_at_peak_equal_hand_counts():
    case = CASES["gpt"]()  # tied weights: wte.weight is lm_head.weight
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    train_step(case, model, opt, set_to_none=False)  # grads and optimizer state now exist for good
    with memprof.track(model, opt) as tracker:
        train_step(case, model, opt, set_to_none=False)
    prof = tracker.profile
    params = list(model.parameters())
    by_cat = prof.peak.by_category
    assert by_cat["param"] == live_bytes(params)
    assert by_cat["grad"] == live_bytes(p.grad for p in params)
    assert by_cat["optimizer"] == live_bytes(state_tensors(opt))
    assert by_cat["input"] == live_bytes(case.batch)
    # Tied weights count once: the hand count is below the naive per-name sum.
    naive = sum(p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False))
    assert by_cat["param"] < naive
    # Per module: owned bytes are the module's own tensors (inclusive of submodules).
    attn = model.blocks[0].attn.c_attn
    row = prof.modules["blocks.0.attn.c_attn"]
    assert row.param_bytes == live_bytes(attn.parameters())
    assert row.grad_bytes == live_bytes(p.grad for p in attn.parameters())
    assert row.optimizer_bytes == live_bytes(v for p in attn.parameters() for v in opt.state[p].values())
    assert prof.modules[""].param_bytes == by_cat["param"]


def test_model_and_optimizer_found_without_being_named():
    case = CASES["cnn-batchnorm"]()
    model, opt = case.model, make_optimizer("sgd-momentum", case.model.parameters())
    train_step(case, model, opt, set_to_none=False)
    with memprof.track() as tracker:
        train_step(case, model, opt, set_to_none=False)
    by_cat = tracker.profile.peak.by_category
    assert by_cat["param"] == live_bytes(model.parameters())
    assert by_cat["buffer"] == live_bytes(model.buffers())
    assert by_cat["optimizer"] == live_bytes(state_tensors(opt))
    x, y = case.batch
    assert by_cat["input"] == live_bytes([x])  # the model's input
    assert by_cat["other"] == live_bytes([y])  # the target reaches only F.cross_entropy, outside any module


def test_top_level_children_activations_sum_to_activation_category_at_end_of_forward():
    cfg = dataclasses.replace(SMALL_GPT, n_layer=4, dropout=0.1)  # dropout: the root's own add is not kept
    model = GPT(cfg)
    loss_fn = LossModule()
    opt = make_optimizer("adamw", model.parameters())
    x, y = gpt_batch(cfg, 4)
    with memprof.track() as tracker:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    prof = tracker.profile
    # The first sample of the backward phase is taken at the transition: activations then are what forward left.
    first_bw = next(s for s in prof.timeline if s.phase == "backward")
    at_end_of_forward = first_bw.category("activation")
    top = [m for m in prof.modules.values() if m.depth == 1 or (m.depth == 0 and m.name != "")]
    assert {m.name for m in top} >= {"wte", "wpe", "drop", "blocks", "ln_f", "lm_head", "LossModule"}
    total = sum(m.activation_bytes for m in top)
    assert at_end_of_forward > 0
    assert abs(total - at_end_of_forward) <= 0.01 * at_end_of_forward, (total, at_end_of_forward)
    # And the blocks' activations are the sum of the individual blocks'.
    blocks = [prof.modules[f"blocks.{i}"].activation_bytes for i in range(cfg.n_layer)]
    assert prof.modules["blocks"].activation_bytes == sum(blocks)
    assert blocks[0] == blocks[1] > 0  # identical blocks keep identical activations
