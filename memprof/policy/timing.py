"""Measured step-time costs of checkpointing and of plans on this machine, for the planner's time model.

:func:`measure_costs` times untracked steps of the live model with each mode (full, selective) on every unit
and on the last unit alone, each in pairs with the plain step. The resulting :class:`OptionCosts` give the
last unit what it measured alone (its recomputation runs first in backward, at the step's highest footprint)
and share the rest of the every-unit time among the other units in proportion to the profile's modelled
costs, so costs stay additive and the solver exact (results/checkpoint-costs.json checks the model on the
demo GPT's blocks). :func:`time_overhead` times a plan against the plain step (ABBA
pairs); :func:`verify_overheads` times cost configurations and plans in the same rounds, and
:func:`predicted_overhead` gives what a set of costs predicts for a plan, as the planner computes it. Timing
can be asked for a precision (``stderr``: pairs are added until the median paired ratio's standard error is
that share of the measured overhead) instead of a count.

Known limits: on a CPU the allocator matters. Under glibc's default malloc every large tensor is a fresh
mapping whose pages the kernel zeroes on first touch, checkpointing changes that as well as adding
recomputation, and block costs do not add up (results/checkpoint-costs-default-malloc.json);
:func:`cpu_allocator_note` says so in plans made with such costs (start the process with
:data:`CACHING_MALLOC_ENV`; CUDA's caching allocator has no such effect). Costs are per configuration
measured (the given precision, no sharding); a step is timed whole, so other work in it adds noise; a
precision target bounds the sampling error only, not drift between timing the costs and running the plan
(timing them together, :func:`verify_overheads`, removes that).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace

from ..plans import CheckpointChoice, Plan, Sharding, Source
from ..vocab import RECOMPUTE_MODES
from .apply import apply
from .chain import chain_model, find_units

__all__ = ["CACHING_MALLOC_ENV", "OptionCosts", "PairedTiming", "cpu_allocator_note", "measure_costs", "measure_overhead",
           "predicted_overhead", "time_overhead", "uniform_plan", "verify_overheads"]


@dataclass(frozen=True)
class OptionCosts:
    """Untracked step time and the measured extra time of each option, per unit (ms)."""

    base_step_ms: float
    extra_ms: dict = field(default_factory=dict)  # mode -> {unit: ms}
    reps: int = 0
    pairs: dict = field(default_factory=dict)  # configuration ("full", "full@1", ...) -> (pairs timed, stderr)


def _timed(step, plan, model) -> float:

    if plan is None:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0
    with apply(model, plan):
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0


def median_stderr(ratios: list[float]) -> float:
    """Standard error of the median of ``ratios``: 1.2533 x (1.4826 x MAD) / sqrt(n), the normal-theory value
    with a spread estimate that one stalled step cannot inflate."""
    n = len(ratios)
    if n < 2:
        return float("inf")
    m = statistics.median(ratios)
    mad = statistics.median([abs(r - m) for r in ratios])
    return 1.2533 * 1.4826 * mad / n**0.5


def enough_pairs(ratios: list[float], reps: int, stderr: float | None, max_reps: int | None,
                 floor: float = 0.002) -> bool:
    """Whether to stop timing: at least ``reps`` pairs, and (``stderr`` given) the median ratio's standard
    error is at most ``stderr`` x the overhead measured so far (never asked below ``floor``, 0.2
    percentage points), or ``max_reps`` pairs were timed."""
    n = len(ratios)
    if n < reps:
        return False
    if stderr is None or (max_reps is not None and n >= max_reps):
        return True
    target = max(floor, stderr * abs(statistics.median(ratios) - 1))
    return median_stderr(ratios) <= target


def _paired(model, step, plan, reps: int, stderr: float | None = None,
            max_reps: int | None = None) -> tuple[list[float], list[float]]:
    """(plan / no plan step-time ratios, the plain steps' seconds), timed in pairs in alternating order
    until :func:`enough_pairs`."""
    ratios, plain = [], []
    while not enough_pairs(ratios, reps, stderr, max_reps):
        if len(ratios) % 2 == 0:
            base, planned = _timed(step, None, model), _timed(step, plan, model)
        else:
            planned, base = _timed(step, plan, model), _timed(step, None, model)
        ratios.append(planned / base)
        plain.append(base)
    return ratios, plain


@dataclass(frozen=True)
class PairedTiming:
    """A plan's measured step-time overhead: the median paired ratio minus one, with its standard error."""

    overhead: float
    stderr: float
    pairs: int
    base_ms: float  # median untracked step without the plan


def time_overhead(model, step, plan, reps: int = 21, stderr: float | None = None,
                  max_reps: int | None = None) -> PairedTiming:
    """Time untracked steps with and without ``plan``, in pairs in alternating order (ABBA): ``reps`` pairs,
    or, with ``stderr`` (a share, e.g. 0.1), more until the median's standard error is that share of the overhead
    (at most ``max_reps``). Small overheads need many pairs on a noisy machine; large ones few."""
    ratios, plain = _paired(model, step, plan, reps, stderr, max_reps)
    return PairedTiming(statistics.median(ratios) - 1, median_stderr(ratios), len(ratios),
                        statistics.median(plain) * 1e3)


def measure_overhead(model, step, plan, reps: int = 21, stderr: float | None = None,
                     max_reps: int | None = None) -> float:
    """Median of paired (plan / no plan) step-time ratios minus one, interleaved ABBA, untracked
    (see :func:`time_overhead`)."""
    return time_overhead(model, step, plan, reps, stderr, max_reps).overhead


def uniform_plan(units: list[str], mode: str):
    """A plan checkpointing every unit the same way (for timing), fp32, no sharding."""

    return Plan(created="1970-01-01T00:00:00+00:00", memprof_version="timing", budget_bytes=1, world_size=1,
                device="", levers=("checkpoint",),
                predicted_peak_bytes=1, baseline_step_ms=1.0, predicted_step_ms=1.0, predicted_overhead=0.0,
                precision="fp32", sharding=Sharding("none", True, False, 1),
                checkpoint=tuple(CheckpointChoice(u, mode) for u in units),
                source=Source("timing", "", False))


def cost_configurations(prof, units, modes, precision):
    """(unit names, modelled per-unit costs, the timed configurations): each mode on every unit and on
    the last one."""

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
    return names, model_costs, plans


def config_name(key) -> str:
    return key if isinstance(key, str) else f"{key[0]}@{key[1]}"


def _fit(names, modes, model_costs, ratios: dict, base_ms: float, reps: int, pairs: dict) -> OptionCosts:
    """Each mode's per-unit costs from the configurations' median ratios: the last unit what it cost on its
    own (at most the every-unit cost), the others the rest of the every-unit cost, in proportion to the
    profile's modelled costs."""
    def extra_of(key) -> float:
        return max(0.0, (statistics.median(ratios[key]) - 1) * base_ms)

    last, others = names[-1], names[:-1]
    extra: dict = {}
    for mode in modes:
        total = extra_of(mode)
        if not others:
            extra[mode] = {last: total}
            continue
        alone = min(extra_of((mode, 1)), total)
        weights = {u: model_costs[u].get(mode, 0.0) for u in others}
        wsum = sum(weights.values())
        rest = total - alone
        extra[mode] = {u: rest * (weights[u] / wsum if wsum else 1.0 / len(others)) for u in others}
        extra[mode][last] = alone
    return OptionCosts(base_ms, extra, reps, pairs)


def _warm(model, step, plans) -> None:

    step()
    for p in plans:
        with apply(model, p):
            step()


def measure_costs(model, step, prof, units: list[str] | None = None, modes=RECOMPUTE_MODES,
                  reps: int = 5, precision: str | None = None, *, stderr: float | None = None,
                  max_reps: int | None = None) -> OptionCosts:
    """Time ``step()`` (one training step) with each mode applied to all units and to the last one, each
    paired with the plain step (ABBA, untracked, as :func:`time_overhead`); fit each mode's per-unit costs
    (see the module docstring). ``reps`` pairs per configuration, or with ``stderr``
    (a share, e.g. 0.1) more until each configuration's median ratio has that relative standard error
    (at most ``max_reps`` pairs)."""
    names, model_costs, plans = cost_configurations(prof, units, modes, precision)
    _warm(model, step, plans.values())
    # Each configuration is timed in pairs with the plain step, in alternating order, exactly as
    # measure_overhead times a plan: whatever one step leaves to the next (heap size, caches) is the same
    # for the prediction and its verification.
    keep_times: list[float] = []
    ratios: dict = {}
    pairs: dict = {}
    for key, p in plans.items():
        ratios[key], plain = _paired(model, step, p, reps, stderr, max_reps)
        keep_times += plain
        pairs[config_name(key)] = (len(plain), median_stderr(ratios[key]))
    return _fit(names, modes, model_costs, ratios, statistics.median(keep_times) * 1e3, reps, pairs)


# glibc malloc told to keep what is freed, as a caching allocator does: never mmap (so never munmap), never
# trim the heap, and grow it in 1 GiB steps. Set before the process starts (glibc reads it once).
CACHING_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                      "MALLOC_TOP_PAD_": str(1 << 30)}


