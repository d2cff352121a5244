"""Robustness of memprof against bad input, mutated files, kills and interrupts (issue "hardened").

    python experiments/robustness.py            # full: 5,000 fuzzed files, 30 kills (< 10 minutes)
    python experiments/robustness.py --quick    # a few minutes on a busy CPU

Writes results/robustness.json: per category the cases tried and held, and what failed:

- "cli bad input": scripted command lines (usage errors, refused values, outputs that would overwrite an input
  or a file memprof did not write); held = exit code 2, one line on stderr, no traceback, inputs unchanged
  (torchao is imported first: its import-time lines are not memprof's answer).
- "fuzzed files": mutated real profiles and plans (tests/adversarial/fuzzing.py); held = ``memprof.load``
  raised nothing but MemprofError and what loaded rendered through report, plot (figure data; a share drawn
  as PNG and HTML), diff and plan.
- "kills": ``kill -9`` of ``memprof run``, ``memprof plan --out`` and of a process writing profiles in a loop, at
  random moments; held = the output is absent or a complete file (the old one or the new one), and after the
  next write into that folder no temporary file is left.
- "interrupts", "leave-no-trace orders": from experiments/robustness_runtime.py (``run_categories(quick)``)
  when present, else recorded as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import write_result  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import memprof  # noqa: E402
from memprof.cli import main  # noqa: E402
from memprof.files import TEMP_PREFIX  # noqa: E402
from tests.adversarial import fuzzing  # noqa: E402

SCRIPT = ("import torch\nm = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()) "
          "for _ in range(4)])\nopt = torch.optim.AdamW(m.parameters())\nfor _ in range({steps}):\n"
          "    m(torch.randn(16, 64)).sum().backward(); opt.step(); opt.zero_grad()\nprint('done')\n")
TINY_LLAMA = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_llama_config.json"


def _category(tried=0, held=0, failures=None) -> dict:
    return {"tried": tried, "held": held, "failures": list(failures or [])}


def _add(cat: dict, ok: bool, what: str) -> None:
    cat["tried"] += 1
    cat["held"] += int(ok)
    if not ok and len(cat["failures"]) < 50:
        cat["failures"].append(what[:400])


# -- cli bad input -----------------------------------------------------------------------------------------------
def cli_cases(folder: Path, files: dict[str, Path]) -> list[tuple[list[str], list[Path]]]:
    """(argv, files that must stay unchanged) for every scripted bad command line."""
    script = folder / "train.py"
    script.write_text(SCRIPT.format(steps=2))
    foreign = folder / "notes.txt"
    foreign.write_text("mine\n")
    (folder / "timeline.png").write_bytes(b"my picture")
    prof, plan, est = str(files["tracked.json"]), str(files["plan.toml"]), str(files["estimated.json"])
    s, f = str(script), str(foreign)
    bad_json = folder / "bad.json"
    bad_json.write_text('{"schema": "memprof.profile/1", "modules": []}')
    truncated = folder / "truncated.json"
    truncated.write_text(files["tracked.json"].read_text()[:500])
    keep = [script, foreign, files["tracked.json"], files["plan.toml"], folder / "timeline.png"]
    cases = [
        ["run"], ["run", "--stepz", "3", s], ["run", "--steps", "0", s], ["run", "--steps", "x", s],
        ["run", "--device-memory", "0", s], ["run", "--device-memory", "-1GiB", s], ["run", "--device-memory", "lots", s],
        ["run", "--budget", "0", s], ["run", "--budget", "nonsense-GPU", s], ["run", "--levers", "magic", "--budget", "1GiB", s],
        ["run", "--policy", plan, "--budget", "1GiB", s], ["run", "--policy", prof, s], ["run", "--policy", f, s],
        ["run", str(folder / "missing.py")], ["run", str(folder)], ["run", "-m", "no_such_module_xyz"],
        ["run", "--out", s, s], ["run", "--force", "--out", s, s], ["run", "--out", f, s],
        ["run", "--budget", "1GiB", "--plan-out", s, s], ["run", "--policy", plan, "--out", plan, s],
        ["run", "--out", str(folder), s],
        ["report"], ["report", str(folder / "missing.json")], ["report", f], ["report", plan], ["report", str(bad_json)],
        ["report", str(truncated)], ["report", prof, "--sort", "nope"], ["report", prof, "--depth", "-1"],
        ["report", prof, "--top", "0"], ["report", prof, "--format", "yaml"], ["report", prof, "--units", "TB"],
        ["plot", prof, "--out", str(folder)], ["plot", prof, "--out", f], ["plot", prof, "--top", "0"], ["plot", plan],
        ["diff", prof], ["diff", prof, plan], ["diff", prof, prof, "--fail-over", "nan"],
        ["diff", prof, prof, "--fail-over", "inf"], ["diff", prof, prof, "--fail-over", "-1"],
        ["diff", prof, str(bad_json)],
        ["plan", prof], ["plan", prof, "--budget", "0"], ["plan", prof, "--budget", "x"], ["plan", plan, "--budget", "1GiB"],
        ["plan", prof, "--budget", "1GiB", "--levers", "magic"], ["plan", prof, "--budget", "1GiB", "--out", prof],
        ["plan", prof, "--budget", "1GiB", "--out", s], ["plan", prof, "--budget", "1GiB", "--out", f],
        ["plan", prof, "--budget", "1GiB", "--plot", s], ["plan", prof, "--budget", "1GiB", "--world-size", "0"],
        ["plan", prof, "--budget", "1GiB", "--batch", "x:y"], ["plan", prof, "--budget", "1B"],
        ["plan", est, "--budget", "1GiB", "--levers", "precision"],
        ["estimate"], ["estimate", "--hf", "no-such-model"], ["estimate", "--hf", str(TINY_LLAMA), "--device-memory", "0"],
        ["estimate", "--hf", str(TINY_LLAMA), "--device-memory", "-5"], ["estimate", "--hf", str(TINY_LLAMA), "--out", s],
        ["estimate", "--hf", str(TINY_LLAMA), "--out", f], ["estimate", "--hf", "gpt2", "--model", "a:b"],
        ["estimate", "--hf", str(TINY_LLAMA), "--seq-len", "100000"], ["estimate", "--hf", f],
        ["estimate", "--model", "no_such_pkg_xyz:build"], ["estimate", "--model", "os"],
        ["estimate", "--hf", "gpt2", "--sweep", "batch-size=a"], ["estimate", "--hf", "gpt2", "--device", "H100-80GB",
                                                                    "--device-memory", "1GiB"],
        ["demo", "--out", f], ["demo", "--budget-fraction", "2"], ["--nope"], ["nosuchcommand"],
    ]
    return [(c, keep) for c in cases]


def run_cli(quick: bool) -> dict:
    # torchao prints "Failed to load ..." lines when transformers first imports it (building a model): noise of
    # the process's first import, not memprof's answer to a bad input, so it is imported before the cases run
    try:
        import torchao  # noqa: F401
    except ImportError:
        pass

    cat = _category()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = _corpus_files(folder / "corpus")
        runner = CliRunner()
        for argv, keep in cli_cases(folder, files):
            before = {p: p.read_bytes() for p in keep}
            r = runner.invoke(main, argv)
            unchanged = all(p.read_bytes() == b for p, b in before.items())
            lines = r.stderr.strip().splitlines()
            ok = (r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("memprof: error: ")
                  and "Traceback" not in r.output and unchanged)
            _add(cat, ok, f"{' '.join(argv)} -> exit {r.exit_code}, {len(lines)} stderr lines, unchanged={unchanged}: "
                          f"{r.stderr.strip()[:200]}")
    return cat


# -- fuzzed files -------------------------------------------------------------------------------------------------
def _corpus_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, text in fuzzing.corpus().items():
        out[name] = folder / name
        out[name].write_text(text)
    return out


def run_fuzz(quick: bool, seed: int = 0) -> dict:
    n, drawn = (1500, 40) if quick else (5000, 80)
    cat = _category()
    cat["drawn"] = 0
    cat["loaded"] = 0
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = _corpus_files(folder / "corpus")
        good = memprof.load(files["tracked.json"])
        names = list(files)
        for i in range(n):
            name = rnd.choice(names)
            path = folder / f"m{Path(name).suffix}"
            path.write_text(fuzzing.mutate_text(name, files[name].read_text(), rnd), encoding="utf-8")
            try:
                memprof.load(path)
                cat["loaded"] += 1
                draw = cat["drawn"] < drawn and rnd.random() < 0.5
            except Exception:
                draw = False
            cat["drawn"] += int(draw)
            problem = fuzzing.check_file(path, good, folder, draw=draw)
            _add(cat, problem is None, f"example {i} ({name}, seed {seed}): {problem}")
    return cat


# -- kills --------------------------------------------------------------------------------------------------------
WRITER = """
import dataclasses, sys, memprof
from memprof.files import atomic_write_text
prof = memprof.load(sys.argv[1])
text = dataclasses.replace(prof, timeline=prof.timeline * 100).to_json()  # a few MB: kills land inside writes
print("ready", flush=True)
while True:
    atomic_write_text(sys.argv[2], text)  # what Profile.save does after serialising
