"""`memprof estimate` end to end with click's CliRunner."""

import json

import pytest
from click.testing import CliRunner

from memprof.cli import main

TINY = "tests.fixtures.tiny_models:build"


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_models_names_the_catalog():
    r = run("estimate", "--list-models")
    assert r.exit_code == 0
    for name in ("gpt2", "gpt2-xl", "llama-2-7b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b",
                 "bert-base", "vit-base"):
        assert name in r.output


def test_estimate_says_whether_it_fits_and_json_matches_the_saved_profile(tmp_path):
    out = tmp_path / "est.json"
    r = run("estimate", "--model", TINY, "--batch-size", "2", "--device-memory", "1GiB", "--format", "json",
            "--out", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    import memprof

    prof = memprof.load(out)
    assert prof.estimated
    assert data["summary"]["peak_bytes"] == prof.peak_bytes
    assert data["fits"] is True and data["summary"]["capacity_bytes"] == 1024**3
    table = run("estimate", "--model", TINY, "--device-memory", "100KiB")
    assert "does NOT fit" in table.output and "blocks.0" in table.output


def test_sweep_reports_the_largest_batch_that_fits():
    r = run("estimate", "--model", TINY, "--sweep", "batch-size=1,2,4,64", "--device-memory", "40MiB",
            "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    peaks = [row["peak_bytes"] for row in data["batch_sizes"]]
    assert peaks == sorted(peaks)  # more batch, more memory
    fitting = [row["batch_size"] for row in data["batch_sizes"] if row["peak_bytes"] <= 40 * 1024**2]
    assert data["largest_fitting_batch_size"] == max(fitting)


def test_hf_config_json_builds_and_sharding_cuts_per_rank_memory():
    pytest.importorskip("transformers")
    cfg = "tests/fixtures/tiny_llama_config.json"
    one = json.loads(run("estimate", "--hf", cfg, "--seq-len", "64", "--format", "json").stdout)
    four = json.loads(run("estimate", "--hf", cfg, "--seq-len", "64", "--world-size", "4", "--sharding", "full",
                          "--format", "json").stdout)
    assert four["summary"]["world_size"] == 4
    assert four["summary"]["by_category"]["optimizer"] < one["summary"]["by_category"]["optimizer"] / 3


@pytest.mark.parametrize("args,message", [
    (["--hf", "llama-2-7"], "unknown model 'llama-2-7'; did you mean llama-2-7b"),
    (["--hf", "gpt2", "--seq-len", "5000"], "--seq-len 5000 exceeds gpt2's maximum of 1024"),
    (["--model", "tests.fixtures.tiny_models:broken"], "broken failed under fake tensors: RuntimeError: this factory"),
    (["--model", "tests.fixtures.tiny_models:nothing"], "has no 'nothing'"),
    (["--model", "no_such_pkg.models:build"], "cannot import 'no_such_pkg.models'"),
    (["--model", TINY, "--device", "H100"], "unknown device 'H100'; did you mean H100-80GB"),
    (["--hf", "tests/fixtures/missing.json"], "missing.json: no such file"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    r = CliRunner().invoke(main, ["estimate", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_usage_errors_exit_2():
    assert CliRunner().invoke(main, ["estimate"]).exit_code == 2  # neither --model nor --hf
    assert CliRunner().invoke(main, ["estimate", "--model", TINY, "--hf", "gpt2"]).exit_code == 2
    assert CliRunner().invoke(main, ["estimate", "--model", TINY, "--sweep", "lr=1,2"]).exit_code == 2
    assert CliRunner().invoke(main, ["estimate", "--model", TINY, "--batch-size", "0"]).exit_code == 2
    assert CliRunner().invoke(main, ["estimate", "--frobnicate"]).exit_code == 2
