"""The decision: checkpointing, precision and sharding under a memory budget, for the least step time.

For every configuration of the allowed levers — precision x sharding strategy x CPU offload (outer
enumeration; offload belongs to the sharding lever and is weighed at world size 1 too, as FSDP on one rank, but
not for CPU profiles, where host memory is the device's) — the planner takes that configuration's profile (the
one given, or an estimate of the same model from a :class:`~memprof.estimation.sources.EstimateSource`), builds
the chain model of its units (:mod:`memprof.policy.chain`) and solves checkpointing exactly with the DP
(:mod:`memprof.policy.solver`). Predicted step time = base step time x precision ratio + recomputation +
exposed communication (+ with offload: host copies not hidden by compute and the optimizer step on the CPU;
:mod:`memprof.policy.costs`). The plan is the feasible configuration with the least predicted time
(ties: the lower peak); the Pareto frontier (peak vs time) over all configurations comes with it, and an
explanation of each lever's effect and of the choice. An infeasible budget raises
:class:`~memprof.policy.solver.InfeasibleBudget` naming the smallest achievable peak and what dominates it.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from .._version import __version__
from ..advice import allocator_advice
from ..errors import MemprofError
from ..hardware import resolve_capacity
from ..plans import CheckpointChoice, FrontierPoint, Plan, Sharding, Source
from ..training import check_precision
from ..units import format_bytes
from ..vocab import (
    AUTOCAST_PRECISIONS,
    CHECKPOINT_MODES,
    LEVERS,
    PRECISIONS,
    RECOMPUTE_MODES,
    SHARDING_STRATEGIES,
)
from .chain import chain_model, find_units
from .costs import CommModel, comm_ms, offload_ms
from .solver import (
    InfeasibleBudget,
    Solution,
    dominant_term,
    frontier,
    min_peak,
    solve_dp,
)

__all__ = ["plan", "InfeasibleBudget", "UnweighableLeverError", "Candidate"]

# Under autocast a selectively checkpointed step measured 0.4-9.1% above the chain model's peak (a GPT, 1 to
# 6 of 6 blocks; the forward peak rises, not the retained bytes): not weighed until it is modelled right.
_SELECTIVE_AUTOCAST_NOTE = ("selective checkpointing not weighed under autocast: its forward peak is not "
                            "modelled right yet (measured up to 9% above prediction)")


class UnweighableLeverError(MemprofError):
    """A lever was asked for whose configurations cannot be priced from what was given (no model to estimate
    them, no measured profile of them). ``levers``: the levers concerned; ``configurations``: in words."""

    def __init__(self, levers: tuple[str, ...], configurations: tuple[str, ...]):
        self.levers = levers
        self.configurations = configurations
        shown = ", ".join(configurations[:3]) + (", ..." if len(configurations) > 3 else "")
        super().__init__(
            f"lever {' and '.join(levers)} cannot be weighed from this profile alone: its configurations "
            f"({shown}) need the model to estimate them (source=EstimateSource(...)) or measured profiles of "
            "them (profiles=); or plan with levers=('checkpoint',)")


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
    offload: bool = False  # FSDP2 CPU offload of parameter shards, gradients and optimizer state
    host_copy_ms: float = 0.0  # offload's host <-> device copies not hidden by compute
    cpu_step_ms: float = 0.0  # offload's optimizer step on the CPU
    host_bytes: int = 0  # offload: host memory per rank at its highest (in the optimizer step)

    @property
    def offload_ms(self) -> float:
        return self.host_copy_ms + self.cpu_step_ms

    def describe(self) -> str:
        modes = list(self.solution.choices)
        parts = [self.precision, _sharding_words(self.sharding, self.offload)]
        counted = {m: modes.count(m) for m in CHECKPOINT_MODES if modes.count(m)}
        if counted.get("full") or counted.get("selective"):
            parts.append(", ".join(f"{n} of {len(modes)} units {m}" for m, n in counted.items() if m != "keep"))
        else:
            parts.append("no checkpointing")
        return "; ".join(parts)


def _sharding_words(sharding: str, offload: bool) -> str:
    words = "no sharding" if sharding == "none" else f"FSDP {sharding}"
    return words + " + CPU offload" if offload else words


def _host_bytes(prof) -> tuple[int, int]:
    """(resident, peak) host bytes per rank of an offload profile: the estimator's, else (host and device being
    one, e.g. a CPU profile) its parameters, gradients and optimizer state."""
    if prof.offload_host_bytes is not None:
        return prof.offload_host_bytes
    root = prof.modules.get("")
    resident = root.param_bytes + root.grad_bytes + root.optimizer_bytes if root is not None else 0
    return resident, resident


def _config_key(key) -> tuple[str, str, bool]:
    """``profiles`` keys: (precision, sharding) or (precision, sharding, offload)."""
    if len(key) == 2:
        return (key[0], key[1], False)
    return (key[0], key[1], bool(key[2]))


def _profile_hash(prof) -> str:
    return "sha256:" + hashlib.sha256(prof.to_json().encode()).hexdigest()[:16]


def _travelling_bytes(fp32_param_bytes: int, precision: str) -> tuple[int, int]:
    """Bytes of params in their compute dtype and of grads in their reduce dtype (whole model)."""
    if precision in AUTOCAST_PRECISIONS:  # MixedPrecisionPolicy: 16-bit all-gathers, fp32 reductions
        return fp32_param_bytes // 2, fp32_param_bytes
    if precision == "bf16":
        return fp32_param_bytes // 2, fp32_param_bytes // 2
    return fp32_param_bytes, fp32_param_bytes


def plan(prof, budget, *, world_size: int = 1, levers=("checkpoint",), units: list[str] | None = None,
         source=None, precision: str | None = None, modes=CHECKPOINT_MODES, comm: CommModel | None = None,
         shard_group_size: int | None = None, profiles: dict | None = None,
         precisions: tuple[str, ...] | None = None, costs=None, precision_timing=None,
         applicable=LEVERS) -> Plan:
    """The configuration with the least predicted step time whose predicted peak fits ``budget``.

    Args:
        prof: the profile to plan from (measured or estimated), of an un-checkpointed model.
        budget: bytes, a size ("24GiB") or a device name ("H100-80GB").
        world_size: ranks the plan is for; FSDP strategies are considered only when > 1, CPU offload
            (FSDP2 ``CPUOffloadPolicy``) at any world size (at 1, as FSDP over a one-rank mesh).
        levers: subset of ("checkpoint", "precision", "sharding"); "sharding" includes CPU offload.
        units: unit names/patterns (default: the profile's repeated blocks).
        source: an :class:`EstimateSource` for the configurations ``prof`` is not (other precisions, sharding).
        precision: the precision ``prof`` was taken in (default: its assumptions, else fp32).
        profiles: measured profiles of other configurations, keyed by (precision, sharding) or (precision,
            sharding, offload); they win over estimates for both memory and time.
        precisions: the precisions the precision lever may choose from (default: all).
        costs: measured option costs for the given configuration (:func:`memprof.policy.timing.measure_costs`);
            they replace the modelled recompute times and the profile's (tracked) step time.
        precision_timing: measured step-time ratios of precisions on this device
            (:func:`memprof.policy.precision_timing.measure_precision_ratios`); they replace the modelled ratio
            of each precision they name. Without them other precisions' times are modelled, and the plan says so.
        applicable: the levers the caller can apply (a refusal suggests only those).
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
    base_sharding, base_offload = prof.sharding
    comm = comm or CommModel()
    profiles = {_config_key(k): v for k, v in (profiles or {}).items()}
    profiles.setdefault((base_precision, base_sharding if world_size > 1 or base_offload else "none", base_offload),
                        prof)

    allowed = [check_precision(p) for p in (precisions or PRECISIONS)]
    precisions = [p for p in PRECISIONS if p in allowed] if "precision" in levers else [base_precision]
    if base_precision not in precisions:
        precisions.insert(0, base_precision)
    configs = [("none", False)]  # (strategy, offload)
    notes: list[str] = []
    if "sharding" in levers:
        hybrid = ["hybrid"] if shard_group_size and world_size > 1 else []
        if world_size > 1:
            configs += [(s, False) for s in ["full", "shard-grad-op"] + hybrid]
        if prof.environment.device != "cpu":  # on a CPU, host memory is the device's: offload saves nothing
            configs += [(s, True) for s in ["full", "shard-grad-op"] + hybrid]
    if ("precision" in levers or "sharding" in levers) and source is None:
        missing = [k for k in [(p, s, o) for p in precisions for s, o in configs] if k not in profiles]
        if missing and len(profiles) == 1:  # nothing but the given profile: the lever has nothing to weigh
            raise UnweighableLeverError(tuple(lv for lv in ("precision", "sharding") if lv in levers),
                                        tuple(_describe_config(*k) for k in missing))
        if missing:  # weigh the measured profiles given (profiles=), and say which configurations were not
            notes.append("not weighed (no model to estimate them, no profile given): "
                         + ", ".join(_describe_config(*k) for k in missing))
            precisions = sorted({p for p, _, _ in profiles}, key=PRECISIONS.index)
            configs = sorted({(s, o) for _, s, o in profiles},
                             key=lambda c: (c[1], SHARDING_STRATEGIES.index(c[0])))
    if "sharding" in levers and prof.environment.device == "cpu" and not any(o for _, o in configs):
        notes.append("CPU offload not weighed: on a CPU the host's memory is the device's")

    base_measured_ms = prof.steady_step_ms
    full_params = prof.modules[""].param_bytes if "" in prof.modules else 0  # the given profile is unsharded
    fp32_params = full_params * (2 if base_precision == "bf16" else 1)
    modelled_base = None
    if source is not None and hasattr(source, "prefetch"):  # the estimates below, made ahead (in parallel)
        wanted = [(p, s, world_size if s != "none" else 1, shard_group_size, o) for p in precisions
                  for s, o in configs if (p, s, o) not in profiles]
        if len(precisions) > 1 or len(configs) > 1:
            wanted.insert(0, (base_precision, "none", 1, None, False))
        source.prefetch(wanted)
    if source is not None and (len(precisions) > 1 or len(configs) > 1):
        modelled_base = source.profile(base_precision, "none", 1).steady_step_ms

    candidates: list[Candidate] = []
    frontier_points: list[tuple[int, float, str]] = []
    unit_names = units
    for p in precisions:
        for s, o in configs:
            key = (p, s, o)
            ps = profiles.get(key)
            if ps is None:
                if source is None:
                    continue
                ps = source.profile(p, s, world_size if s != "none" else 1, shard_group_size, offload=o)
            names = find_units(ps, unit_names) if unit_names else find_units(ps)
            measured = costs if (costs is not None and ps is prof) else None
            # Costs measured in the base precision stand for another precision too when its whole-step ratio
            # was measured on this device (unsharded): the step scales by it, recomputation (forward work) by
            # the forward's ratio when that was timed too.
            step_ratio = (precision_timing.ratios.get(p) if costs is not None and measured is None and s == "none"
                          and not o and precision_timing is not None
                          and getattr(precision_timing, "what", "") != "the model's forward" else None)
            if step_ratio is not None:
                measured = costs
            unit_modes = modes if "checkpoint" in levers else ("keep",)
            if p in AUTOCAST_PRECISIONS and "selective" in unit_modes:
                unit_modes = tuple(m for m in unit_modes if m != "selective")
                if _SELECTIVE_AUTOCAST_NOTE not in notes:
                    notes.append(_SELECTIVE_AUTOCAST_NOTE)
            model = chain_model(ps, budget_bytes, names, unit_modes,
                                extra_ms=measured.extra_ms if measured else None)
            # Step time without recomputation: measured for given profiles, else scaled from the model.
            if measured is not None:  # recomputation is forward work: priced by the forward's ratio if known
                base_ms = measured.base_step_ms * (step_ratio or 1.0)
                scale = precision_timing.forward.get(p, step_ratio) if step_ratio is not None else 1.0
            elif key in profiles and ps.steady_step_ms:
                base_ms = ps.steady_step_ms
                scale = 1.0
            else:
                ratio = ps.steady_step_ms / modelled_base if modelled_base else 1.0
                measured_ratio = precision_timing.ratios.get(p) if precision_timing is not None else None
                if measured_ratio is not None and modelled_base:  # this device's precision cost, not the model's
                    unsharded = source.profile(p, "none", 1).steady_step_ms if s != "none" or o else 0.0
                    ratio = measured_ratio * (ps.steady_step_ms / unsharded if unsharded else 1.0)
                    scale = base_measured_ms * ratio / ps.steady_step_ms if ps.steady_step_ms else 1.0
                else:
                    scale = base_measured_ms / modelled_base if modelled_base else 1.0
                base_ms = base_measured_ms * ratio
            params, grads = _travelling_bytes(fp32_params, p)
            exposed = comm_ms(s, world_size, params, grads, base_ms, comm, shard_group_size)
            copies = cpu_step = 0.0
            host_peak = 0
            if o:
                resident, host_peak = _host_bytes(ps)
                stored = fp32_params // 2 if p == "bf16" else fp32_params
                copies, cpu_step = offload_ms(s, world_size, params, grads, stored, resident, base_ms, comm,
                                              shard_group_size)
            fixed_ms = base_ms + exposed + copies + cpu_step
            for sol in frontier(model.problem):
                peak = max(model.floor_bytes, sol.peak_bytes)
                frontier_points.append((peak, fixed_ms + sol.extra_ms * scale, _describe(p, s, sol.choices, o)))
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
            cand = Candidate(p, s, sol, peak, fixed_ms + sol.extra_ms * scale, base_ms, exposed, tuple(names), ps,
                             offload=o, host_copy_ms=copies, cpu_step_ms=cpu_step, host_bytes=host_peak)
            candidates.append((feasible and peak <= budget_bytes, cand, model))

    if not candidates:
        raise MemprofError("nothing to plan: no profile for the allowed configurations")
    feasible = [(c, m) for ok, c, m in candidates if ok]
    if not feasible:
        raise _infeasible(candidates, budget_bytes, levers, world_size, applicable)
    best, best_model = min(feasible, key=lambda cm: (cm[0].step_ms, cm[0].peak_bytes))
    others = [p for p in precisions if p != base_precision]
    if others:
        timed = [p for p in others if precision_timing is not None and p in precision_timing.ratios]
        if timed:
            notes.append("precision time " + precision_timing.describe())
        untimed = [p for p in others if p not in timed]
        if untimed:
            notes.append(f"precision time of {', '.join(untimed)} modelled (roofline of the estimate's device), "
                         "not measured on this device")
    baseline = _baseline(candidates, base_precision)
    return _make_plan(prof, best, best_model, baseline, budget_bytes, device, world_size, levers,
                      frontier_points, candidates, comm, notes, shard_group_size, costs)


def _describe_config(precision: str, sharding: str, offload: bool) -> str:
    return f"{precision} with {_sharding_words(sharding, offload)}"


def _describe(precision: str, sharding: str, choices, offload: bool = False) -> str:
    counted = {m: list(choices).count(m) for m in RECOMPUTE_MODES}
    ck = ", ".join(f"{n}/{len(choices)} {m}" for m, n in counted.items() if n) or "no checkpointing"
    return f"{precision}, {_sharding_words(sharding, offload)}, {ck}"


def _baseline(candidates, base_precision) -> Candidate:
    """The given configuration with nothing changed: the reference for the overhead."""
    for _, c, _model in candidates:
        if c.precision == base_precision and c.sharding == "none" and not c.offload:
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


def _infeasible(candidates, budget_bytes, levers, world_size, applicable=LEVERS) -> InfeasibleBudget:
    _, smallest, model = min(candidates, key=lambda c: c[1].peak_bytes)
    why = _dominant(smallest, model)
    hints = []
    if "sharding" not in levers and "sharding" in applicable:
        hints.append("allow sharding (FSDP over more ranks, or CPU offload)")
    elif world_size == 1 and "sharding" in applicable:
        hints.append("shard over more ranks")
    if "precision" not in levers and "precision" in applicable:
        hints.append("allow other precisions")
    if "checkpoint" not in levers and "checkpoint" in applicable:
        hints.append("allow checkpointing")
    hint = ("; " + " or ".join(hints)) if hints else "; use a smaller batch or a lighter optimizer"
    return InfeasibleBudget(
        smallest.peak_bytes, budget_bytes, message=f"no plan fits {format_bytes(budget_bytes)}: the smallest achievable peak is "
        f"{format_bytes(smallest.peak_bytes)} ({smallest.describe()}), dominated by {why}{hint}")


def _dominant(c: Candidate, model) -> str:
    """The largest category at the peak of the configuration's smallest-peak plan, in words."""
    prof = c.profile
    if model.floor_bytes >= c.solution.peak_bytes:
        step = max(prof.steps, key=lambda s: s.phase_peak_bytes.get(model.floor_phase, 0))
        where = f"the {model.floor_phase} phase ({format_bytes(step.phase_peak_bytes.get(model.floor_phase, 0))})"
    else:
        term = dominant_term(model.problem, c.solution.choices)
        where = term.describe()
    cats = {k: v for k, v in prof.peak.by_category.items() if v > 0}
    if not cats:
        return where
    big = max(cats, key=cats.get)
    return f"{where}; of it, {_CATEGORY_WORDS.get(big, big)} {format_bytes(cats[big])} (the largest category)"


_CATEGORY_WORDS = {"param": "parameters", "buffer": "buffers", "grad": "gradients", "optimizer": "optimizer state",
                   "activation": "activations", "temporary": "temporaries", "input": "inputs", "other": "other memory"}


def _make_plan(prof, best: Candidate, model, baseline: Candidate, budget_bytes, device, world_size, levers,
               frontier_points, candidates, comm, notes, shard_group_size, costs=None) -> Plan:
    choices = tuple(CheckpointChoice(u, m) for u, m in zip(best.units, best.solution.choices))
    base_ms = baseline.base_ms + baseline.comm_ms
    overhead = best.step_ms / base_ms - 1 if base_ms > 0 else 0.0
    explanation = _explain(prof, best, baseline, candidates, budget_bytes)
    # Not a lever the plan applies (the allocator is configured before the process starts): said beside it.
    explanation += [f"advice, not applied by this plan: {a.sentence()}; the plan's peaks are allocated bytes"
                    for a in allocator_advice(prof)]
    assumptions = {
        "time": ("step time measured in the profile" if not prof.estimated else prof.assumptions.get("time", "")),
        "recompute": "a full checkpoint recomputes the unit's forward; selective recomputes all but matmuls "
                     "and attention",
        "memory": "chain model fitted to the profile's per-unit levels (exact with no checkpointing)",
    }
    if world_size > 1:
        assumptions["communication"] = comm.describe()
    if any(c.offload for _, c, _m in candidates):
        assumptions["offload"] = comm.describe_offload()
    if costs is not None and prof.environment.device == "cpu":
        from .timing import cpu_allocator_note

        note = cpu_allocator_note()
        if note:
            notes = [*notes, note]
    if costs is not None:
        assumptions["time"] = (f"measured: untracked steps with every unit kept / checkpointed by each mode, "
                               f"interleaved ({costs.reps} runs each); other configurations modelled")
    for i, n in enumerate(notes):
        assumptions[f"note{i + 1}"] = n
    strategy = best.sharding
    sharding = Sharding(strategy=strategy, reshard_after_forward=strategy != "shard-grad-op",
                        offload_optimizer=best.offload,
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


def _explain_offload(best: Candidate, candidates) -> list[str]:
    """What CPU offload does for the chosen configuration, or what it would have cost when weighed."""
    offloaded = [c for _, c, _m in candidates if c.offload]
    if not offloaded:
        return []
    if not best.offload:
        fits = sorted((c for ok, c, _m in candidates if ok and c.offload), key=lambda c: c.step_ms)
        c = fits[0] if fits else min(offloaded, key=lambda c: c.peak_bytes)
        return [f"CPU offload weighed: at best {c.describe()} — device peak {format_bytes(c.peak_bytes)}, "
                f"{format_bytes(c.host_bytes)} of host memory per rank, +{c.offload_ms:.1f} ms per step "
                f"(host copies and the optimizer step on the CPU){'' if fits else '; it does not fit either'}."]
    plain = [c for _, c, _m in candidates if not c.offload and c.precision == best.precision]
    twin = next((c for c in plain if c.sharding == best.sharding), None) or next(
        (c for c in plain if c.sharding == "none"), None)
    line = (f"CPU offload (FSDP2 CPUOffloadPolicy, {best.sharding} sharding): each rank's parameter shards, "
            f"gradients and optimizer state live on the host and the optimizer steps on the CPU — device peak "
            f"{format_bytes(best.profile.peak_bytes)} before checkpointing")
    if twin is not None:
        saved = twin.profile.peak_bytes - best.profile.peak_bytes
        line += (f" vs {format_bytes(twin.profile.peak_bytes)} with {_sharding_words(twin.sharding, False)} "
                 f"({format_bytes(saved)} less per device)")
    comm = f"; {best.comm_ms:.1f} ms of communication not hidden by compute" if best.sharding != "none" and \
        best.profile.environment.world_size > 1 else ""
    return [line + f"; the host needs {format_bytes(best.host_bytes)} per rank; +{best.offload_ms:.1f} ms per step "
            f"({best.host_copy_ms:.1f} ms of host copies not hidden by compute, {best.cpu_step_ms:.1f} ms of "
            f"optimizer step on the CPU){comm}."]


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
                     f"{best.step_ms - best.base_ms - best.comm_ms - best.offload_ms:.1f} ms of forward work per "
                     "step.")
    else:
        lines.append("No checkpointing needed.")
    if best.precision != baseline.precision:
        lines.append(f"Precision {best.precision}: peak {format_bytes(best.profile.peak_bytes)} before "
                     f"checkpointing (vs {format_bytes(keep_peak)}), step {best.base_ms:.1f} ms (vs "
                     f"{baseline.base_ms:.1f} ms).")
    if best.sharding != "none" and not best.offload:
        lines.append(f"FSDP {best.sharding}: per-rank peak {format_bytes(best.profile.peak_bytes)} before "
                     f"checkpointing; {best.comm_ms:.1f} ms of communication not hidden by compute.")
    lines += _explain_offload(best, candidates)
    feasible = sorted((c for ok, c, _ in candidates if ok), key=lambda c: c.step_ms)
    lines.append(f"Chosen: {best.describe()} — predicted peak {format_bytes(best.peak_bytes)}, step "
                 f"{best.step_ms:.1f} ms: the least step time of {len(feasible)} configurations that fit.")
    if len(feasible) > 1:
        nxt = feasible[1]
        lines.append(f"Next best: {nxt.describe()} — {format_bytes(nxt.peak_bytes)}, {nxt.step_ms:.1f} ms.")
    return lines
