"""Are two checkouts' profiles the same? Every byte a profile records, on the accuracy suite, as a digest.

    python experiments/profile_identity.py --out A.json            # this checkout's profiles
    python experiments/profile_identity.py --compare A.json B.json  # exit 1 when any profile differs

Profiles: the tracker on the four models of tests/test_accuracy.py x AdamW / SGD with momentum x first /
steady / replayed step, and the estimator on the models of tests/test_estimate.py in fp32 and bf16-autocast
(the cases of experiments/accuracy.py). Each profile's ``to_dict()`` is kept whole except what is measured
in time and so differs between any two runs: the environment block, every float (milliseconds and the
time-derived shares), the timeline's times, the estimate's own duration and measured roofline speeds
(assumptions ``estimate_seconds`` and ``time``), and digits in notes that carry a unit of time. What remains
(bytes, shapes, dtypes, categories, phases, modules, steps, peak, assumptions) must be equal byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys

from _common import ROOT

sys.path.insert(0, str(ROOT))

import memprof  # noqa: E402
from memprof.tracking import scratch  # noqa: E402
from tests.common import CASES, make_optimizer, train_step  # noqa: E402
from tests.test_estimate import MODELS, _model_and_batch  # noqa: E402

# The environment block, and the estimate's assumptions that are timings: its own duration and the roofline
# speeds it measured on this host.
_MEASURED_KEYS = ("environment", "estimate_seconds", "time")
_TIMED = re.compile(r"[0-9][0-9.,]*\s*(ms|s|seconds|µs)\b")


def _bytes_only(value):
    if isinstance(value, float):
        return None
    if isinstance(value, dict):
        return {k: _bytes_only(v) for k, v in value.items() if k not in _MEASURED_KEYS}
    if isinstance(value, (list, tuple)):
        return [_bytes_only(v) for v in value]
    if isinstance(value, str):
        return _TIMED.sub("<time>", value)
    return value


def canonical(prof) -> str:
    data = _bytes_only(prof.to_dict())
    for row in data["timeline"]["samples"]:
        row[1] = None  # time_ms
    return json.dumps(data, sort_keys=True)


def collect() -> dict:
    out = {}
    for case_name, build in CASES.items():
        for opt_name in ("adamw", "sgd-momentum"):
            case = build()
            model, opt = case.model, make_optimizer(opt_name, case.model.parameters())
            for step in ("first", "steady", "replayed"):
                with memprof.track(model, opt) as tracker:
                    train_step(case, model, opt)
                out[f"tracker/{case_name}/{opt_name}/{step}"] = canonical(tracker.profile)
    for name in MODELS:
        for precision in ("fp32", "bf16-autocast"):
            build, make_batch, step = _model_and_batch(name)
            scratch.clear_cache()
            est = memprof.estimate(build, make_batch, step=step, precision=precision, device="cpu")
            out[f"estimate/{name}/{precision}"] = canonical(est)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write {case: {sha256, profile}} here")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --out files")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.load(open(p)) for p in args.compare)
        differ = sorted(k for k in set(a) | set(b) if a.get(k, {}).get("sha256") != b.get(k, {}).get("sha256"))
        print(f"{len(set(a) & set(b)) - len(differ)} of {len(set(a) | set(b))} profiles identical")
        for k in differ:
            print(f"differs: {k}")
        sys.exit(1 if differ else 0)
    profiles = collect()
    result = {k: {"sha256": hashlib.sha256(v.encode()).hexdigest(), "profile": json.loads(v)}
              for k, v in profiles.items()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    for k, v in result.items():
        print(f"{v['sha256'][:16]}  {k}")


if __name__ == "__main__":
    main()
