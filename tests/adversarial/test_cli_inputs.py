"""Issue "hardened", finding 10: one-line usage errors, questionable inputs refused, a plan for two ranks not
"verified" by one process, ``plan --hf CONFIG.json``, and a scratch cache that stays bounded."""

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main

TINY_LLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_llama_config.json"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args", [["run", "--stepz", "3", "train.py"], ["plan"], ["report"], ["--nope"],
                                  ["plot", "x.json", "--top", "0"], ["estimate", "--format", "yaml"],
                                  ["diff", "a.json"]])
def test_click_usage_errors_take_one_line_and_exit_2(args):
    r = _cli(*args)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("memprof: error: ") and "--help" in r.stderr, r.stderr


@pytest.mark.parametrize("size", ["0", "0GiB", "-5"])
def test_estimate_device_memory_of_zero_or_less_is_refused(size):
    r = _cli("estimate", "--hf", TINY_LLAMA, "--device", "cpu", "--seq-len", "8", "--device-memory", size)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_diff_fail_over_must_be_finite(real_files, value):
    r = _cli("diff", real_files["tracked.json"], real_files["tracked.json"], "--fail-over", value)
    assert r.exit_code == 2 and "finite" in r.stderr and r.stderr.count("\n") == 1


def test_a_world_size_2_plan_applied_in_one_process_is_not_reported_verified(real_files, tmp_path):
    plan = memprof.load(real_files["plan.toml"])
    two = tmp_path / "two-ranks.toml"
    dataclasses.replace(plan, world_size=2, sharding=dataclasses.replace(plan.sharding, shard_group_size=2)).save(two)
    script = tmp_path / "train.py"
    script.write_text("import torch\nfrom memprof.zoo import GPT, GPTConfig, gpt_batch\ntorch.manual_seed(0)\n"
                      "cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64)\n"
                      "m = GPT(cfg)\nopt = torch.optim.AdamW(m.parameters())\nx, y = gpt_batch(cfg, 2)\n"
                      "for _ in range(2):\n    m(x, y).backward(); opt.step(); opt.zero_grad()\n")
    r = _cli("run", "--policy", two, "--out", tmp_path / "p.json", script)
    assert r.exit_code == 0, r.output
    assert "Plan verified" not in r.stderr
    assert "not verified: it is for world size 2 and the script ran as 1 process" in r.stderr


@pytest.mark.slow
def test_plan_hf_with_a_local_config_json_weighs_precision(tmp_path):
    est = tmp_path / "est.json"
    r = _cli("estimate", "--hf", TINY_LLAMA, "--device", "cpu", "--seq-len", "16", "--out", est)
    assert r.exit_code == 0, r.output
    r = _cli("plan", est, "--budget", "1GiB", "--levers", "checkpoint,precision", "--hf", TINY_LLAMA,
             "--seq-len", "16", "--format", "json")
    assert r.exit_code == 0, r.output  # "unknown model '.../tiny_llama_config.json'" before
    assert '"precision": "bf16' in r.stdout  # precision was weighed: bf16 is the fastest that fits


def test_the_scratch_cache_stays_bounded_over_100_tracker_uses():
    from memprof.tracking import scratch

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(4, 16)
    sizes = []
    for _ in range(100):
        with memprof.track(model, opt):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        sizes.append(len(scratch.CACHE))
    assert sizes[-1] == sizes[2], (sizes[2], sizes[-1])  # grew by 2 per use (profiler handles) before
