"""The decision: checkpointing, precision and sharding under a memory budget, for the least step time.

For every configuration of the allowed levers — precision x sharding strategy (outer enumeration) — the
planner takes that configuration's profile (the one given, or an estimate of the same model from a
:class:`~memprof.policy.sources.EstimateSource`), builds the chain model of its units
(:mod:`memprof.policy.chain`) and solves checkpointing exactly with the DP (:mod:`memprof.policy.solver`).
Predicted step time = base step time x precision ratio + recomputation + exposed communication
(:mod:`memprof.policy.costs`). The plan is the feasible configuration with the least predicted time
(ties: the lower peak); the Pareto frontier (peak vs time) over all configurations comes with it, and an
explanation of each lever's effect and of the choice. An infeasible budget raises
:class:`InfeasibleBudgetError` naming the smallest achievable peak and what dominates it.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from .._version import __version__
from ..errors import MemprofError
from ..estimation.devices import resolve_capacity
from ..training import check_precision
from ..units import format_bytes
from .chain import MODES, chain_model, find_units
from .costs import CommModel, comm_ms
from .plan import CheckpointChoice, FrontierPoint, Plan, Sharding, Source
from .solver import InfeasibleBudget, Solution, dominant_term, frontier, min_peak, solve_dp

__all__ = ["plan", "InfeasibleBudgetError", "Candidate", "LEVERS"]

LEVERS = ("checkpoint", "precision", "sharding")
_PRECISION_ORDER = ("fp32", "bf16-autocast", "fp16-autocast", "bf16")


class InfeasibleBudgetError(MemprofError):
    """No configuration of the allowed levers fits the budget."""

    def __init__(self, message: str, min_peak_bytes: int, budget_bytes: int):
        super().__init__(message)
        self.min_peak_bytes = min_peak_bytes
        self.budget_bytes = budget_bytes


@dataclass(frozen=True)
class Candidate:
    """One configuration's best answer under the budget (or its smallest peak when nothing fits)."""

    precision: str
    sharding: str
    solution: Solution  # checkpoint choices, chain peak, recompute ms
    peak_bytes: int  # with the floor (optimizer step etc.)
    step_ms: float
    base_ms: float  # without recomputation and communication
    comm_ms: float
    units: tuple[str, ...]
    profile: object

    def describe(self) -> str:
        modes = list(self.solution.choices)
        parts = [self.precision, "no sharding" if self.sharding == "none" else f"FSDP {self.sharding}"]
        counted = {m: modes.count(m) for m in MODES if modes.count(m)}
        if counted.get("full") or counted.get("selective"):
            parts.append(", ".join(f"{n} of {len(modes)} units {m}" for m, n in counted.items() if m != "keep"))
        else:
            parts.append("no checkpointing")
        return "; ".join(parts)


def _profile_hash(prof) -> str:
    return "sha256:" + hashlib.sha256(prof.to_json().encode()).hexdigest()[:16]


def _steady_step_ms(prof) -> float:
    """The fastest step after the first: a tracked step only gets slower (the first ones measure op scratch)."""
    steps = [s.duration_ms for s in prof.steps if s.micro_batches]
    steps = steps[1:] if len(steps) > 1 else steps
    return min(steps) if steps else 0.0


def _travelling_bytes(fp32_param_bytes: int, precision: str) -> tuple[int, int]:
    """Bytes of params in their compute dtype and of grads in their reduce dtype (whole model)."""
    if precision in ("bf16-autocast", "fp16-autocast"):  # MixedPrecisionPolicy: 16-bit all-gathers, fp32 reductions
        return fp32_param_bytes // 2, fp32_param_bytes
    if precision == "bf16":
        return fp32_param_bytes // 2, fp32_param_bytes // 2
    return fp32_param_bytes, fp32_param_bytes


