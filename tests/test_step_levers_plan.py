"""The planner's step levers (loss head, micro-batches, optimizer step in backward, bf16 moments) chosen jointly
with checkpointing: against a brute force over every combination, each estimated with the levers really
applied; the chosen plan applied with memprof.apply and measured on the real step; plan files and refusals."""

import dataclasses
import itertools

import pytest
import torch

import memprof
from memprof.errors import MemprofError
from memprof.estimation.sources import EstimateSource
from memprof.plans import CheckpointChoice, load_plan
from memprof.policy.apply import ApplyError
from memprof.policy.chain_problem import InfeasibleBudget
from memprof.policy.engine import UnweighableLeverError, plan
from memprof.policy.timing import OptionCosts, uniform_plan
from memprof.policy.variant_timing import VariantTiming, measure_variant_ratios
from memprof.policy.variants import PLAIN, StepVariant, model_transform, step_wrapper, weighed_variants
from memprof.training import default_step, make_optimizer
from tests.fixtures.nanogpt_model import GPT, GPTConfig

VOCAB = 4096
NANO = GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
UNITS = ["transformer.h.0", "transformer.h.1"]
CHUNK = 64
STEP_LEVERS = ("loss-head", "micro-batches", "optimizer-in-backward", "bf16-moments")
ALL = ("checkpoint",) + STEP_LEVERS
# Hand-set prices (ms): independent of any timing, so the optimum is known exactly.
BASE_MS = 100.0
EXTRA = {"transformer.h.0": 0.5, "transformer.h.1": 2.5}  # cheaper than most levers: mixed choices
PRICE = {"loss-head": 1.06, "micro-batches": 1.03, "optimizer-in-backward": 1.01, "bf16-moments": 1.02}


def _build():
    torch.manual_seed(0)
    return GPT(NANO)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4, 64), generator=g), torch.randint(0, VOCAB, (4, 64), generator=g)


def _ratio(v: StepVariant) -> float:
    r = 1.0
    for lever in v.levers:
        r *= PRICE[lever]
    return r * (1.0 + 0.04 * (v.micro_batches == 4))  # 4 slices cost more than 2


def _ckpt_plan(subset):
    base = uniform_plan(UNITS, "full")
    return dataclasses.replace(base, checkpoint=tuple(CheckpointChoice(u, "full" if u in subset else "keep")
                                                      for u in UNITS))


def _brute_peak(v: StepVariant, subset) -> int:
    """The estimate of the model with the levers really applied (memprof.apply's checkpointing, the variant's
    transform and step): no chain model involved."""
    transform = model_transform(v)
    wrap = step_wrapper(v)

    def build():
        model = _build()
        if subset:
            memprof.apply(model, _ckpt_plan(subset))
        return transform(model) if transform else model
    return memprof.estimate(build, _batch, step=wrap(None) if wrap else None, device="cpu", blocks="all").peak_bytes


@pytest.fixture(scope="module")
def setting():
    source = EstimateSource(_build, _batch, device="cpu")
    prof = source.profile("fp32")
    costs = OptionCosts(base_step_ms=BASE_MS, extra_ms={"full": dict(EXTRA)}, reps=1)
    variants, _ = weighed_variants(STEP_LEVERS, chunk_tokens=CHUNK, custom_step=False, optimizer="adamw")
    return source, prof, costs, {v: _ratio(v) for v in variants if not v.plain}


@pytest.fixture(scope="module")
def table(setting):
    """(variant, checkpointed units) -> (estimated peak with them really applied, hand-priced step ms)."""
    variants, _ = weighed_variants(STEP_LEVERS, chunk_tokens=CHUNK, custom_step=False, optimizer="adamw")
    out = {}
    for v in variants:
        for n in range(len(UNITS) + 1):
            for subset in itertools.combinations(UNITS, n):
                out[(v, subset)] = (_brute_peak(v, subset), BASE_MS * _ratio(v) + sum(EXTRA[u] for u in subset))
    return out


