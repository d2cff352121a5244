"""The README's examples run as written: every ``$ memprof ...`` line of its ``console`` blocks, in order, in
one folder (so a command may read what an earlier one wrote), with the repository's ``policies/`` beside
them and, for ``train.py``, a user's script training the demo GPT the example plan was made for."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from memprof.cli import main

ROOT = Path(__file__).resolve().parents[1]

TRAIN_PY = '''
import argparse
import torch
from memprof.zoo import DEMO_GPT, GPT, gpt_batch

ap = argparse.ArgumentParser()
ap.add_argument("--lr", type=float, default=1e-3)
args = ap.parse_args()
torch.manual_seed(0)
model = GPT(DEMO_GPT)
opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
x, y = gpt_batch(DEMO_GPT, 8)
for _ in range(3):
    model(x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print("trained")
'''


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", text, flags=re.S)
    return [shlex.split(line[2:]) for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_the_readme_has_console_examples_of_memprof_commands():
    commands = readme_commands()
    assert len(commands) >= 3 and all(c[0] == "memprof" for c in commands)


@pytest.mark.slow
def test_every_readme_console_command_runs_as_written(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    (tmp_path / "train.py").write_text(TRAIN_PY)
    monkeypatch.chdir(tmp_path)
    for argv in readme_commands():
        r = CliRunner().invoke(main, argv[1:])
        assert r.exit_code == 0, (argv, r.output[-3000:])
    assert (tmp_path / "est.json").is_file() and (tmp_path / "policies" / "x.toml").is_file()
