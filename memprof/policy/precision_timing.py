"""What a precision costs on this device, measured: the live model's forward in each candidate precision.

A precision's speed is a property of the machine, not of the model: on a CPU without bf16 units (AMD EPYC
with AVX2 only) a bf16 matmul took 6.5x its fp32 time and bf16 autocast made a nanoGPT step 27-33x slower,
where a roofline from a spec sheet predicted it faster. Before a plan relies on a precision, the model's
forward is timed on the real batch in each candidate precision (under ``torch.no_grad``: no activations are
kept, so it needs far less memory than the step the plan is for), in alternating order, and the median ratio
to the current precision is what the planner uses for that precision's step time
(``memprof.plan(..., precision_ratios=...)``).

The user's model is left as it was: random generators are restored (dropout draws), buffers written by the
forward (BatchNorm's running statistics) are put back, and no gradient is made.

This is the timing a plan made before the first step relies on. Where the plain step may run,
``run --budget`` and ``@memprof.auto`` then time the loop's whole step in each precision
(:mod:`memprof.policy.calibrate`) and plan again from that (a :class:`PrecisionTiming` whose ``what`` says so).

Known limits: the forward stands for the whole step (backward runs the same kinds of kernels in the same
dtype, and autocast's backward follows its forward's dtypes); the optimizer step, in fp32 under autocast, is
not timed; the first call in each precision is a warm-up and not counted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..rng import preserved_rng
from ..training import autocast

__all__ = ["PrecisionTiming", "measure_precision_ratios"]


@dataclass(frozen=True)
class PrecisionTiming:
    """Measured forward-time ratios of precisions to the base one (base: 1.0), and how they were measured."""

    base: str
    ratios: dict  # precision -> median(forward time in it / forward time in base)
    base_ms: float  # median forward time in the base precision
    reps: int
    device: str
    what: str = "the model's forward"  # what was timed: the forward alone, or the loop's whole step
    forward: dict = field(default_factory=dict)  # precision -> forward-only ratio, when ``what`` is the step

    def describe(self) -> str:
        parts = ", ".join(f"{p} {r:.2f}x" for p, r in self.ratios.items() if p != self.base)
        fwd = ", ".join(f"{p} {r:.2f}x" for p, r in self.forward.items() if p != self.base)
        return (f"measured on this {self.device}: {self.what} in {parts} the time of {self.base} "
                f"({self.base_ms:.1f} ms; median of {self.reps} alternating pairs)"
                + (f"; recomputation priced by the forward alone: {fwd}" if fwd else ""))


def _forward(model, args, kwargs, precision: str, device_type: str) -> float:
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(precision, device_type):
        model(*args, **kwargs)
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_precision_ratios(model: torch.nn.Module, args=(), kwargs=None, *, base: str = "fp32",
                             precisions=("bf16-autocast",), reps: int = 3, device_label: str = "") -> PrecisionTiming:
    """Time ``model(*args, **kwargs)`` in ``base`` and each of ``precisions`` (autocast modes), alternating,
    ``reps`` rounds after one warm-up each; returns the median ratios."""
    kwargs = dict(kwargs or {})
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    others = [p for p in precisions if p != base]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    times: dict[str, list[float]] = {p: [] for p in (base, *others)}
    try:
        with preserved_rng():
            for p in (base, *others):
                _forward(model, args, kwargs, p, device_type)  # warm-up (kernel choice, caches)
            for i in range(reps):
                order = (base, *others) if i % 2 == 0 else (*others, base)
                for p in order:
                    times[p].append(_forward(model, args, kwargs, p, device_type))
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    ratios = {base: 1.0}
    for p in others:
        ratios[p] = statistics.median(t / b for t, b in zip(times[p], times[base]))
    if not device_label:
        from ..tracking.devices import cpu_name

        device_label = torch.cuda.get_device_name() if device_type == "cuda" else f"CPU ({cpu_name()})"
    return PrecisionTiming(base, ratios, statistics.median(times[base]) * 1e3, reps, device_label)