def plan(prof, budget, *, world_size: int = 1, levers=("checkpoint",), units: list[str] | None = None,
         source=None, precision: str | None = None, modes=MODES, comm: CommModel | None = None,
         shard_group_size: int | None = None, profiles: dict | None = None,
         precisions: tuple[str, ...] | None = None, costs=None) -> Plan:
    """The configuration with the least predicted step time whose predicted peak fits ``budget``.

    Args:
        prof: the profile to plan from (measured or estimated), of an un-checkpointed model.
        budget: bytes, a size ("24GiB") or a device name ("H100-80GB").
        world_size: ranks the plan is for; sharding is considered only when > 1.
        levers: subset of ("checkpoint", "precision", "sharding").
        units: unit names/patterns (default: the profile's repeated blocks).
        source: an :class:`EstimateSource` for the configurations ``prof`` is not (other precisions, sharding).
        precision: the precision ``prof`` was taken in (default: its assumptions, else fp32).
        profiles: measured profiles of other configurations, keyed by (precision, sharding); they win
            over estimates for both memory and time.
        precisions: the precisions the precision lever may choose from (default: all).
        costs: measured option costs for the given configuration (:func:`memprof.policy.timing.measure_costs`);
            they replace the modelled recompute times and the profile's (tracked) step time.
    """
    levers = tuple(levers)
    for lever in levers:
        if lever not in LEVERS:
            raise MemprofError(f"unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise MemprofError(f"world_size must be a positive integer, got {world_size!r}")
    device, budget_bytes = resolve_capacity(budget)
    if budget_bytes is None or budget_bytes <= 0:
        raise MemprofError(f"budget must be a positive size or a device name, got {budget!r}")
    base_precision = check_precision(precision or prof.assumptions.get("precision", "fp32"))
    base_sharding = prof.assumptions.get("sharding", "none").split(" ")[0]
    comm = comm or CommModel()
    profiles = dict(profiles or {})
    profiles.setdefault((base_precision, base_sharding if world_size > 1 else "none"), prof)

    allowed = [check_precision(p) for p in (precisions or _PRECISION_ORDER)]
    precisions = [p for p in _PRECISION_ORDER if p in allowed] if "precision" in levers else [base_precision]
    if base_precision not in precisions:
        precisions.insert(0, base_precision)
    strategies = ["none"]
    if "sharding" in levers and world_size > 1:
        strategies += ["full", "shard-grad-op"] + (["hybrid"] if shard_group_size else [])
    notes: list[str] = []
    if ("precision" in levers or (world_size > 1 and "sharding" in levers)) and source is None:
        missing = [k for k in [(p, s) for p in precisions for s in strategies] if k not in profiles]
        if missing:
            notes.append("precision/sharding alternatives need the model (source=): planned with what was given")
            precisions = sorted({p for p, _ in profiles}, key=_PRECISION_ORDER.index)
            strategies = sorted({s for _, s in profiles}, key=["none", "full", "shard-grad-op", "hybrid"].index)

    base_measured_ms = _steady_step_ms(prof)
    full_params = prof.modules[""].param_bytes if "" in prof.modules else 0  # the given profile is unsharded
    fp32_params = full_params * (2 if base_precision == "bf16" else 1)
    modelled_base = None
    if source is not None and (len(precisions) > 1 or len(strategies) > 1):
        modelled_base = _steady_step_ms(source.profile(base_precision, "none", 1))

    candidates: list[Candidate] = []
    frontier_points: list[tuple[int, float, str]] = []
    unit_names = units
    for p in precisions:
        for s in strategies:
            key = (p, s)
            ps = profiles.get(key)
            if ps is None:
                if source is None:
                    continue
                ps = source.profile(p, s, world_size if s != "none" else 1, shard_group_size)
            names = find_units(ps, unit_names) if unit_names else find_units(ps)
            measured = costs if (costs is not None and ps is prof) else None
            model = chain_model(ps, budget_bytes, names, modes if "checkpoint" in levers else ("keep",),
                                extra_ms=measured.extra_ms if measured else None)
            # Step time without recomputation: measured for given profiles, else scaled from the model.
            if measured is not None:
                base_ms, scale = measured.base_step_ms, 1.0
            elif key in profiles and _steady_step_ms(ps):
                base_ms = _steady_step_ms(ps)
                scale = 1.0
            else:
                ratio = _steady_step_ms(ps) / modelled_base if modelled_base else 1.0
                base_ms = base_measured_ms * ratio
                scale = base_measured_ms / modelled_base if modelled_base else 1.0
            params, grads = _travelling_bytes(fp32_params, p)
            exposed = comm_ms(s, world_size, params, grads, base_ms, comm, shard_group_size)
            for sol in frontier(model.problem):
                peak = max(model.floor_bytes, sol.peak_bytes)
                frontier_points.append((peak, base_ms + exposed + sol.extra_ms * scale,
                                        _describe(p, s, sol.choices)))
            try:
                sol = solve_dp(model.problem) if model.floor_bytes <= budget_bytes else None
            except InfeasibleBudget:
                sol = None
            if sol is None:
                sol = min_peak(model.problem)
                feasible = False
            else:
                feasible = True
            peak = max(model.floor_bytes, sol.peak_bytes)
            cand = Candidate(p, s, sol, peak, base_ms + exposed + sol.extra_ms * scale, base_ms, exposed,
                             tuple(names), ps)
            candidates.append((feasible and peak <= budget_bytes, cand, model))

    if not candidates:
        raise MemprofError("nothing to plan: no profile for the allowed configurations")
    feasible = [(c, m) for ok, c, m in candidates if ok]
    if not feasible:
        raise _infeasible(candidates, budget_bytes, levers, world_size)
    best, best_model = min(feasible, key=lambda cm: (cm[0].step_ms, cm[0].peak_bytes))
    baseline = _baseline(candidates, base_precision)
    return _make_plan(prof, best, best_model, baseline, budget_bytes, device, world_size, levers,
                      frontier_points, candidates, comm, notes, shard_group_size, costs)


def _describe(precision: str, sharding: str, choices) -> str:
    counted = {m: list(choices).count(m) for m in ("full", "selective")}
    ck = ", ".join(f"{n}/{len(choices)} {m}" for m, n in counted.items() if n) or "no checkpointing"
    return f"{precision}, {'no sharding' if sharding == 'none' else 'FSDP ' + sharding}, {ck}"


def _baseline(candidates, base_precision) -> Candidate:
    """The given configuration with nothing changed: the reference for the overhead."""
    for _, c, _model in candidates:
        if c.precision == base_precision and c.sharding == "none":
            return c
    return candidates[0][1]


def _pareto(points: list[tuple[int, float, str]], limit: int = 40) -> list[tuple[int, float, str]]:
    out: list[tuple[int, float, str]] = []
    for peak, ms, desc in sorted(points, key=lambda p: (p[0], p[1])):
        if not out or ms < out[-1][1] - 1e-9:
            out.append((peak, ms, desc))
    if len(out) > limit:  # keep the ends and an even spread
        step = (len(out) - 1) / (limit - 1)
        out = [out[round(i * step)] for i in range(limit)]
    return out


def _infeasible(candidates, budget_bytes, levers, world_size) -> InfeasibleBudgetError:
    _, smallest, model = min(candidates, key=lambda c: c[1].peak_bytes)
    why = _dominant(smallest, model)
    hints = []
    if "sharding" not in levers or world_size == 1:
        hints.append("allow sharding over more ranks")
    if "precision" not in levers:
        hints.append("allow other precisions")
    if "checkpoint" not in levers:
        hints.append("allow checkpointing")
    hint = ("; " + " or ".join(hints)) if hints else "; use a smaller batch or a lighter optimizer"
    return InfeasibleBudgetError(
        f"no plan fits {format_bytes(budget_bytes)}: the smallest achievable peak is "
        f"{format_bytes(smallest.peak_bytes)} ({smallest.describe()}), dominated by {why}{hint}",
        smallest.peak_bytes, budget_bytes)


def _dominant(c: Candidate, model) -> str:
    """The largest category at the peak of the configuration's smallest-peak plan, in words."""
    prof = c.profile
    if model.floor_bytes >= c.solution.peak_bytes:
        step = max(prof.steps, key=lambda s: s.phase_peak_bytes.get(model.floor_phase, 0))
        where = f"the {model.floor_phase} phase ({format_bytes(step.phase_peak_bytes.get(model.floor_phase, 0))})"
    else:
        term = dominant_term(model.problem, c.solution.choices)
        where = term.describe()
    cats = {k: v for k, v in prof.peak.by_category.items() if k in ("param", "grad", "optimizer")}
    big = max(cats, key=cats.get)
    return f"{where}; of it, {'optimizer state' if big == 'optimizer' else big + 's'} {format_bytes(cats[big])}"


def _make_plan(prof, best: Candidate, model, baseline: Candidate, budget_bytes, device, world_size, levers,
               frontier_points, candidates, comm, notes, shard_group_size, costs=None) -> Plan:
    choices = tuple(CheckpointChoice(u, m) for u, m in zip(best.units, best.solution.choices))
    base_ms = baseline.base_ms + baseline.comm_ms
    overhead = best.step_ms / base_ms - 1 if base_ms > 0 else 0.0
    explanation = _explain(prof, best, baseline, candidates, budget_bytes)
    assumptions = {
        "time": ("step time measured in the profile" if not prof.estimated else prof.assumptions.get("time", "")),
        "recompute": "a full checkpoint recomputes the unit's forward; selective recomputes all but matmuls "
                     "and attention",
        "memory": "chain model fitted to the profile's per-unit levels (exact with no checkpointing)",
    }
    if world_size > 1:
        assumptions["communication"] = comm.describe()
    if costs is not None:
        assumptions["time"] = (f"measured: untracked steps with every unit kept / checkpointed by each mode, "
                               f"interleaved ({costs.reps} runs each); other configurations modelled")
    for i, n in enumerate(notes):
        assumptions[f"note{i + 1}"] = n
    strategy = best.sharding
    sharding = Sharding(strategy=strategy, reshard_after_forward=strategy != "shard-grad-op",
                        offload_optimizer=False,
                        shard_group_size=(shard_group_size or world_size) if strategy == "hybrid" else world_size)
    return Plan(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        memprof_version=__version__, budget_bytes=budget_bytes, world_size=world_size, device=device,
        levers=tuple(levers), predicted_peak_bytes=best.peak_bytes, baseline_step_ms=base_ms,
        predicted_step_ms=best.step_ms, predicted_overhead=overhead, precision=best.precision,
        sharding=sharding, checkpoint=choices,
        source=Source(profile_hash=_profile_hash(prof), model=prof.assumptions.get("model", ""),
                      estimated=prof.estimated),
        assumptions=assumptions, explanation=tuple(explanation),
        frontier=tuple(FrontierPoint(pk, ms, d) for pk, ms, d in _pareto(frontier_points)),
    )


def _explain(prof, best: Candidate, baseline: Candidate, candidates, budget_bytes) -> list[str]:
    lines = []
    keep_peak = baseline.profile.peak_bytes
    lines.append(f"As profiled ({baseline.precision}, no checkpointing): peak {format_bytes(keep_peak)}, "
                 f"step {baseline.base_ms:.1f} ms; budget {format_bytes(budget_bytes)}.")
    acts = sum(baseline.profile.modules[u].activation_bytes for u in baseline.units if u in baseline.profile.modules)
    lines.append(f"{len(baseline.units)} units ({baseline.units[0]} ... {baseline.units[-1]}) keep "
                 f"{format_bytes(acts)} of activations for backward.")
    modes = list(best.solution.choices)
    n_full, n_sel = modes.count("full"), modes.count("selective")
    if n_full or n_sel:
        lines.append(f"Checkpointing {n_full} unit{'s' if n_full != 1 else ''} fully and {n_sel} selectively recomputes "
                     f"{best.solution.extra_ms:.1f} ms of forward work per step.")
    else:
        lines.append("No checkpointing needed.")
    if best.precision != baseline.precision:
        lines.append(f"Precision {best.precision}: peak {format_bytes(best.profile.peak_bytes)} before "
                     f"checkpointing (vs {format_bytes(keep_peak)}), step {best.base_ms:.1f} ms (vs "
                     f"{baseline.base_ms:.1f} ms).")
    if best.sharding != "none":
        lines.append(f"FSDP {best.sharding}: per-rank peak {format_bytes(best.profile.peak_bytes)} before "
                     f"checkpointing; {best.comm_ms:.1f} ms of communication not hidden by compute.")
    feasible = sorted((c for ok, c, _ in candidates if ok), key=lambda c: c.step_ms)
    lines.append(f"Chosen: {best.describe()} — predicted peak {format_bytes(best.peak_bytes)}, step "
                 f"{best.step_ms:.1f} ms: the least step time of {len(feasible)} configurations that fit.")
    if len(feasible) > 1:
        nxt = feasible[1]
        lines.append(f"Next best: {nxt.describe()} — {format_bytes(nxt.peak_bytes)}, {nxt.step_ms:.1f} ms.")
    return lines
