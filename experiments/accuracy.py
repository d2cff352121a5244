"""Accuracy of the tracker (vs the CPU allocator) and of the estimator (vs the tracker on a real run).

    python experiments/accuracy.py

Tracker: the four models of tests/test_accuracy.py (GPT, HF Llama from a config, CNN with BatchNorm,
tied-weight MLP with in-place ReLU) x AdamW / SGD with momentum x first / steady / replayed step (the
third step's optimizer phase is replayed from the pattern the second recorded, see
memprof.tracking.optpattern), against the allocator's own events (torch.profiler) on an identical copy. Estimator: the same models plus HF BERT, in
fp32 and bf16-autocast, fake tensors vs a real CPU run. Writes results/accuracy.json.
"""

from __future__ import annotations

import sys

from _common import ROOT, write_result

sys.path.insert(0, str(ROOT))

import memprof  # noqa: E402
from memprof.tracking import scratch  # noqa: E402
from tests.common import CASES, allocator_step_peak, make_optimizer, train_step, twin  # noqa: E402
from tests.test_estimate import MODELS, _measured_peak, _model_and_batch  # noqa: E402


def main() -> None:
    tracker_rows = []
    for case_name, build in CASES.items():
        for opt_name in ("adamw", "sgd-momentum"):
            case = build()
            model, opt = case.model, make_optimizer(opt_name, case.model.parameters())
            ref_model, ref_opt = twin(case, opt_name)
            for step in ("first", "steady", "replayed"):
                expected = allocator_step_peak(case, ref_model, ref_opt)
                with memprof.track(model, opt) as tracker:
                    train_step(case, model, opt)
                got = tracker.profile.peak_bytes
                replayed = any("replayed from the allocation pattern" in n for n in tracker.profile.notes)
                assert replayed == (step == "replayed"), (case_name, opt_name, step)
                tracker_rows.append({"model": case_name, "optimizer": opt_name, "step": step,
                                     "tracker_peak_bytes": got, "allocator_peak_bytes": expected,
                                     "error": got / expected - 1})
                print(f"tracker   {case_name:14s} {opt_name:13s} {step:6s} {100 * (got / expected - 1):+.4f}%")
    estimate_rows = []
    for name in MODELS:
        for precision in ("fp32", "bf16-autocast"):
            build, make_batch, step = _model_and_batch(name)
            scratch.clear_cache()
            est = memprof.estimate(build, make_batch, step=step, precision=precision, device="cpu")
            scratch.clear_cache()
            real = _measured_peak(build, make_batch, precision, step)
            estimate_rows.append({"model": name, "precision": precision, "estimated_peak_bytes": est.peak_bytes,
                                  "measured_peak_bytes": real, "error": est.peak_bytes / real - 1})
            print(f"estimator {name:14s} {precision:13s} {100 * (est.peak_bytes / real - 1):+.4f}%")
    path = write_result("accuracy", {
        "device": "CPU",
        "tracker": {"target": "within 0.1% of the allocator", "rows": tracker_rows,
                    "max_abs_error": max(abs(r["error"]) for r in tracker_rows)},
        "estimator": {"target": "within 0.5% of a real run", "rows": estimate_rows,
                      "max_abs_error": max(abs(r["error"]) for r in estimate_rows)},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
