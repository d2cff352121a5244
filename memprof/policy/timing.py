"""Measured option costs: what checkpointing really costs on this machine, for the planner's time model.

A profile gives each unit's forward time and the share of it that checkpointing recomputes; the real cost of
a checkpointed unit also includes checkpointing's own machinery (selective checkpointing runs every op of
the unit through two dispatch modes) and cache effects that no profile shows. When the live model and its
training step are at hand, :func:`measure_costs` times untracked steps, for each mode (full, selective),
with every unit and with one unit (the last) checkpointed, each in pairs with the plain step.

Costs need not be additive: one checkpointed unit may cost more than the per-unit average of all units. The
last unit is measured because its recomputation runs first in backward, at the step's highest footprint
(fresh pages, colder caches), and it is the first unit the planner checkpoints (tighter budgets add units
towards the front). On this 2-core CPU a few-percent overhead is at the edge of what the timing resolves:
in five runs of experiments/apply_verify.py the same plan measured anywhere from 3.0% to 6.1%. The two points give a per-mode model
``cost(k units) = first + k x per_unit``: ``first_unit_ms`` is the surcharge paid once when a mode is used at
all (zero when the data show none), ``extra_ms`` the per-unit slope, apportioned to the units in proportion
to the profile's modelled costs. ``memprof.plan(..., costs=...)`` solves once per set of modes
used (adding their surcharges), so the choice stays exact under this model, and measures the overhead
against the untracked step time.

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
    extra_ms: dict = field(default_factory=dict)  # mode -> {unit: ms}, the per-unit slope
    reps: int = 0
    first_unit_ms: dict = field(default_factory=dict)  # mode -> ms paid once when any unit uses the mode

    def surcharge_ms(self, choices) -> float:
        """The once-per-mode part of the cost of a set of per-unit choices."""
        used = set(choices)
        return sum(ms for mode, ms in self.first_unit_ms.items() if mode in used)


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


def _paired(model, step, plan, reps: int) -> tuple[list[float], list[float]]:
    """(plan / no plan step-time ratios, the plain steps' seconds), timed in pairs in alternating order."""
    ratios, plain = [], []
    for r in range(reps):
        if r % 2 == 0:
            base, planned = _timed(step, None, model), _timed(step, plan, model)
        else:
            planned, base = _timed(step, plan, model), _timed(step, None, model)
        ratios.append(planned / base)
        plain.append(base)
    return ratios, plain


def measure_overhead(model, step, plan, reps: int = 21) -> float:
    """Median of paired (plan / no plan) step-time ratios minus one, interleaved ABBA, untracked."""
    return statistics.median(_paired(model, step, plan, reps)[0]) - 1


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
    """Time ``step()`` (one training step) with each mode applied to all units and to one, each paired with
    the plain step (ABBA, untracked, as :func:`measure_overhead`); fit each mode's once-per-mode surcharge
    and per-unit slope (see the module docstring)."""
    from .apply import apply
    from .chain import chain_model, find_units

    names = units or find_units(prof)
    model_costs = {u.name: {o.name: o.extra_ms for o in u.options}
                   for u in chain_model(prof, prof.peak_bytes, names).problem.units}
    last = names[-1]
    plans = {}
    for m in modes:
        plans[m] = uniform_plan(names, m)
        if len(names) > 1:
            one = uniform_plan(names, "keep")
            plans[(m, 1)] = replace(one, checkpoint=tuple(replace(c, mode=m) if c.unit == last else c
                                                          for c in one.checkpoint))
    if precision not in (None, "fp32"):
        plans = {k: replace(p, precision=precision) for k, p in plans.items()}
    step()  # warm
    for p in plans.values():
        with apply(model, p):
            step()
    # Each configuration is timed in pairs with the plain step, in alternating order, exactly as
    # measure_overhead times a plan: whatever one step leaves to the next (heap size, caches) is the same
    # for the prediction and its verification.
    keep_times: list[float] = []
    ratios: dict = {}
    for key, p in plans.items():
        ratios[key], plain = _paired(model, step, p, reps)
        keep_times += plain
    base = statistics.median(keep_times) * 1e3

    def extra_of(key) -> float:
        return max(0.0, (statistics.median(ratios[key]) - 1) * base)

    n = len(names)
    extra: dict = {}
    first: dict = {}
    for mode in modes:
        total = extra_of(mode)
        if n > 1:
            one = extra_of((mode, 1))
            slope = max(0.0, (total - one) / (n - 1))
            first[mode] = max(0.0, min(one, total) - slope)
            total = max(0.0, total - first[mode])
        weights = {u: model_costs[u].get(mode, 0.0) for u in names}
        wsum = sum(weights.values()) or len(names)
        extra[mode] = {u: total * (weights[u] if sum(weights.values()) else 1.0) / wsum for u in names}
    return OptionCosts(base, extra, reps, first)

