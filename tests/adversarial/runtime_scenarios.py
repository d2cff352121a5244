"""Interrupt trials and leave-no-trace orders of use, shared by tests/adversarial and
experiments/robustness_runtime.py.

Each scenario returns ``None`` when it held, else a one-line description of what did not. The process state a
scenario compares before and after (:func:`process_state`) is every hook registry and patch the tracker or
``apply`` could touch (``tests.common.hook_registries``), the signal handlers, the live trackers and applied
plans memprof keeps, and the model's module classes, instance attributes, parameters (objects, dtypes, values)
and buffers (objects, dtypes, shapes: values change by training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import memprof
from memprof.policy import apply as apply_mod
from memprof.policy.timing import uniform_plan
from memprof.tracking import interrupts
from memprof.tracking import tracker as tracker_mod
from tests.common import hook_registries

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "fixtures" / "interrupted_training.py"


class Blocks(torch.nn.Module):
    """Two Linear+ReLU blocks and a BatchNorm (buffers)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()) for _ in range(2))
        self.norm = torch.nn.BatchNorm1d(width)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


def model_state(model) -> dict:
    """What apply/remove must restore: classes, instance attributes, the optimizer-held parameter objects,
    dtypes and shapes of parameters and buffers."""
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "instance_attrs": [(n, sorted(k for k in vars(m) if not k.startswith("_"))) for n, m in model.named_modules()],
        "forwards": [(n, m.__dict__.get("forward")) for n, m in model.named_modules()],
        "params": [(n, id(p), p.dtype, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, b.dtype, tuple(b.shape)) for n, b in model.named_buffers()],
    }


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def process_state(model=None, opt=None) -> dict:
    # getattr: the same scenarios run against older memprof code, which kept none of these registries
    state = {**hook_registries(model, opt), "signals": interrupts.handler_state(),
             "live_trackers": list(getattr(tracker_mod, "_installed", [])),
             "applied_plans": len(getattr(apply_mod, "_APPLIED", {}))}
    if model is not None:
        state["model"] = model_state(model)
    if opt is not None:
        state["optimizer_step"] = opt.__dict__.get("step")
    return state


def differences(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if not _same(before[k], after.get(k)))


