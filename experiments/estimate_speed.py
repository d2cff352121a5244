"""How fast and how lean the estimator is on big models, each in a fresh process (for its peak RSS).

    python experiments/estimate_speed.py

llama-2-7b and llama-3-70b, bf16-autocast, AdamW, batch 1, sequence 4096, device H100-80GB (CUDA emulated
on CPU kernels on this machine). Targets on a 2-core machine: 7B in <= 15 s and <= 2 GiB RSS, 70B <= 60 s.
Writes results/estimate-speed.json.
"""

from __future__ import annotations

import json
import subprocess
import sys

from _common import ROOT, write_result

CHILD = r"""
import json, resource, time
t0 = time.perf_counter()
from memprof.estimation import estimate, get_architecture
arch = get_architecture(NAME)
prof = estimate(arch.build_model, lambda: arch.make_batch(1, 4096), precision="bf16-autocast",
                optimizer="adamw", device="cuda", device_memory="H100-80GB")
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_bytes": prof.peak_bytes, "by_category": dict(prof.peak.by_category),
                  "fits_one_h100": prof.peak_bytes <= prof.capacity_bytes}))
"""

TARGETS = {"llama-2-7b": {"seconds": 15, "max_rss_bytes": 2 * 1024**3}, "llama-3-70b": {"seconds": 60}}


def main() -> None:
    rows = {}
    for name, target in TARGETS.items():
        out = subprocess.run([sys.executable, "-c", CHILD.replace("NAME", repr(name))], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["target"] = target
        row["target_met"] = all(row[k] <= v for k, v in target.items())
        rows[name] = row
        print(f"{name}: {row['seconds']:.1f} s, {row['max_rss_bytes'] / 2**30:.2f} GiB RSS, "
              f"peak {row['peak_bytes'] / 2**30:.1f} GiB")
    path = write_result("estimate-speed", {
        "setup": "bf16-autocast, AdamW, batch 1, seq 4096, device H100-80GB (CUDA emulated on CPU kernels), "
                 "wall time of a fresh process including imports",
        "models": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
