"""``memprof.runner``: unmodified scripts run as python would, tracked exactly as in-process tracking tracks them."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memprof
from memprof import runner
from memprof.errors import MemprofError
from tests.common import hook_registries
from tests.fixtures import train_script

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN_SCRIPT = FIXTURES / "train_script.py"
FAILING_SCRIPT = FIXTURES / "failing_script.py"


def write_script(folder: Path, body: str, name: str = "probe.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """``memprof run``'s library call on the unmodified training script: 2 of its 3 steps tracked."""
    out = tmp_path_factory.mktemp("run") / "prof.json"
    return runner.run(str(TRAIN_SCRIPT), ["--steps", "3"], steps=2, out=out)


# -- the acceptance test --------------------------------------------------------------------------------------
def test_script_run_peak_equals_in_process_tracking_to_the_byte(script_run, capsys):
    with memprof.track(steps=2) as tracker:
        train_script.main(["--steps", "3"])
    expected = tracker.profile
    got = script_run.profile
    assert script_run.exit_code == 0 and script_run.error is None
    assert got.peak_bytes == expected.peak_bytes
    assert dict(got.peak.by_category) == dict(expected.peak.by_category)
    assert (got.peak.step, got.peak.phase, got.peak.module) == (expected.peak.step, expected.peak.phase,
                                                                expected.peak.module)
    assert [s.peak_bytes for s in got.steps] == [s.peak_bytes for s in expected.steps]
    assert {k: m.param_bytes for k, m in got.modules.items()} == {k: m.param_bytes for k, m in expected.modules.items()}
    assert memprof.load(script_run.profile_path) == got


def test_profile_is_written_where_asked_and_tracks_only_the_first_steps(script_run):
    assert script_run.profile_path.name == "prof.json"
    assert len(script_run.profile.steps) == 2  # the script ran 3
    assert set(script_run.profile.modules) == {"", "fc1", "fc2", "head"}


# -- running as python would ----------------------------------------------------------------------------------
PROBE = """
    import json, sys
    print(json.dumps({"name": __name__, "file": __file__, "argv": sys.argv, "path0": sys.path[0],
                      "main_is_me": sys.modules["__main__"].__dict__ is globals()}))
"""


def test_script_sees_what_python_would_give_it_and_sys_is_restored(tmp_path, capsys):
    script = write_script(tmp_path, PROBE)
    argv, path = list(sys.argv), list(sys.path)
    result = runner.run(str(script), ["--lr", "3e-4", "-m", "x"], out=tmp_path / "p.json")
    seen = json.loads(capsys.readouterr().out)
    assert result.exit_code == 0
    assert seen == {"name": "__main__", "file": str(script), "argv": [str(script), "--lr", "3e-4", "-m", "x"],
                    "path0": os.path.realpath(tmp_path), "main_is_me": True}
    assert sys.argv == argv and sys.path == path


def test_module_target_runs_as_main_with_the_current_folder_first(monkeypatch, tmp_path, capsys):
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write_script(pkg, PROBE, "__main__.py")
    monkeypatch.chdir(tmp_path)
    result = runner.run("probe_pkg", ["a", "-b"], module=True, out=tmp_path / "p.json")
    seen = json.loads(capsys.readouterr().out)
    assert result.exit_code == 0
    assert seen["name"] == "__main__" and seen["main_is_me"]
    assert seen["argv"] == [str(pkg / "__main__.py"), "a", "-b"]
    assert seen["path0"] == str(tmp_path)


@pytest.mark.parametrize("body, code, message", [
    ("import sys; sys.exit(3)", 3, ""),
    ("import sys; sys.exit()", 0, ""),
    ("import sys; sys.exit('diverged at step 7')", 1, "diverged at step 7\n"),
    ("raise KeyboardInterrupt", 130, "KeyboardInterrupt"),
])
def test_exit_status_passes_through_as_the_interpreter_would(tmp_path, body, code, message):
    result = runner.run(str(write_script(tmp_path, body)), out=tmp_path / "p.json")
    assert result.exit_code == code
    assert message in result.stderr_text
    assert result.profile_path == tmp_path / "p.json" and result.profile_path.exists()


def test_uncaught_exception_gives_exit_1_python_traceback_and_a_partial_profile(tmp_path):
    out = tmp_path / "p.json"
    argv = list(sys.argv)
    result = runner.run(str(FAILING_SCRIPT), ["--fail", "error"], out=out)
    assert result.exit_code == 1
    assert isinstance(result.error, ValueError) and not result.out_of_memory
    text = result.stderr_text
    assert text.startswith("Traceback (most recent call last):\n")
    assert text.endswith("ValueError: loss is nan\n")
    first_frame = text.splitlines()[1]
    assert first_frame.startswith(f'  File "{FAILING_SCRIPT}"') and "<module>" in first_frame
    assert "runpy" not in text and "runner.py" not in text
    assert result.raised_at.endswith("failing_script.py:37 in fail_with_error")
    partial = memprof.load(out)
    assert partial == result.profile and len(partial.steps) == 1
    assert sys.argv == argv


