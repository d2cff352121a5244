"""Measured step time of step variants on this device: the cost of the step levers, for the planner.

:func:`measure_variant_ratios` builds one model per variant (``build_model()``, the variant's model
transform, a fresh optimizer, its step wrapper: :mod:`.variants`), warms each up, then times untracked steps
round by round, every variant once per round in a rotating order, and takes for each the median over rounds
of its step time over the plain step's in the same round. The timing goes to
:func:`memprof.policy.engine.plan` as ``variant_ratios``, which prices :meth:`VariantTiming.priced` (a
speed-up within twice its standard error counts as none); a variant without a ratio is modelled (no less
than the step as written).

Known limits: all the models live at once (one per variant), so this is for a model that fits the device
several times over, or for variants timed a few at a time; the steps are whole optimizer steps of the batch
``make_batch()`` gives, so they include what the step does besides the levers (noise); a variant that raises
(its lever does not apply) is left out and its error kept in ``failed``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..errors import MemprofError
from ..training import default_step, make_optimizer
from .timing import median_stderr
from .variants import PLAIN, StepVariant, model_transform, step_wrapper

__all__ = ["VariantTiming", "measure_variant_ratios", "priced_ratio"]


@dataclass(frozen=True)
class VariantTiming:
    """Step-time ratios of variants over the plain step, measured here."""

    ratios: dict  # StepVariant -> median per-round ratio
    step_ms: dict  # StepVariant -> median step time
    rounds: int
    precision: str = "fp32"  # the precision the steps ran in
    failed: dict = field(default_factory=dict)  # StepVariant -> why it could not run
    stderr: dict = field(default_factory=dict)  # StepVariant -> standard error of its median ratio

    def priced(self) -> dict:
        """The ratios the planner prices: a variant measured faster than the plain step counts as faster only
        when the speed-up exceeds twice its standard error (else 1.0: noise must not buy a lever); a
        measured cost is kept as measured."""
        return {v: priced_ratio(r, self.stderr.get(v, float("inf"))) for v, r in self.ratios.items()}


def priced_ratio(ratio: float, stderr: float) -> float:
    """A measured step-time ratio as the planner prices it: a speed-up counts only beyond twice its standard
    error (else 1.0); a cost counts as measured."""
    return ratio if ratio >= 1.0 or ratio + 2 * stderr < 1.0 else 1.0

    def describe(self) -> str:
        return (f"measured on this device: untracked steps, {self.rounds} rounds, every variant once per round "
                "against the plain step of the same round (median ratio)")


def measure_variant_ratios(build_model, make_batch, variants, *, optimizer: str = "adamw",
                           precision: str = "fp32", step=None, rounds: int = 5, warmup: int = 2,
                           seed: int = 0) -> VariantTiming:
    """Time each of ``variants`` (and the plain step) on models from ``build_model``; see the module doc."""
    if rounds < 1:
        raise MemprofError(f"rounds must be at least 1, got {rounds}")
    wanted = [PLAIN] + [v for v in dict.fromkeys(variants) if not v.plain]
    live, failed = {}, {}
    for v in wanted:
        try:
            torch.manual_seed(seed)
            model = build_model()
            transform = model_transform(v)
            if transform is not None:
                model = transform(model)
            wrap = step_wrapper(v)
            run = wrap(step) if wrap is not None else (step or default_step)
            opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
            batch = make_batch()
            device_type = next((p.device.type for p in model.parameters()), "cpu")
            for _ in range(warmup):
                run(model, batch, opt, precision, None, device_type)
            live[v] = (model, batch, opt, run, device_type)
        except MemprofError as e:
            if v.plain:
                raise
            failed[v] = str(e)
    times: dict[StepVariant, list[float]] = {v: [] for v in live}
    order = list(live)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            model, batch, opt, run, device_type = live[v]
            t0 = time.perf_counter()
            run(model, batch, opt, precision, None, device_type)
            times[v].append(time.perf_counter() - t0)
    ratios = {v: statistics.median(t / p for t, p in zip(ts, times[PLAIN])) for v, ts in times.items()
              if not v.plain}
    stderr = {v: median_stderr([t / p for t, p in zip(ts, times[PLAIN])]) for v, ts in times.items() if not v.plain}
    step_ms = {v: 1e3 * statistics.median(ts) for v, ts in times.items()}
    return VariantTiming(ratios, step_ms, rounds, precision, failed, stderr)