def _step(model, opt, x) -> None:
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _setup(seed: int = 0, width: int = 32):
    torch.manual_seed(seed)
    model = Blocks(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, torch.randn(8, width)


# -- interrupts --------------------------------------------------------------------------------------------
def interrupt_trial(seed: int, steps: int = 50, out_dir: str | None = None) -> str | None:
    """SIGINT (``os.kill`` from a timer thread) at a seeded random moment of ``steps`` tracked steps, in this
    process: the KeyboardInterrupt must reach the training code and leave no trace. Runs with one intra-op
    thread (a tiny step on a shared CPU otherwise waits on OpenMP for most of its time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pythons_sigint():
            return _interrupt_trial(seed, steps, out_dir)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def pythons_sigint():
    """SIGINT handled by Python's own handler (KeyboardInterrupt) while it lasts, as in a script started from
    a terminal: a process started in the background by a shell without job control (a CI runner) inherits
    SIGINT ignored, and Python then installs no handler of its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:  # in the child before exec: Python installs its own handler at start
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_trial(seed: int, steps: int, out_dir: str | None) -> str | None:
    rng = random.Random(seed)
    model, opt, x = _setup(seed, rng.choice((32, 64, 128)))
    for _ in range(2):
        t0 = time.perf_counter()
        _step(model, opt, x)
        step_s = time.perf_counter() - t0
    at_step, delay = rng.randrange(steps), rng.random() * step_s * 3
    started = [threading.Event() for _ in range(steps)]
    sent = threading.Event()

    def interrupt():
        started[at_step].wait(30)
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    before = process_state(model, opt)
    output = os.path.join(out_dir, "p.json") if out_dir else None

    @memprof.profile(steps=steps, output=output)
    def train():
        for i in range(steps):
            started[i].set()
            _step(model, opt, x)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    raised = False
    try:
        try:
            train()
            sent.wait(30)
            time.sleep(0.2)  # a signal sent as the loop ended is raised here at the latest
        except KeyboardInterrupt:
            raised = True
    finally:
        thread.join(30)
    problems = []
    if not raised:
        problems.append(f"SIGINT at step {at_step} never raised KeyboardInterrupt")
    diff = differences(before, process_state(model, opt))
    if diff:
        problems.append(f"left behind: {', '.join(diff)}")
    if out_dir:
        left = sorted(set(os.listdir(out_dir)) - {"p.json"})
        if left:
            problems.append(f"files left: {left}")
        if os.path.exists(output):
            try:
                memprof.load(output)
            except memprof.MemprofError as e:
                problems.append(f"partial profile: {e}")
    return f"seed {seed}: " + "; ".join(problems) if problems else None


def child_interrupt_trial(seed: int, out_dir: str, steps: int = 50) -> str | None:
    """The same in a child process (tests/fixtures/interrupted_training.py): the script must end by its
    KeyboardInterrupt (its traceback's last line) with nothing left behind."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(CHILD), str(seed), str(steps), out_dir], capture_output=True,
                       text=True, env=env, timeout=300, cwd=out_dir, preexec_fn=_default_sigint)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return f"seed {seed}: no report (exit {r.returncode}): {r.stderr[-300:]}"
    report = json.loads(lines[-1])
    problems = []
    # Python exits by SIGINT after an unhandled KeyboardInterrupt unless code runs in its finalisation (the
    # profiler check of hook_registries makes that happen here: exit status 1, also without memprof)
    last = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("USDT")][-1:]
    if r.returncode == 0 or last != ["KeyboardInterrupt"] or report["interrupted"] is None:
        problems.append(f"exit status {r.returncode}, last line {last}, interrupted={report['interrupted']}")
    if "Exception ignored" in r.stderr:
        problems.append("an exception was ignored")
    if not report["state_restored"]:
        problems.append(f"left behind: {report['changed']}")
    if report["leftover_files"] or report["profile_loads"] is False:
        problems.append(f"files: {report['leftover_files']}, profile loads: {report['profile_loads']}")
    return f"seed {seed}: " + "; ".join(problems) if problems else None


# -- leave-no-trace orders ------------------------------------------------------------------------------------
def _expect_error(kind, fn) -> str | None:
    try:
        fn()
    except kind as e:
        return None if str(e) else f"{kind.__name__} without a message"
    except Exception as e:
        return f"raised {type(e).__name__}: {e} instead of {kind.__name__}"
    return f"no {kind.__name__}"


def _orders_trackers(model, opt, x):
    def nested():
        with memprof.track(model, opt):
            _step(model, opt, x)
            problem = _expect_error(memprof.MemprofError, lambda: memprof.track(model, opt).start())
            _step(model, opt, x)
        return problem

    def started_twice():
        t = memprof.track(model, opt).start()
        problem = _expect_error(memprof.MemprofError, t.start)
        t.stop()
        return problem

    def paused_outer_stopped_first():
        a = memprof.track(model, opt).start()
        _step(model, opt, x)
        a.pause()
        b = memprof.track(model, opt).start()
        _step(model, opt, x)
        a.stop()
        _step(model, opt, x)
        b.stop()
        return None if a.profile.peak_bytes > 0 and b.profile.peak_bytes > 0 else "no profile"

    def resume_while_another_runs():
        a = memprof.track(model, opt).start()
        a.pause()
        b = memprof.track(model, opt).start()
        problem = _expect_error(memprof.MemprofError, a.resume)
        b.stop()
        a.resume()
        _step(model, opt, x)
        a.stop()
        return problem

    def stopped_in_step_with_a_later_post_hook():
        from torch.optim.optimizer import register_optimizer_step_post_hook

        t = memprof.track(model, opt, steps=1).start()
        later = register_optimizer_step_post_hook(lambda *a: None)
        _step(model, opt, x)  # the tracker stops inside this step's post-hook loop
        _step(model, opt, x)  # the next step sweeps its inert entry away
        later.remove()
        return None if not t.active else "still running"

    def block_raises():
        try:
            with memprof.track(model, opt):
                _step(model, opt, x)
                raise RuntimeError("the training code's own error")
        except RuntimeError:
            return None
        return "the error was lost"

    return {"trackers nested": nested, "tracker started twice": started_twice,
            "paused tracker stopped before the one started after it": paused_outer_stopped_first,
            "paused tracker resumed while another runs": resume_while_another_runs,
            "tracker stopped inside a step with a later post-hook": stopped_in_step_with_a_later_post_hook,
            "tracked block raises": block_raises}


def _orders_apply(model, opt, x):
    ckpt = uniform_plan(["blocks.0", "blocks.1"], "full")
    bf16 = dataclasses.replace(uniform_plan(["blocks.0", "blocks.1"], "keep"), precision="bf16")

    def applied_twice():
        h = memprof.apply(model, ckpt)
        _step(model, opt, x)
        problem = _expect_error(memprof.MemprofError, lambda: memprof.apply(model, bf16))
        _step(model, opt, x)
        h.remove()
        return problem

    def applied_to_a_submodule_of_a_planned_model():
        h = memprof.apply(model, bf16)
        sub = uniform_plan(["0"], "full")
        problem = _expect_error(memprof.MemprofError, lambda: memprof.apply(model.blocks[0], sub))
        h.remove()
        return problem

    def apply_remove_twice():
        for plan in (ckpt, bf16):
            h = memprof.apply(model, plan)
            _step(model, opt, x)
            h.remove()
            h.remove()
        return None

    def removed_after_an_error_in_forward():
        h = memprof.apply(model, bf16)
        try:
            with h:
                model("not a tensor")
        except Exception:
            pass
        return None if h._removed else "not removed"

    def tracker_inside_apply():
        h = memprof.apply(model, ckpt)
        with memprof.track(model, opt):
            _step(model, opt, x)
            h.remove()
            _step(model, opt, x)
        return None

    def apply_inside_tracker():
        t = memprof.track(model, opt).start()
        h = memprof.apply(model, ckpt)
        _step(model, opt, x)
        t.stop()
        _step(model, opt, x)
        h.remove()
        return None

    return {"plan applied twice": applied_twice,
            "plan applied to a submodule of a planned model": applied_to_a_submodule_of_a_planned_model,
            "apply/remove, remove twice, again": apply_remove_twice,
            "plan removed after an error in forward": removed_after_an_error_in_forward,
            "tracker started after apply, plan removed while tracking": tracker_inside_apply,
            "plan applied while tracking, tracker stopped first": apply_inside_tracker}


def _auto_case():
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from train_gpt import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 512, (4, 65))
    budget_model = TinyGPT()
    budget_opt = torch.optim.AdamW(budget_model.parameters(), lr=1e-3)
    with memprof.track(budget_model, budget_opt) as t:
        for _ in range(3):  # steady steps: the budget is measured as tests/test_auto.py does
            budget_model(data[:, :-1], data[:, 1:]).backward()
            budget_opt.step()
            budget_opt.zero_grad(set_to_none=True)
    budget = int(t.profile.peak_bytes * 0.85)
    return model, opt, data, budget


def auto_order(raises: bool, tmp: str) -> str | None:
    """``@memprof.auto`` with a budget that needs a plan: after the function returns (or raises) the model
    and every registry are as before the call."""
    model, opt, data, budget = _auto_case()
    before = process_state(model, opt)
    seen = {}

    @memprof.auto(budget=budget, profile_path=os.path.join(tmp, "a.json"), plan_path=os.path.join(tmp, "a.toml"))
    def train():
        for _ in range(3):
            model(data[:, :-1], data[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen["applied"] = seen.get("applied") or train.session.handle is not None
        if raises:
            raise ValueError("the training function's own error")

    try:
        train()
    except ValueError:
        if not raises:
            return "raised"
    if not seen.get("applied"):
        return "no plan was applied (the scenario needs one)"
    diff = differences(before, process_state(model, opt))
    return f"left behind: {', '.join(diff)}" if diff else None


def leave_no_trace_orders() -> dict:
    """name -> scenario() for trackers and apply/remove (auto: :func:`auto_order`)."""
    out = {}
    for group in (_orders_trackers, _orders_apply):
        for name in group(*_setup()):
            out[name] = (group, name)
    return out


def run_order(name: str) -> str | None:
    """Run one order of use on a fresh model; None when the process and model are left as they were."""
    group, _ = leave_no_trace_orders()[name]
    model, opt, x = _setup()
    _step(model, opt, x)  # optimizer state exists before
    before = process_state(model, opt)
    try:
        problem = group(model, opt, x)[name]()
    except Exception as e:
        problem = f"raised {type(e).__name__}: {e}"
    diff = differences(before, process_state(model, opt))
    if diff:
        problem = "; ".join(filter(None, [problem, f"left behind: {', '.join(diff)}"]))
    return problem