def cpu_allocator_note() -> str | None:
    """Why CPU step times may not add up here, or ``None``: glibc's default malloc returns every large block
    to the kernel when it is freed, and the kernel zeroes its pages again on their first touch, a third of a
    GPT step on this project's CPUs (results/checkpoint-costs-default-malloc.json). Checkpointing then
    changes that page-fault time as well as adding recomputation, and unit costs stop adding up. Read from
    the environment this process started with (glibc reads it once); a preloaded jemalloc, tcmalloc or
    mimalloc caches freed memory and is taken as fine."""
    if platform.libc_ver()[0] != "glibc" or os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return None
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    env = " ".join(f"{k}={v}" for k, v in CACHING_MALLOC_ENV.items())
    return ("CPU step times taken under glibc's default malloc, which unmaps freed tensors: page faults change "
            f"with checkpointing too, so measured unit costs do not add up; start the process with {env} (or "
            "jemalloc/tcmalloc) for costs that do, as on CUDA's caching allocator")


def predicted_overhead(costs: OptionCosts, plan) -> float:
    """The overhead ``costs`` predict for ``plan``'s checkpointing (fp32, unsharded, as the planner models a
    plan made with these costs): the per-unit extra times of its checkpointed units over the untracked
    step time."""
    extra = sum(costs.extra_ms.get(c.mode, {}).get(c.unit, 0.0) for c in plan.checkpoint if c.mode != "keep")
    return extra / costs.base_step_ms