def _chosen(p) -> tuple[StepVariant, tuple]:
    v = StepVariant(p.loss_head_chunk_tokens, p.micro_batches, p.optimizer_in_backward, p.bf16_moments)
    return v, tuple(c.unit for c in p.checkpoint if c.mode == "full")


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.97, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.37, 0.3])
def test_joint_choice_is_the_brute_force_optimum(setting, table, fraction):
    source, prof, costs, ratios = setting
    budget = int(fraction * prof.peak_bytes)
    fits = {k: t for k, (peak, t) in table.items() if peak <= budget}
    if not fits:
        with pytest.raises(InfeasibleBudget):
            plan(prof, budget, levers=ALL, source=source, costs=costs, variant_ratios=ratios,
                 modes=("keep", "full"), loss_head_chunk_tokens=CHUNK)
        return
    p = plan(prof, budget, levers=ALL, source=source, costs=costs, variant_ratios=ratios, modes=("keep", "full"),
             loss_head_chunk_tokens=CHUNK)
    chosen = _chosen(p)
    assert table[chosen][0] <= p.predicted_peak_bytes <= budget  # fits when really applied; never under-predicted
    best = min(fits.values())
    assert p.predicted_step_ms == pytest.approx(best, abs=1e-9)
    assert chosen in fits and fits[chosen] == pytest.approx(best, abs=1e-9)
    # the chain model's peak for the chosen configuration is the estimate with the levers really applied
    assert p.predicted_peak_bytes == table[chosen][0]


def _measured(p) -> tuple[int, object]:
    model, batch = _build(), _batch()
    opt = make_optimizer("adamw", model.parameters())
    handle = memprof.apply(model, p, optimizer=opt)
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            handle.step(model, batch, opt)
    handle.remove()
    return tracker.profile.peak_bytes, opt


@pytest.mark.parametrize("fraction, levers", [(0.45, ("micro-batches",)), (0.37, ("loss-head", "bf16-moments"))])
def test_applied_plan_measures_its_prediction_on_the_real_step(setting, fraction, levers):
    """Budgets that need step levers and checkpointing together (4 micro-batches; the chunked head with bf16
    moments): applied with memprof.apply (optimizer=) and run with the handle's step, the tracked peak (the
    allocator's) equals the prediction; remove() gives the moments back in fp32 and the optimizer its step."""
    source, prof, costs, ratios = setting
    budget = int(fraction * prof.peak_bytes)
    p = plan(prof, budget, levers=ALL, source=source, costs=costs, variant_ratios=ratios, modes=("keep", "full"),
             loss_head_chunk_tokens=CHUNK)
    v, units = _chosen(p)
    assert v.levers == levers and units, p.explanation
    peak, opt = _measured(p)
    assert peak == p.predicted_peak_bytes <= budget
    assert "step" not in vars(opt)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_step_in_backward_applied_measures_its_estimate(setting):
    """The optimizer step in backward with the chunked head and bf16 moments, applied from a plan file's
    fields: the real step's peak equals the estimate of the model with those levers (the brute force's)."""
    source, prof, costs, ratios = setting
    p = plan(prof, prof.peak_bytes, levers=ALL, source=source, loss_head_chunk_tokens=CHUNK)
    forced = dataclasses.replace(p, loss_head_chunk_tokens=CHUNK, optimizer_in_backward=True, bf16_moments=True)
    peak, opt = _measured(forced)
    assert peak == _brute_peak(StepVariant(CHUNK, 1, True, True), ())
    assert not hasattr(opt, "_memprof_step_in_backward")


def test_explanation_names_each_lever_with_bytes_and_time(setting):
    source, prof, costs, ratios = setting
    p = plan(prof, int(0.45 * prof.peak_bytes), levers=ALL, source=source, costs=costs, variant_ratios=ratios,
             modes=("keep", "full"), loss_head_chunk_tokens=CHUNK)
    text = "\n".join(p.explanation)
    v, _ = _chosen(p)
    for words in v.words():
        assert words.split()[0].lower() in text.lower()
    assert text.count("saved), step +") >= len(v.levers)
    assert any("measured on this device" in n for n in p.assumptions.values())


def test_unneeded_levers_stay_off_and_untimed_ones_are_said_modelled(setting):
    source, prof, _costs, _ratios = setting
    p = plan(prof, prof.peak_bytes, levers=ALL, source=source, loss_head_chunk_tokens=CHUNK)
    assert _chosen(p) == (PLAIN, ())
    assert any("modelled as no less than the step as written" in n for n in p.assumptions.values())


def test_plan_file_round_trip_and_old_files(setting, tmp_path):
    source, prof, costs, ratios = setting
    p = plan(prof, int(0.45 * prof.peak_bytes), levers=ALL, source=source, costs=costs, variant_ratios=ratios,
             modes=("keep", "full"), loss_head_chunk_tokens=CHUNK)
    path = p.save(tmp_path / "plan.toml")
    back = load_plan(path)
    assert _chosen(back) == _chosen(p)
    old = "\n".join(line for line in path.read_text().splitlines()
                    if not line.startswith(("micro_batches", "optimizer_in_backward", "bf16_moments")))
    (tmp_path / "old.toml").write_text(old)
    assert _chosen(load_plan(tmp_path / "old.toml"))[0] == StepVariant(p.loss_head_chunk_tokens)
    bad = path.read_text().replace("micro_batches = 1", "micro_batches = 2").replace(
        "optimizer_in_backward = false", "optimizer_in_backward = true")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(MemprofError, match="optimizer_in_backward"):
        load_plan(tmp_path / "bad.toml")


