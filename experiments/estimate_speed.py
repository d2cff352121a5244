"""How fast and how lean the estimator is on big models, and that counting repeated blocks changes no byte.

    python experiments/estimate_speed.py [--repeats 3]

1. llama-2-7b and llama-3-70b, bf16-autocast, AdamW, batch 1, sequence 4096, device H100-80GB (CUDA emulated
   on CPU kernels on this machine), each estimate in a fresh process (wall time including imports, CPU time,
   peak RSS), repeated and interleaved; targets on a 2-core machine: 7B <= 5 s, 70B <= 10 s, <= 2 GiB RSS.
2. The README's planner example, in fresh processes: ``memprof estimate --hf llama-2-7b --seq-len 4096
   --precision bf16-autocast --device H100-80GB --out est.json`` then ``memprof plan est.json --budget
   H100-80GB --world-size 8 --levers checkpoint,precision,sharding``; target: the plan <= 30 s. The plan is
   timed as written (its estimates made one after another) and with ``MEMPROF_WORKERS=2`` (made in two
   worker processes, off by default), one right after the other; their plans must agree.
3. Counting repeated blocks against running every layer (``blocks="all"``): llama-2-7b as in 1, and a model
   with two kinds of blocks (attention and MLP blocks alternating, 12 of each); peak, categories, steps and
   every module's byte counts compared.

The machine is shared: each row records the load average before it ran, and CPU seconds (user + system of
the process) beside the wall time. Writes results/estimate-speed.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, write_result

ESTIMATE = r"""
import json, resource, time
t0 = time.perf_counter()
from memprof.estimation import estimate, get_architecture
arch = get_architecture(NAME)
t1 = time.perf_counter()
prof = estimate(arch.build_model, lambda: arch.make_batch(1, 4096), precision="bf16-autocast",
                optimizer="adamw", device="cuda", device_memory="H100-80GB")
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - t0, "estimate_seconds": time.perf_counter() - t1,
                  "cpu_seconds": ru.ru_utime + ru.ru_stime, "max_rss_bytes": ru.ru_maxrss * 1024,
                  "peak_bytes": prof.peak_bytes, "by_category": dict(prof.peak.by_category),
                  "blocks": prof.assumptions.get("blocks", "every layer run"),
                  "fits_one_h100": prof.peak_bytes <= prof.capacity_bytes}))
"""

COMPARE = r"""
import json, math, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
import transformers  # before the first estimate: both take the real code paths
from memprof.estimation import estimate, get_architecture

class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.qkv, self.out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).view(x.shape[0], x.shape[1], 3, 8, -1).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape))

class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))

class TwoKinds(nn.Module):
    def __init__(self, pairs=12, d=512, vocab=8000):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(m for _ in range(pairs) for m in (Attn(d), Mlp(d)))
        self.head = nn.Linear(d, vocab, bias=False)
    def forward(self, ids, targets):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())

def step(model, batch, opt):
    model(*batch).backward(); opt.step(); opt.zero_grad(set_to_none=True)

def batch():
    ids = torch.randint(0, 8000, (4, 512)); return ids, ids

HOST_TIMED = ("forward_op_ms", "recompute_fraction")  # measured on the host: differ between any two runs

def same(x, y):
    if isinstance(x, float) or isinstance(y, float):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(x, dict):
        return set(x) == set(y) and all(same(x[k], y[k]) for k in x)
    return x == y

def compare(every, counted):
    diffs = []
    for what, a, b in [("peak_bytes", every.peak_bytes, counted.peak_bytes),
                       ("peak.by_category", dict(every.peak.by_category), dict(counted.peak.by_category)),
                       ("peak.where", (every.peak.step, every.peak.phase, every.peak.module),
                        (counted.peak.step, counted.peak.phase, counted.peak.module)),
                       ("steps", [s.to_dict() for s in every.steps], [s.to_dict() for s in counted.steps]),
                       ("module names", list(every.modules), list(counted.modules)),
                       ("timeline", [s.to_dict() for s in every.timeline], [s.to_dict() for s in counted.timeline])]:
        ok = same(a, b) if not isinstance(a, list) else len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if not ok:
            diffs.append(what)
    fields = 0
    for name, m in every.modules.items():
        if name not in counted.modules:
            continue
        da, db = m.to_dict(), counted.modules[name].to_dict()
        for f in da:
            if f in HOST_TIMED:
                continue
            fields += 1
            if not same(da[f], db[f]):
                diffs.append(f"{name}.{f}")
    return {"equal": not diffs, "differences": diffs[:20], "module_fields_compared": fields,
            "modules": len(every.modules), "peak_bytes": counted.peak_bytes,
            "by_category": dict(counted.peak.by_category), "peak_phase": counted.peak.phase,
            "peak_module": counted.peak.module}

rows = {}
arch = get_architecture("llama-2-7b")
cases = [("llama-2-7b", arch.build_model, lambda: arch.make_batch(1, 4096), None,
          dict(precision="bf16-autocast", device="cuda", device_memory="H100-80GB")),
         ("two-kinds (12 attention + 12 MLP blocks alternating, d=512)", TwoKinds, batch, step,
          dict(precision="fp32", device="cpu"))]
