"""Precision plans on code written for fp32 (issue "hardened", finding 8): an fp16 plan on a model whose output
is half precision trains (its loss scaling hook keeps the gradient's dtype), and a bf16-parameter plan runs an
unmodified fp32 script (the root's floating inputs are cast to bf16). Numerics: the losses equal the same
precision applied by hand (autocast and ``GradScaler`` written into the loop; the model and its inputs cast
to bf16).
"""

import copy
import dataclasses
import re

import torch
from click.testing import CliRunner

import memprof
from memprof.cli import main
from memprof.policy.timing import uniform_plan


class HalfOut(torch.nn.Module):
    """A model whose output (the loss) is fp16 under fp16 autocast."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def forward(self, x, y):
        return (self.blocks(x) - y).square().mean().to(torch.float16)


def _plan(units, precision):
    return dataclasses.replace(uniform_plan(units, "keep"), precision=precision)


def test_an_fp16_plan_trains_a_model_with_a_half_precision_output_like_autocast_and_gradscaler_by_hand():
    torch.manual_seed(0)
    model = HalfOut()
    by_hand = copy.deepcopy(model)
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with memprof.apply(model, _plan(["blocks"], "fp16-autocast"), optimizer=opt):
        planned = []
        for _ in range(5):
            loss = model(x, y)
            loss.backward()  # "hook 'scale' has changed the type of value" on the 2026-11 code
            opt.step()
            opt.zero_grad()
            planned.append(loss.item())
    opt2 = torch.optim.SGD(by_hand.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    hand = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = by_hand(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt2)
        scaler.update()
        opt2.zero_grad()
        hand.append(loss.item())
    assert planned == hand
    assert hand[-1] < hand[0]  # it trained (the first steps are skipped while the scale settles)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))


def _losses_bf16_by_hand(steps=3):
    model = _mlp().to(torch.bfloat16)
    torch.manual_seed(1)
    x, y = torch.randn(16, 32), torch.randn(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x.to(torch.bfloat16)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_a_bf16_plan_runs_fp32_code_with_the_losses_of_bf16_by_hand():
    model = _mlp()
    torch.manual_seed(1)
    x, y = torch.randn(16, 32), torch.randn(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    planned = []
    with memprof.apply(model, _plan(["0", "2"], "bf16")):
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(model(x), y)  # fp32 inputs, as the code was written
            loss.backward()
            opt.step()
            opt.zero_grad()
            planned.append(loss.item())
    assert planned == _losses_bf16_by_hand()
    assert all(p.dtype == torch.float32 for p in model.parameters())


SCRIPT = """import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
torch.manual_seed(1)
x, y = torch.randn(16, 32), torch.randn(16, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"loss {loss.item()!r}")
"""


def test_run_policy_with_a_bf16_plan_runs_an_unmodified_fp32_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    _plan(["0", "2"], "bf16").save(tmp_path / "bf16.toml")
    r = CliRunner().invoke(main, ["run", "--policy", str(tmp_path / "bf16.toml"), "--out", str(tmp_path / "p.json"),
                                  "--steps", "2", str(script)])
    assert r.exit_code == 0, r.output
    losses = [float(v) for v in re.findall(r"loss ([-0-9.e]+)", r.stdout)]
    hand = _losses_bf16_by_hand()
    assert len(losses) == 3
    assert all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(losses, hand)), (losses, hand)
