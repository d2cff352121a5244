"""Measured option costs: what checkpointing really costs on this machine, for the planner's time model.

A profile gives each unit's forward time and the share of it that checkpointing recomputes; the real cost of
a checkpointed unit also includes checkpointing's own machinery (selective checkpointing runs every op of
the unit through two dispatch modes) and cache effects that no profile shows. When the live model and its
training step are at hand, :func:`measure_costs` times untracked steps with every unit kept, every unit
fully checkpointed and every unit selectively checkpointed, interleaved, and apportions each difference to
the units in proportion to the profile's modelled costs. ``memprof.plan(..., costs=...)`` then prices
options with these numbers and measures the overhead against the untracked step time.

Known limits: costs are per configuration measured (the given precision, no sharding); a step is timed
whole, so other work in the step adds noise (medians of paired runs keep it down).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

__all__ = ["OptionCosts", "measure_costs", "measure_overhead", "uniform_plan"]


@dataclass(frozen=True)
class OptionCosts:
    """Untracked step time and the measured extra time of each option, per unit (ms)."""

    base_step_ms: float
    extra_ms: dict = field(default_factory=dict)  # mode -> {unit: ms}
    reps: int = 0


def _timed(step, plan, model) -> float:
    from .apply import apply

    if plan is None:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0
    with apply(model, plan):
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0


def measure_overhead(model, step, plan, reps: int = 21) -> float:
    """Median of paired (plan / no plan) step-time ratios minus one, interleaved ABBA, untracked."""
    ratios = []
    for r in range(reps):
        if r % 2 == 0:
            base, planned = _timed(step, None, model), _timed(step, plan, model)
        else:
            planned, base = _timed(step, plan, model), _timed(step, None, model)
        ratios.append(planned / base)
    return statistics.median(ratios) - 1


def uniform_plan(units: list[str], mode: str):
    """A plan checkpointing every unit the same way (for timing), fp32, no sharding."""
    from .plan import CheckpointChoice, Plan, Sharding, Source

    return Plan(created="1970-01-01T00:00:00+00:00", memprof_version="timing", budget_bytes=1, world_size=1,
                device="", levers=("checkpoint",),
                predicted_peak_bytes=1, baseline_step_ms=1.0, predicted_step_ms=1.0, predicted_overhead=0.0,
                precision="fp32", sharding=Sharding("none", True, False, 1),
                checkpoint=tuple(CheckpointChoice(u, mode) for u in units),
                source=Source("timing", "", False))


def measure_costs(model, step, prof, units: list[str] | None = None, modes=("full", "selective"),
                  reps: int = 5, precision: str | None = None) -> OptionCosts:
    """Time ``step()`` (one training step) with each mode applied to all units, interleaved, untracked."""
    from .apply import apply
    from .chain import chain_model, find_units

    names = units or find_units(prof)
    model_costs = {u.name: {o.name: o.extra_ms for o in u.options}
                   for u in chain_model(prof, prof.peak_bytes, names).problem.units}
    plans = {m: uniform_plan(names, m) for m in modes}
    if precision not in (None, "fp32"):
        plans = {m: replace(p, precision=precision) for m, p in plans.items()}
    step()  # warm
    for p in plans.values():
        with apply(model, p):
            step()
    times: dict[str, list[float]] = {m: [] for m in ("keep", *modes)}
    order = list(times)
    for r in range(reps):
        for mode in (order if r % 2 == 0 else order[::-1]):  # alternate the order: drift cancels
            times[mode].append(_timed(step, None if mode == "keep" else plans[mode], model))
    base = statistics.median(times["keep"]) * 1e3
    extra: dict = {}
    for mode in modes:
        diffs = [(t - k) * 1e3 for t, k in zip(times[mode], times["keep"])]
        total = max(0.0, statistics.median(diffs))
        weights = {u: model_costs[u].get(mode, 0.0) for u in names}
        wsum = sum(weights.values()) or len(names)
        extra[mode] = {u: total * (weights[u] if sum(weights.values()) else 1.0) / wsum for u in names}
    return OptionCosts(base, extra, reps)
