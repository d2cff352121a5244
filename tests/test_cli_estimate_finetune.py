"""`memprof estimate` on real code: the device it assumed (first line), the model's own loss, LoRA and DPO
from the command line, each compared with the same step run for real on the CPU."""

import json

import pytest
import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main
from memprof.estimation.finetune import finetune_source
from memprof.tracking import scratch
from tests.fixtures import nanogpt_model as nanogpt
from tests.test_estimate_real_code import _real_peak

NANOGPT = "tests.fixtures.nanogpt_model:build"
LLAMA_JSON = "tests/fixtures/tiny_llama_config.json"


def run(*args):
    return CliRunner().invoke(main, ["estimate", *args], catch_exceptions=False)


def _saved(tmp_path, *args):
    out = tmp_path / "est.json"
    scratch.clear_cache()
    r = run(*args, "--device", "cpu", "--format", "json", "--out", str(out))
    scratch.clear_cache()
    assert r.exit_code == 0, r.output
    return memprof.load(out)


def test_first_line_names_the_default_device_and_whether_cuda_is_emulated():
    r = run("--model", NANOGPT, "--depth", "0")
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert first.startswith("Device: a CUDA GPU, times modelled for an H100-80GB (the default")
    assert "pass --device cpu or --device NAME" in first
    emulated = "CUDA emulated on this machine's CPU kernels" in first
    assert emulated == (not torch.cuda.is_available())


@pytest.mark.parametrize("device,first", [
    ("cpu", "Device: cpu (this machine's CPU"),
    ("L4-24GB", "Device: L4-24GB (CUDA"),
])
def test_first_line_names_the_device_given(device, first):
    r = run("--model", NANOGPT, "--depth", "0", "--device", device)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].startswith(first)
    if device != "cpu" and not torch.cuda.is_available():
        assert "emulated" in r.stdout.splitlines()[0]


def test_sweep_and_json_name_the_device_too():
    sweep = run("--model", NANOGPT, "--sweep", "batch-size=1,2")
    assert sweep.stdout.splitlines()[0].startswith("Device: a CUDA GPU")
    data = json.loads(run("--model", NANOGPT, "--device", "cpu", "--format", "json").stdout)
    assert data["device_assumed"].startswith("Device: cpu")


def test_help_says_what_the_default_device_is():
    text = " ".join(CliRunner().invoke(main, ["estimate", "--help"]).output.split())
    assert "Default: a CUDA GPU, times modelled for an H100-80GB" in text
    assert "CUDA is emulated on this machine's CPU kernels" in text


def test_model_estimate_peaks_where_the_real_step_peaks(tmp_path):
    prof = _saved(tmp_path, "--model", NANOGPT, "--batch-size", "4")
    torch.manual_seed(0)
    model, batch = nanogpt.build(), nanogpt.make_batch(4)
    opt = memprof.training.make_optimizer("adamw", model.parameters())
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            memprof.training.default_step(model, batch, opt)
    real = tracker.profile
    assert abs(prof.peak_bytes - real.peak_bytes) <= 0.005 * real.peak_bytes, (prof.peak_bytes, real.peak_bytes)
    assert prof.peak.phase == real.peak.phase == "backward"
    assert prof.assumptions["loss"] == "the model's own loss (element 1 of its output tuple)"


def _hf_arch():
    pytest.importorskip("transformers")
    from memprof.estimation import architecture_from_config_file

    return architecture_from_config_file(LLAMA_JSON)


def test_lora_from_the_cli_estimates_within_half_a_percent_of_the_peft_model_trained(tmp_path):
    pytest.importorskip("peft")
    arch = _hf_arch()
    prof = _saved(tmp_path, "--hf", LLAMA_JSON, "--seq-len", "64", "--batch-size", "2", "--lora", "8")
    build, batch_for, step, _ = finetune_source(arch.build_model, lambda b: arch.make_batch(b, 64), lora=8)
    real = _real_peak(build, lambda: batch_for(2), step)
    assert abs(prof.peak_bytes - real) <= 0.005 * real, (prof.peak_bytes, real)
    assert "LoRA r=8" in prof.assumptions["model"]


def test_dpo_from_the_cli_estimates_within_half_a_percent_of_the_dpo_step_run(tmp_path):
    arch = _hf_arch()
    prof = _saved(tmp_path, "--hf", LLAMA_JSON, "--seq-len", "64", "--batch-size", "1", "--method", "dpo",
                  "--dpo-reference", "precomputed")
    build, batch_for, step, _ = finetune_source(arch.build_model, lambda b: arch.make_batch(b, 64),
                                                method="dpo", dpo_reference="precomputed")
    real = _real_peak(build, lambda: batch_for(1), step)
    assert abs(prof.peak_bytes - real) <= 0.005 * real, (prof.peak_bytes, real)
    assert prof.assumptions["loss"].startswith("the DPO loss")


@pytest.mark.slow
def test_the_planner_re_estimates_the_same_fine_tuning_method_of_a_catalog_model(tmp_path):
    pytest.importorskip("peft")
    from memprof.estimation.sources import source_from_profile

    prof = _saved(tmp_path, "--hf", "gpt2", "--seq-len", "8", "--lora", "8")  # GPT-2's Conv1D attention
    assert prof.assumptions["source"].endswith(":lora=8")
    again = source_from_profile(prof).profile("fp32")
    assert again.peak_bytes == prof.peak_bytes
    from memprof.estimation import get_architecture
    from memprof.estimation.finetune import lora_factory

    with torch.device("meta"):  # the hand count: the adapters' parameters are the only ones with gradients
        model = lora_factory(get_architecture("gpt2").build_model, 8)()
    trained = [p for n, p in model.named_parameters() if p.requires_grad]
    assert prof.modules[""].grad_bytes == sum(4 * p.numel() for p in trained) == 12 * 4 * 8 * (768 + 2304)


@pytest.mark.parametrize("args,message", [
    (["--model", NANOGPT, "--lora-targets", "c_attn"], "add --lora R"),
    (["--model", NANOGPT, "--dpo-reference", "precomputed"], "--dpo-reference goes with --method dpo"),
    (["--model", NANOGPT, "--lora", "8"], "--lora-targets"),
])
def test_fine_tuning_options_that_do_not_fit_together_say_what_to_do(args, message):
    pytest.importorskip("peft")
    r = CliRunner().invoke(main, ["estimate", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