"""


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) or p.name.endswith(".tmp"))


def _complete(path: Path, kind: type) -> bool:
    if not path.exists():
        return True
    try:
        return isinstance(memprof.load(path), kind)
    except memprof.MemprofError:
        return False


def _kill_at_random(argv: list[str], delay: float, cwd: Path) -> float:
    started = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if argv[1] == "-c":  # the writer loop: wait until it writes
        p.stdout.readline()
        started = time.monotonic()
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return time.monotonic() - started


def run_kills(quick: bool, seed: int = 1) -> dict:
    n = 4 if quick else 10
    cat = _category()
    rnd = random.Random(seed)
    py = sys.executable
    env_path = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = _corpus_files(folder / "corpus")
        script = folder / "train.py"
        script.write_text(SCRIPT.format(steps=40))
        good = memprof.load(files["tracked.json"])
        the_plan = memprof.load(files["plan.toml"])
        durations = {}
        for kind, argv in (("run", [py, "-m", "memprof", "run", "--steps", "3", "--out", str(folder / "t.json"),
                                    str(script)]),
                           ("plan", [py, "-m", "memprof", "plan", str(files["tracked.json"]), "--budget", "1GiB",
                                     "--out", str(folder / "t.toml")])):
            t = time.monotonic()
            subprocess.run(argv, cwd=folder, capture_output=True, check=True)
            durations[kind] = time.monotonic() - t  # kills are spread over the whole command
        cat["unkilled_seconds"] = {k: round(v, 1) for k, v in durations.items()}
        for kind, i in [(k, i) for i in range(n) for k in ("run", "plan", "writer")]:
            out_dir = folder / f"{kind}{i}"
            out_dir.mkdir()
            if kind == "run":
                out, cls = out_dir / "p.json", memprof.Profile
                argv = [py, "-m", "memprof", "run", "--steps", "3", "--out", str(out), str(script)]
                delay = rnd.uniform(0.2, durations["run"] * 1.05)
            elif kind == "plan":
                out, cls = out_dir / "plan.toml", memprof.Plan
                the_plan.save(out)  # a good plan there already: it must survive whole
                argv = [py, "-m", "memprof", "plan", str(files["tracked.json"]), "--budget", "1GiB", "--out", str(out)]
                delay = rnd.uniform(0.2, durations["plan"] * 1.05)
            else:
                out, cls = out_dir / "p.json", memprof.Profile
                argv = [py, "-c", WRITER, str(files["tracked.json"]), str(out)]
                delay = rnd.uniform(0.01, 1.0)
            killed_after = _kill_at_random(argv, delay, out_dir)
            whole = _complete(out, cls)
            left = _temps(out_dir)
            (good if cls is memprof.Profile else the_plan).save(out_dir / ("next.json" if cls is memprof.Profile
                                                                          else "next.toml"))
            after = _temps(out_dir)
            _add(cat, whole and not after, f"{kind} {i} killed after {killed_after:.2f}s: output whole={whole}, "
                                           f"temp files after the kill {left}, after the next write {after}")
            cat.setdefault("temp_files_left_by_kills", 0)
            cat["temp_files_left_by_kills"] += len(left)
    return cat


# -- the runtime helper's categories -------------------------------------------------------------------------------
def runtime_categories(quick: bool) -> dict:
    try:
        import robustness_runtime
    except ImportError as e:
        if getattr(e, "name", "") != "robustness_runtime":
            raise
        return {name: {"not run": "experiments/robustness_runtime.py is not there"}
                for name in ("interrupts", "leave-no-trace orders")}
    return robustness_runtime.run_categories(quick)


def main_(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases (a few minutes)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    categories, seconds = {}, {}
    for name, fn in (("cli bad input", run_cli), ("fuzzed files", run_fuzz), ("kills", run_kills)):
        t = time.monotonic()
        categories[name] = fn(args.quick)
        seconds[name] = round(time.monotonic() - t, 1)
        print(f"{name}: {categories[name]['held']}/{categories[name]['tried']} held ({seconds[name]} s)", flush=True)
    t = time.monotonic()
    categories.update(runtime_categories(args.quick))
    seconds["runtime categories"] = round(time.monotonic() - t, 1)
    result = {"quick": args.quick, "categories": categories, "seconds": seconds,
              "total_seconds": round(time.monotonic() - t0, 1)}
    path = write_result("robustness", result)
    print(json.dumps({k: {kk: v[kk] for kk in ("tried", "held") if kk in v} for k, v in categories.items()}))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main_()