def test_tracking_stops_inside_step_n_and_leaves_no_hooks(tmp_path):
    """At the start of step 2 (after 2 tracked steps) no mode and no global hook is left: no overhead."""
    record = tmp_path / "seen.json"
    script = write_script(tmp_path, f"""
        import json, torch
        from tests.fixtures.train_script import MLP, batch
        from torch.nn.modules import module as m
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = batch(8)
        seen = []
        for _ in range(3):
            seen.append([torch._C._len_torch_dispatch_stack(), len(m._global_forward_pre_hooks)])
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        with open({str(record)!r}, "w") as f:
            json.dump(seen, f)
    """)
    before = hook_registries()
    result = runner.run(str(script), steps=2, out=tmp_path / "p.json")
    assert result.exit_code == 0, result.stderr_text
    assert json.loads(record.read_text()) == [[1, 1], [1, 1], [0, 0]]
    assert len(result.profile.steps) == 2
    assert hook_registries() == before


# -- on_root_forward: the integration point for plans ---------------------------------------------------------
def test_on_root_forward_gets_the_root_model_once_before_tracking_sees_it(script_run, tmp_path):
    calls = []

    def freeze_fc2_weight(model, args, kwargs):
        calls.append(type(model).__name__)
        model.fc2.weight.requires_grad_(False)  # no grad, so AdamW keeps no state for it

    before = hook_registries()
    result = runner.run(str(TRAIN_SCRIPT), ["--steps", "3"], steps=2, out=tmp_path / "p.json",
                        on_root_forward=freeze_fc2_weight)
    assert calls == ["MLP"]
    assert hook_registries() == before
    fc2, fc2_full = result.profile.modules["fc2"], script_run.profile.modules["fc2"]
    weight = 512 * 512 * 4
    assert fc2_full.grad_bytes - fc2.grad_bytes == weight
    assert fc2_full.optimizer_bytes - fc2.optimizer_bytes == 2 * weight + 4  # exp_avg, exp_avg_sq, step


def test_a_memprof_error_from_on_root_forward_is_raised_not_blamed_on_the_script(tmp_path):
    def refuse(model, args, kwargs):
        raise MemprofError("the plan does not match this model")

    before = hook_registries()
    with pytest.raises(MemprofError, match="does not match"):
        runner.run(str(TRAIN_SCRIPT), ["--steps", "1"], out=tmp_path / "p.json", on_root_forward=refuse)
    assert hook_registries() == before


def test_missing_targets_are_memprof_errors(tmp_path):
    with pytest.raises(runner.RunTargetError, match="no such script file"):
        runner.run(str(tmp_path / "nope.py"))
    with pytest.raises(runner.RunTargetError, match="no module named 'no_such_module_xyz'"):
        runner.run("no_such_module_xyz", module=True)
    with pytest.raises(runner.RunTargetError, match="cannot find module"):
        runner.run("no_such_pkg_xyz.train", module=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(runner.RunTargetError, match="without __main__.py"):
        runner.run(str(tmp_path / "empty"))


# -- ranks ----------------------------------------------------------------------------------------------------
def test_rank_paths_and_environment():
    assert runner.rank_profile_path("out/memprof.json", 3) == Path("out/memprof.rank3.json")
    assert runner.rank_profile_path("prof", 0) == Path("prof.rank0")
    assert runner.distributed_rank({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert runner.distributed_rank({"RANK": "1"}) is None
    with pytest.raises(MemprofError, match="not within"):
        runner.distributed_rank({"RANK": "4", "WORLD_SIZE": "4"})


def _aged(prof, seconds: float):
    created = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
    env = dataclasses.replace(prof.environment, created=created.isoformat(timespec="seconds"))
    return dataclasses.replace(prof, environment=env)


def test_rank0_under_torchrun_names_its_file_and_gathers_every_rank(monkeypatch, tmp_path, script_run):
    out = tmp_path / "p.json"
    _aged(script_run.profile, 0).save(tmp_path / "p.rank1.json")  # rank 1 of this launch
    _aged(script_run.profile, 3600).save(tmp_path / "p.rank2.json")  # left by an earlier launch
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = runner.run(str(TRAIN_SCRIPT), ["--steps", "1"], steps=1, out=out, rank_timeout_s=0.3)
    assert result.profile_path == tmp_path / "p.rank0.json" and not out.exists()
    assert (result.profile.environment.rank, result.profile.environment.world_size) == (0, 3)
    assert set(result.rank_profiles) == {0, 1, 2}
    assert result.rank_profiles[0] == result.profile
    assert result.rank_profiles[1].peak_bytes == script_run.profile.peak_bytes
    assert result.rank_profiles[2] is None
    rows = runner.rank_rows(result.rank_profiles)
    assert [r.rank for r in rows] == [0, 1, 2] and rows[2].peak_bytes is None
    top = max(result.profile.peak.by_category.items(), key=lambda kv: kv[1])
    assert (rows[0].peak_bytes, rows[0].category, rows[0].category_bytes) == (result.profile.peak_bytes, *top)


def test_other_ranks_write_their_own_file_and_do_not_wait(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.run(str(TRAIN_SCRIPT), ["--steps", "1"], steps=1, out=tmp_path / "p.json")
    assert result.profile_path == tmp_path / "p.rank1.json"
    assert result.rank_profiles == {} and result.rank == 1
    assert memprof.load(result.profile_path).environment.rank == 1


def test_a_real_oom_in_the_script_is_flagged_with_its_partial_profile(tmp_path):
    result = runner.run(str(FAILING_SCRIPT), ["--fail", "oom"], out=tmp_path / "p.json")
    assert result.exit_code == 1
    assert isinstance(result.error, torch.OutOfMemoryError)
    assert result.out_of_memory and not result.rehearsed_oom
    assert memprof.load(tmp_path / "p.json") == result.profile