for name, build, make, st, kw in cases:
    t = time.perf_counter(); every = estimate(build, make, step=st, blocks="all", **kw); t_every = time.perf_counter() - t
    t = time.perf_counter(); counted = estimate(build, make, step=st, blocks="repeated", **kw); t_counted = time.perf_counter() - t
    row = compare(every, counted)
    row.update(config=kw, every_layer_seconds=t_every, counted_seconds=t_counted, blocks=counted.assumptions.get("blocks"))
    rows[name] = row
print(json.dumps(rows))
"""

TARGETS = {"llama-2-7b": {"seconds": 5, "max_rss_bytes": 2 * 1024**3},
           "llama-3-70b": {"seconds": 10, "max_rss_bytes": 2 * 1024**3}}
PLAN_TARGET_SECONDS = 30


def _child(code: str) -> tuple[dict, float, float]:
    """Run ``code`` in a fresh Python; its last stdout line (JSON), wall seconds, CPU seconds of the child."""
    before = os.times()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return json.loads(out.stdout.strip().splitlines()[-1]), wall, cpu


def _timed(cmd: list[str], cwd: Path, **env) -> tuple[float, float, str]:
    before = os.times()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, out.stdout


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def _cpu_flags() -> dict:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return {}
    return {f: f in flags.split() for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    runs: dict = {name: [] for name in TARGETS}
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits both models
        for name in TARGETS:
            load = os.getloadavg()[0]
            row, _, _ = _child(ESTIMATE.replace("NAME", repr(name)))
            row["load_average_before"] = load
            runs[name].append(row)
            print(f"{name}: {row['seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU, "
                  f"{row['max_rss_bytes'] / 2**30:.2f} GiB RSS (load {load:.1f})", flush=True)
    models = {}
    for name, target in TARGETS.items():
        rows = runs[name]
        wall = _spread([r["seconds"] for r in rows])
        cpu = _spread([r["cpu_seconds"] for r in rows])
        rss = max(r["max_rss_bytes"] for r in rows)
        models[name] = {
            "seconds": wall, "cpu_seconds": cpu, "estimate_seconds": _spread([r["estimate_seconds"] for r in rows]),
            "max_rss_bytes": rss, "load_average_before": [r["load_average_before"] for r in rows],
            "peak_bytes": rows[-1]["peak_bytes"], "by_category": rows[-1]["by_category"],
            "blocks": rows[-1]["blocks"], "fits_one_h100": rows[-1]["fits_one_h100"],
            "target": target,
            "target_met_wall_median": wall["median"] <= target["seconds"] and rss <= target["max_rss_bytes"],
            "target_met_cpu_median": cpu["median"] <= target["seconds"] and rss <= target["max_rss_bytes"],
        }

    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        est_wall, est_cpu, _ = _timed([sys.executable, "-m", "memprof", "estimate", "--hf", "llama-2-7b", "--seq-len",
                                       "4096", "--precision", "bf16-autocast", "--device", "H100-80GB", "--out",
                                       "est.json"], Path(tmp))
        plan_cmd = [sys.executable, "-m", "memprof", "plan", "est.json", "--budget", "H100-80GB", "--world-size",
                    "8", "--levers", "checkpoint,precision,sharding"]
        plan_load = os.getloadavg()[0]
        plan_wall, plan_cpu, plan_out = _timed(plan_cmd, Path(tmp), MEMPROF_WORKERS="1")
        workers_load = os.getloadavg()[0]
        workers_wall, workers_cpu, workers_out = _timed(plan_cmd, Path(tmp), MEMPROF_WORKERS="2")
    plan = {"estimate_seconds": est_wall, "estimate_cpu_seconds": est_cpu, "load_average_before_estimate": load,
            "plan_seconds": plan_wall, "plan_cpu_seconds": plan_cpu, "load_average_before_plan": plan_load,
            "plan_first_lines": plan_out.splitlines()[:3], "target_seconds": PLAN_TARGET_SECONDS,
            "target_met_wall": plan_wall <= PLAN_TARGET_SECONDS, "target_met_cpu": plan_cpu <= PLAN_TARGET_SECONDS,
            "with_2_workers": {"plan_seconds": workers_wall, "cpu_seconds_all_processes": workers_cpu,
                               "load_average_before": workers_load,
                               "same_plan": workers_out.splitlines()[1:3] == plan_out.splitlines()[1:3],
                               "target_met_wall": workers_wall <= PLAN_TARGET_SECONDS}}
    print(f"plan: {plan_wall:.1f} s wall, {plan_cpu:.1f} s CPU (load {plan_load:.1f}); with 2 workers "
          f"{workers_wall:.1f} s wall, {workers_cpu:.1f} s CPU (load {workers_load:.1f})", flush=True)

    equality, _, _ = _child(COMPARE)
    for name, row in equality.items():
        print(f"{name}: counted == every layer: {row['equal']} ({row['module_fields_compared']} module fields; "
              f"{row['every_layer_seconds']:.1f} s vs {row['counted_seconds']:.1f} s)", flush=True)

    path = write_result("estimate-speed", {
        "setup": "bf16-autocast, AdamW, batch 1, seq 4096, device H100-80GB (CUDA emulated on CPU kernels); "
                 "seconds: wall time of a fresh process including imports; cpu_seconds: user + system time "
                 "of that process (less sensitive to other work on this shared machine)",
        "cpu_flags": _cpu_flags(),
        "torchao_installed": importlib.util.find_spec("torchao") is not None,  # transformers imports it (~1 s)
        "models": models,
        "plan_readme_example": plan,
        "repeated_blocks_equal_every_layer": equality,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