def _rounds(model, step, plans: dict, reps: int, stderr: float | None, max_reps: int | None):
    """Every configuration timed once per round, each in a pair with a plain step next to it (plain first
    in even rounds, second in odd ones; the configurations in reverse order in odd rounds), until
    :func:`enough_pairs` holds for all of them: (ratios per key, plain steps' seconds)."""
    keys = list(plans)
    ratios: dict = {k: [] for k in keys}
    plain: list[float] = []
    r = 0
    while not all(enough_pairs(ratios[k], reps, stderr, max_reps) for k in keys):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            if r % 2 == 0:
                base, planned = _timed(step, None, model), _timed(step, plans[k], model)
            else:
                planned, base = _timed(step, plans[k], model), _timed(step, None, model)
            ratios[k].append(planned / base)
            plain.append(base)
        r += 1
    return ratios, plain


def verify_overheads(model, step, prof, plans: dict, units: list[str] | None = None,
                     modes=RECOMPUTE_MODES, reps: int = 21, precision: str | None = None, *,
                     stderr: float | None = None, max_reps: int | None = None):
    """Time the cost configurations of :func:`measure_costs` and every plan of ``plans`` (label -> Plan) in
    the same rounds, each against a plain step next to it: ``(costs, timings)``, the costs fitted from these
    rounds and each plan's :class:`PairedTiming`.

    A machine that drifts between timing the costs and running a plan moves both alike, so
    ``predicted_overhead(costs, plan)`` against ``timings[label].overhead`` tests the cost model itself
    (per-unit costs adding up to a plan's), not the drift. Rounds go on until every configuration has
    ``reps`` pairs and, with ``stderr``, that relative standard error (at most ``max_reps`` rounds)."""
    names, model_costs, configs = cost_configurations(prof, units, modes, precision)
    timed = {("cost", k): p for k, p in configs.items()}
    timed.update({("plan", label): p for label, p in plans.items()})
    _warm(model, step, timed.values())
    ratios, plain = _rounds(model, step, timed, reps, stderr, max_reps)
    base_ms = statistics.median(plain) * 1e3
    cost_ratios = {k: ratios[("cost", k)] for k in configs}
    pairs = {config_name(k): (len(v), median_stderr(v)) for k, v in cost_ratios.items()}
    costs = _fit(names, modes, model_costs, cost_ratios, base_ms, reps, pairs)
    timings = {}
    for label in plans:
        rs = ratios[("plan", label)]
        timings[label] = PairedTiming(statistics.median(rs) - 1, median_stderr(rs), len(rs), base_ms)
    return costs, timings
