"""The estimator on code written the way people write it, against the same step run for real (CPU).

    python experiments/estimate_real_code.py

Cases: a nanoGPT-style model returning ``(logits, loss)`` and an HF Llama returning ``.loss``, both with the
default step (no ``step=``); factories that call ``.to("cpu")``, ``.to(torch.float32)`` with frozen
parameters, or ``torch.compile``; PEFT LoRA (r=8) on the Llama; DPO against a reference model, against
precomputed reference log-probs, and with LoRA (the base model as reference). Each in fp32 and
bf16-autocast, two AdamW steps. The real run is the tracker's peak (equal to the allocator's on CPU) of the
same model trained with the same step. Also recorded: the nanoGPT estimate of the old default step (the sum
of ``output[0]``, the logits) against the real step. Writes results/estimate-real-code.json.
"""

from __future__ import annotations

import sys
import time

from _common import ROOT, write_result

sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.fixtures import nanogpt_model as nanogpt  # noqa: E402
from tests.test_estimate_real_code import _llama, _llama_batch, _real_peak  # noqa: E402


def _logits_sum(model, batch, opt):
    model(*batch)[0].sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _cases():
    from memprof.estimation.finetune import finetune_source

    yield "nanogpt (logits, loss), default step", nanogpt.build, nanogpt.make_batch, None, None
    yield "hf llama .loss, default step", _llama, lambda: _llama_batch(2), None, None
    yield "nanogpt factory .to('cpu')", nanogpt.build_moved, nanogpt.make_batch, None, None
    yield "nanogpt factory .to(float32) + frozen", nanogpt.build_cast_frozen, nanogpt.make_batch, None, None
    yield "nanogpt factory torch.compile", nanogpt.build_compiled, nanogpt.make_batch, None, nanogpt.build
    for name, base, batch, kwargs in [
        ("hf llama LoRA r=8", _llama, _llama_batch, dict(lora=8)),
        ("hf llama DPO, reference model", _llama, _llama_batch, dict(method="dpo")),
        ("hf llama DPO, precomputed reference", _llama, _llama_batch, dict(method="dpo", dpo_reference="precomputed")),
        ("hf llama LoRA r=8 DPO, base model as reference", _llama, _llama_batch, dict(lora=8, method="dpo")),
        ("nanogpt DPO, reference model", nanogpt.build, nanogpt.make_batch, dict(method="dpo")),
    ]:
        build, batch_for, step, _ = finetune_source(base, batch, **kwargs)
        yield name, build, (lambda batch_for=batch_for: batch_for(2)), step, None


def main() -> None:
    from memprof.estimation import estimate
    from memprof.tracking import scratch

    rows = []
    for name, build, make_batch, step, real_build in _cases():
        for precision in ("fp32", "bf16-autocast"):
            scratch.clear_cache()
            t0 = time.perf_counter()
            est = estimate(build, make_batch, step=step, precision=precision, device="cpu")
            seconds = time.perf_counter() - t0
            scratch.clear_cache()
            real = _real_peak(real_build or build, make_batch, step, precision)
            rows.append({"case": name, "precision": precision, "estimate_bytes": est.peak_bytes,
                         "real_bytes": real, "error": (est.peak_bytes - real) / real,
                         "estimate_seconds": round(seconds, 2), "loss": est.assumptions["loss"]})
            print(f"{name:50s} {precision:14s} {est.peak_bytes:>11d} {real:>11d} {rows[-1]['error']:+.5%} "
                  f"{seconds:5.2f}s")
    scratch.clear_cache()
    old = estimate(nanogpt.build, nanogpt.make_batch, step=_logits_sum, device="cpu").peak_bytes
    real = _real_peak(nanogpt.build, nanogpt.make_batch)
    write_result("estimate-real-code", {
        "what": "estimated vs real CPU peak (tracker = allocator on CPU), two AdamW steps, batch as in "
                "tests/test_estimate_real_code.py",
        "rows": rows,
        "max_abs_error": max(abs(r["error"]) for r in rows),
        "old_default_step_on_nanogpt": {"estimate_bytes": old, "real_bytes": real, "error": (old - real) / real,
                                        "what": "the sum of output[0] (the logits) instead of the model's loss"},
        "torch_threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
