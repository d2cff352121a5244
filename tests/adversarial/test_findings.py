"""Findings of the 2026-11 robustness review (issue "hardened"), each as a test that failed on that code."""

import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main
from memprof.policy.timing import uniform_plan


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
                                          for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.sum()


def test_remove_of_a_bf16_plan_restores_buffer_dtypes_and_the_model_trains_again():
    import dataclasses

    model = BNNet()
    before = {n: b.dtype for n, b in model.named_buffers()}
    plan = dataclasses.replace(uniform_plan(["blocks.0", "blocks.1"], "keep"), precision="bf16")
    handle = memprof.apply(model, plan)
    assert {b.dtype for n, b in model.named_buffers() if b.is_floating_point()} == {torch.bfloat16}
    handle.remove()
    assert {n: b.dtype for n, b in model.named_buffers()} == before
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model(torch.randn(4, 8)).backward()  # "expected scalar type Float but found BFloat16" before


def test_run_budget_on_a_model_without_repeated_blocks_that_fits_is_not_refused(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import torch\nm = torch.nn.Linear(64, 64)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                      "for _ in range(3):\n    m(torch.randn(32, 64)).sum().backward(); opt.step(); opt.zero_grad()\n"
                      "print('done')\n")
    r = CliRunner().invoke(main, ["run", "--budget", "1GiB", "--out", str(tmp_path / "p.json"), "--plan-out",
                                  str(tmp_path / "plan.toml"), str(script)])
    assert r.exit_code == 0 and "done" in r.stdout and "nothing to change" in r.stderr, r.output


def test_run_budget_with_an_unwritable_plan_out_is_not_the_scripts_failure(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import torch\nm = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), "
                      "torch.nn.ReLU()) for _ in range(3)])\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                      "for _ in range(3):\n    m(torch.randn(32, 64)).sum().backward(); opt.step(); opt.zero_grad()\n"
                      "print('done')\n")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder is needed")
    r = CliRunner().invoke(main, ["run", "--budget", "1GiB", "--out", str(tmp_path / "p.json"), "--plan-out",
                                  str(blocked / "plan.toml"), str(script)])
    assert "done" in r.stdout and "Traceback" not in r.output
    assert "could not write the plan to" in r.stderr
    assert r.exit_code == 0