def test_optimizer_levers_need_the_optimizer(setting):
    source, prof, costs, ratios = setting
    p = plan(prof, int(0.45 * prof.peak_bytes), levers=ALL, source=source, costs=costs, variant_ratios=ratios,
             modes=("keep", "full"), loss_head_chunk_tokens=CHUNK)
    forced = dataclasses.replace(p, bf16_moments=True)
    model = _build()
    with pytest.raises(ApplyError, match="optimizer=opt"):
        memprof.apply(model, forced)
    assert "forward" not in vars(model.transformer.h[0])  # nothing was left applied


def test_step_levers_need_a_model_to_estimate():
    prof = EstimateSource(_build, _batch, device="cpu").profile("fp32")
    with pytest.raises(UnweighableLeverError, match="micro-batches"):
        plan(prof, prof.peak_bytes // 2, levers=("checkpoint", "micro-batches"))


def test_micro_batches_not_weighed_with_a_custom_step(setting):
    _source, prof, _costs, _ratios = setting

    def own_step(model, batch, opt, precision="fp32", scaler=None, device_type="cpu"):
        return default_step(model, batch, opt, precision, scaler, device_type)
    src = EstimateSource(_build, _batch, device="cpu", step=own_step)
    p = plan(prof, prof.peak_bytes, levers=("checkpoint", "micro-batches"), source=src)
    assert p.micro_batches == 1
    assert any("micro-batches not weighed" in n for n in p.assumptions.values())


def test_measured_variant_ratios_and_noise_rule():
    """measure_variant_ratios times real steps (ratios positive, the plain step's own absent); a speed-up within
    twice its standard error is priced as none, a measured cost as measured."""
    v = StepVariant(bf16_moments=True)
    t = measure_variant_ratios(_build, _batch, [v], rounds=3, warmup=1)
    assert set(t.ratios) == {v} and t.ratios[v] > 0 and t.step_ms[PLAIN] > 0
    fake = VariantTiming({v: 0.97, StepVariant(micro_batches=2): 1.2, StepVariant(loss_head_chunk_tokens=8): 0.5},
                         {}, 5, stderr={v: 0.02, StepVariant(micro_batches=2): 0.5,
                                        StepVariant(loss_head_chunk_tokens=8): 0.01})
    assert fake.priced() == {v: 1.0, StepVariant(micro_batches=2): 1.2, StepVariant(loss_head_chunk_tokens=8): 0.5}


TOY = '''
import torch
from tests.fixtures.nanogpt_model import GPT, GPTConfig
CFG = GPTConfig(block_size=64, vocab_size=4096, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
def build():
    torch.manual_seed(0)
    return GPT(CFG)
def batch(n, seq=None):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 4096, (n, 64), generator=g), torch.randint(0, 4096, (n, 64), generator=g)
'''


def test_cli_plan_weighs_the_step_levers(tmp_path):
    """`memprof plan --levers ...` with the model named: the step levers are chosen, printed and written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "toy.py").write_text(TOY)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)])}
    model = ["--model", "toy:build", "--batch", "toy:batch", "--batch-size", "4"]
    subprocess.run([sys.executable, "-m", "memprof", "estimate", *model, "--device", "cpu", "--out",
                    str(tmp_path / "est.json")], check=True, capture_output=True, env=env, cwd=tmp_path)
    prof = memprof.load(tmp_path / "est.json")
    budget = int(0.4 * prof.peak_bytes)
    out = subprocess.run([sys.executable, "-m", "memprof", "plan", str(tmp_path / "est.json"), "--budget", str(budget),
                          "--levers", ",".join(ALL), *model, "--out", str(tmp_path / "plan.toml")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    p = load_plan(tmp_path / "plan.toml")
    assert p.predicted_peak_bytes <= budget and p.step_levers()
    assert "  step: " + ", ".join(p.step_levers()) in out.stdout


def test_micro_batches_refuse_to_wrap_a_custom_step():
    """measure_variant_ratios with a custom step: the micro-batch variant fails (kept in ``failed``), never
    silently timed on the default step instead."""
    def own_step(model, batch, opt, precision="fp32", scaler=None, device_type="cpu"):
        return default_step(model, batch, opt, precision, scaler, device_type)
    v = StepVariant(micro_batches=2)
    t = measure_variant_ratios(_build, _batch, [v], step=own_step, rounds=1, warmup=1)
    assert v not in t.ratios and "custom step" in t.failed[v]
