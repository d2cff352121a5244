"""The estimator against real CPU runs on every common Hugging Face family and every catalog decoder.

For each tiny model in ``tests/hf_families.py`` (Llama, Mistral, Qwen2, Gemma, Phi-3, Phi, GPT-2, GPT-NeoX,
OPT, Falcon, BERT, Llama and GPT-2 with real padding, and the catalog's causal LMs at test size) and each of
fp32 and bf16-autocast, a fresh Python process (so that no cache or import carries over between cases, and
``transformers`` is first imported by the model factory, as in a user's script) estimates two AdamW steps
with ``memprof.estimate(device="cpu")``, then trains the same model for real for two steps under
``memprof.track`` (equal to the CPU allocator to the byte), with the model's own loss. It also records the
estimate with ``hf_real_paths=False`` (transformers on its fake-tensor code paths), which shows the families
where those paths change memory. Writes results/estimate-matrix.json.

    PYTHONPATH=$PWD python experiments/estimate_matrix.py [--only llama,gpt2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import ROOT, write_result

sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "bf16-autocast")
TOLERANCE = 0.005


def run_case(name: str, precision: str) -> dict:
    """One case in this process: the estimate, then the real run (scratch cache cleared before each)."""
    import torch

    import memprof
    from memprof.estimation import estimate
    from memprof.tracking import scratch
    from memprof.training import default_step, make_optimizer
    from tests.hf_families import all_cases

    family = all_cases()[name]
    scratch.clear_cache()
    t0 = time.perf_counter()
    est = estimate(family.build_model, family.make_batch, precision=precision, optimizer="adamw", device="cpu",
                   steps=2)
    t_est = time.perf_counter() - t0
    scratch.clear_cache()
    torch.manual_seed(0)
    model, batch = family.build_model(), family.make_batch()
    opt = make_optimizer("adamw", model.parameters())
    t0 = time.perf_counter()
    with memprof.track(model, opt) as tracker:
        for _ in range(2):
            default_step(model, batch, opt, precision)
    t_real = time.perf_counter() - t0
    real = tracker.profile
    scratch.clear_cache()
    fake_paths = estimate(family.build_model, family.make_batch, precision=precision, optimizer="adamw",
                          device="cpu", steps=2, hf_real_paths=False)
    return {
        "estimate_bytes": est.peak_bytes,
        "real_bytes": real.peak_bytes,
        "estimate_peak_at": f"{est.peak.phase} {est.peak.module or '(root)'}",
        "real_peak_at": f"{real.peak.phase} {real.peak.module or '(root)'}",
        "estimate_seconds": round(t_est, 2),
        "real_seconds": round(t_real, 2),
        "transformers_paths": est.assumptions.get("transformers", "not patched"),
        "dtype_corrections": est.assumptions.get("fake_dtypes", "none"),
        # the same estimate with transformers left on its fake-tensor code paths (hf_real_paths=False)
        "estimate_on_fake_paths_bytes": fake_paths.peak_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process: run one case, print JSON
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.precision)))
        return

    import transformers

    from memprof.tracking.devices import cpu_name
    from tests.hf_families import all_cases

    cases = all_cases()
    names = args.only.split(",") if args.only else list(cases)
    rows = []
    for name in names:
        family = cases[name]
        for precision in PRECISIONS:
            child = subprocess.run([sys.executable, __file__, "--case", name, "--precision", precision],
                                   capture_output=True, text=True, cwd=ROOT)
            if child.returncode != 0:
                raise SystemExit(f"{name} {precision} failed:\n{child.stderr[-4000:]}")
            out = json.loads(child.stdout.strip().splitlines()[-1])
            err = (out["estimate_bytes"] - out["real_bytes"]) / out["real_bytes"]
            fake_err = (out["estimate_on_fake_paths_bytes"] - out["real_bytes"]) / out["real_bytes"]
            out["fake_paths_relative_error"] = fake_err
            rows.append({"family": name, "model_class": family.model_class, "config": family.config,
                         "batch": {"batch": 2, "seq": 64, "attention_mask": family.padding_mask,
                                   "padded_positions": family.padded, "task": family.task},
                         "precision": precision, **out, "relative_error": err,
                         "within_0.5pct": abs(err) <= TOLERANCE})
            print(f"{name:22s} {precision:14s} estimate {out['estimate_bytes']:>10d}  real {out['real_bytes']:>10d}"
                  f"  {100 * err:+.4f}%  (on transformers' fake paths {100 * fake_err:+.4f}%)",
                  flush=True)
    path = write_result("estimate-matrix", {
        "description": __doc__.strip().splitlines()[0],
        "cpu": cpu_name(),
        "transformers_version": transformers.__version__,
        "optimizer": "adamw", "steps": 2, "tolerance": TOLERANCE,
        "all_within_0.5pct": all(r["within_0.5pct"] for r in rows),
        "max_abs_relative_error": max(abs(r["relative_error"]) for r in rows),
        "cases": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
