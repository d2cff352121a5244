"""``@memprof.profile`` on training functions that know nothing about memprof."""

import json

import pytest
import torch

import memprof
from tests.common import CASES, hook_registries, make_optimizer, train_step


def test_decorator_tracks_a_loop_without_the_model_and_is_gone_during_step_n_plus_1(tmp_path):
    case = CASES["gpt"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    before = hook_registries(model, opt)
    during = {}
    out = tmp_path / "prof.json"

    @memprof.profile(steps=2, output=str(out))
    def train(n_steps):
        for i in range(n_steps):
            if i == 2:  # the start of step N+1 = 3
                during["step3"] = hook_registries(model, opt)
            train_step(case, model, opt)
        return "trained"

    assert train(4) == "trained"
    assert during["step3"] == before  # no module/optimizer/grad hook, no dispatch mode, no patch
    prof = memprof.load(out)
    assert len(prof.steps) == 2
    assert prof == train.profile
    assert "blocks.1.mlp.c_fc" in prof.modules  # found without being told about the model
    assert prof.modules[""].param_bytes > 0
    assert hook_registries(model, opt) == before


def test_decorator_lets_exceptions_through_and_still_writes_the_profile(tmp_path):
    case = CASES["tied-inplace"]()
    model, opt = case.model, make_optimizer("sgd-momentum", case.model.parameters())
    before = hook_registries(model, opt)

    class Diverged(Exception):
        pass

    @memprof.profile(steps=5, output=str(tmp_path / "p.json"))
    def train():
        train_step(case, model, opt)
        raise Diverged("loss is nan")

    with pytest.raises(Diverged, match="loss is nan"):
        train()
    assert hook_registries(model, opt) == before
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["schema"] == "memprof.profile/1" and len(data["steps"]) == 1


def test_bare_decorator_writes_memprof_json_and_later_calls_run_untracked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case = CASES["tied-inplace"]()
    model, opt = case.model, make_optimizer("adamw", case.model.parameters())
    modes = []

    @memprof.profile
    def train():
        train_step(case, model, opt)
        modes.append(torch._C._len_torch_dispatch_stack())
        return 7

    assert train() == 7 and train() == 7
    assert modes == [1, 0]  # tracked the first time only
    assert memprof.load(tmp_path / "memprof.json").peak_bytes == train.profile.peak_bytes


def test_decorator_rejects_bad_arguments():
    with pytest.raises(memprof.MemprofError, match="steps must be a positive integer"):
        memprof.profile(steps=0)(lambda: None)
    with pytest.raises(memprof.MemprofError, match="decorates a function"):
        memprof.profile(42)
