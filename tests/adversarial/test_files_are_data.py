"""Issue "hardened", finding 1: nothing named in a profile or plan is imported, called or evaluated.

Each test plants a module next to the files (``pwn.py``, which would write a marker file when imported) and
names it, or ``os:abort``, inside the file; memprof must read it as text only.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from memprof.cli import main

PWN = "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('pwned')\n" \
      "def build():\n    return None\ndef make(*a):\n    return None\n"


@pytest.fixture
def planted(tmp_path, monkeypatch, real_files, profile_data):
    """cwd with pwn.py, and a real profile whose source names pwn's factory."""
    (tmp_path / "pwn.py").write_text(PWN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    profile_data["assumptions"]["source"] = "factory:pwn:build:pwn:make:batch=1:seq="
    profile_data["assumptions"]["model"] = "pwn:build"
    profile = tmp_path / "shared.json"
    profile.write_text(json.dumps(profile_data))
    yield tmp_path, profile
    sys.modules.pop("pwn", None)


def _not_imported(folder: Path) -> bool:
    return not (folder / "IMPORTED").exists() and "pwn" not in sys.modules


def test_plan_of_a_profile_naming_a_factory_refuses_in_one_line_without_importing_it(planted):
    folder, profile = planted
    r = CliRunner().invoke(main, ["plan", str(profile), "--budget", "1GiB", "--levers", "checkpoint,precision"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.count("\n") == 1 and "never imports code named in a file" in r.stderr
    assert "--model pwn:build --batch pwn:make" in r.stderr  # says how to name the model instead
    assert _not_imported(folder)


def test_profile_naming_os_abort_does_not_abort_the_process(tmp_path, profile_data):
    profile_data["assumptions"]["source"] = "factory:os:abort:os:abort:batch=1:seq="
    profile = tmp_path / "abort.json"
    profile.write_text(json.dumps(profile_data))
    r = subprocess.run([sys.executable, "-m", "memprof", "plan", str(profile), "--budget", "1GiB", "--levers",
                        "checkpoint,precision"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr  # -6 (SIGABRT) when os.abort was called
    assert r.stderr.count("\n") == 1 and "os:abort" in r.stderr


def test_report_plot_diff_and_checkpoint_plans_of_such_a_profile_import_nothing(planted, real_files):
    folder, profile = planted
    runner = CliRunner()
    for args in (["report", str(profile)], ["report", str(profile), "--format", "json"],
                 ["plot", str(profile), "--out", str(folder / "plots"), "--html"],
                 ["diff", str(profile), str(real_files["tracked.json"])],
                 ["plan", str(profile), "--budget", "1GiB", "--out", str(folder / "p.toml")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, (args, r.output)
    assert _not_imported(folder)


def test_a_plan_whose_texts_name_code_is_applied_as_data(planted, real_files):
    """Every string of a plan (its model name, explanation, assumptions) is only shown; applying it to a
    script imports nothing it names."""
    folder, _ = planted
    text = real_files["plan.toml"].read_text()
    text = text.replace('model = "', 'model = "pwn:build ', 1)
    plan = folder / "pwn-plan.toml"
    plan.write_text(text + '\n[assumptions]\nsource = "factory:pwn:build:pwn:make"\n' if "[assumptions]" not in text
                    else text.replace("[assumptions]", '[assumptions]\nsource = "factory:pwn:build:pwn:make"'))
    script = folder / "train.py"
    script.write_text("import torch\nm = torch.nn.Linear(4, 4)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                      "for _ in range(2):\n    m(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad()\n")
    r = CliRunner().invoke(main, ["run", "--policy", str(plan), "--out", str(folder / "p.json"), str(script)])
    assert "Traceback" not in r.output
    assert _not_imported(folder)
