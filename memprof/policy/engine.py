"""The decision: checkpointing, precision, sharding and the step levers under a memory budget, for the least
step time.

For every configuration of the allowed levers — precision x sharding strategy x CPU offload x step variant
(:mod:`.variants`: loss head as written or chunked, micro-batches, optimizer step in backward, bf16 moments;
each estimated on the model run that way) (outer enumeration; offload belongs to the sharding lever and is
weighed at world size 1 too, as FSDP on one rank, but not for CPU profiles, where host memory is the
device's) — the planner takes that configuration's profile (the one given, or an estimate of the same model
from a :class:`~memprof.estimation.sources.EstimateSource`), builds the chain model of its units
(:mod:`memprof.policy.chain`) and solves checkpointing exactly with the DP (:mod:`memprof.policy.solver`).
Predicted step time = base step time x precision ratio (x the variant's ratio: measured when given, else
modelled as no less than the step as written) + recomputation + exposed communication (+ with offload: host
copies not hidden by compute and the optimizer step on the CPU; :mod:`memprof.policy.costs`). The plan is the
feasible configuration with the least predicted time (ties: the fewest step levers, then the lower peak); the
Pareto frontier (peak vs time) over all configurations comes with it, and an explanation of each lever's
effect and of the choice. An infeasible budget raises :class:`~memprof.policy.solver.InfeasibleBudget` naming
the smallest achievable peak and what dominates it. :mod:`.candidates` holds each configuration's answer,
:mod:`.plan_words` the plan's assembly and words.
"""

from __future__ import annotations

from ..errors import MemprofError
from ..hardware import resolve_capacity
from ..plans import Plan
from ..training import check_precision
from ..vocab import AUTOCAST_PRECISIONS, CHECKPOINT_MODES, LEVERS, PRECISIONS, SHARDING_STRATEGIES
from .candidates import Candidate, describe_choice, describe_config
from .chain import chain_model, find_units
from .costs import CommModel, comm_ms, offload_ms
from .loss_head import LossHeadError, chunk_tokens_for
from .microbatch import MicrobatchError
from .plan_words import baseline_candidate, infeasible_budget, make_plan
from .solver import InfeasibleBudget, frontier, min_peak, solve_dp
from .state_precision import StatePrecisionError
from .step_in_backward import StepInBackwardError
from .variants import PLAIN, StepVariant, variant_allowed, variant_source, weighed_variants

__all__ = ["plan", "InfeasibleBudget", "UnweighableLeverError", "Candidate"]


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


def _host_bytes(prof) -> tuple[int, int]:
    """(resident, peak) host bytes per rank of an offload profile: the estimator's, else (host and device being
    one, e.g. a CPU profile) its parameters, gradients and optimizer state."""
    if prof.offload_host_bytes is not None:
        return prof.offload_host_bytes
    root = prof.modules.get("")
    resident = root.param_bytes + root.grad_bytes + root.optimizer_bytes if root is not None else 0
    return resident, resident


def _config_key(key) -> tuple[str, str, bool, StepVariant]:
    """``profiles`` keys: (precision, sharding), (precision, sharding, offload) or (precision, sharding,
    offload, StepVariant)."""
    if len(key) == 2:
        return (key[0], key[1], False, PLAIN)
    return (key[0], key[1], bool(key[2]), key[3] if len(key) > 3 else PLAIN)


def _travelling_bytes(fp32_param_bytes: int, precision: str) -> tuple[int, int]:
    """Bytes of params in their compute dtype and of grads in their reduce dtype (whole model)."""
    if precision in AUTOCAST_PRECISIONS:  # MixedPrecisionPolicy: 16-bit all-gathers, fp32 reductions
        return fp32_param_bytes // 2, fp32_param_bytes
    if precision == "bf16":
        return fp32_param_bytes // 2, fp32_param_bytes // 2
    return fp32_param_bytes, fp32_param_bytes


# A step lever that does not apply to this model (no head to chunk, a batch that does not split, an
# optimizer that cannot step in backward or keep bf16 moments): that variant is not weighed, and the plan says so.
_VARIANT_ERRORS = (LossHeadError, MicrobatchError, StepInBackwardError, StatePrecisionError)


_OFFLOAD_NOTES = {
    "cpu": "activation offload not weighed: on a CPU the host's memory is the device's",
    "source": "activation offload not weighed: it is weighed on an estimate of the model with its units offloaded "
              "(source=EstimateSource(...))",
    "sharded": "activation offload weighed unsharded, without CPU offload, only",
    "priced": "activation offload: the saved tensors' copies to the host and back priced from the host link's "
              "bandwidth (modelled, PCIe), without overlap (they run on the compute stream)",
}


def offload_all(model, units):
    """``model`` with each of ``units`` (FQNs) offloaded, as ``memprof.apply`` does it (for estimates)."""
    from ..activation_offload import offloaded

    for name in units:
        mod = model.get_submodule(name)
        mod.forward = offloaded(mod.forward, model)
    return model


def _offloaded_profile(ps, source, names, precision, strategy, offload, notes):
    """The profile of configuration ``ps`` with every unit offloaded, or None (and a note saying why)."""
    why = None
    if not str(ps.environment.device).startswith("cuda"):
        why = "cpu"
    elif source is None:
        why = "source"
    elif strategy != "none" or offload:
        why = "sharded"
    if why is not None:
        if _OFFLOAD_NOTES[why] not in notes:
            notes.append(_OFFLOAD_NOTES[why])
        return None
    if _OFFLOAD_NOTES["priced"] not in notes:
        notes.append(_OFFLOAD_NOTES["priced"])
    units = tuple(names)
    return source.derived(lambda m: offload_all(m, units), "activation offload of " + ",".join(units)).profile(precision)


def plan(prof, budget, *, world_size: int = 1, levers=("checkpoint",), units: list[str] | None = None,
         source=None, precision: str | None = None, modes=CHECKPOINT_MODES, comm: CommModel | None = None,
         shard_group_size: int | None = None, profiles: dict | None = None,
         precisions: tuple[str, ...] | None = None, costs=None, precision_timing=None,
         applicable=LEVERS, loss_head_chunk_tokens: int | None = None,
         variant_ratios: dict | None = None) -> Plan:
    """The configuration with the least predicted step time whose predicted peak fits ``budget``.

    Args:
        prof: the profile to plan from (measured or estimated), of an un-checkpointed model.
        budget: bytes, a size ("24GiB") or a device name ("H100-80GB").
        world_size: ranks the plan is for; FSDP strategies are considered only when > 1, CPU offload
            (FSDP2 ``CPUOffloadPolicy``) at any world size (at 1, as FSDP over a one-rank mesh).
        levers: subset of :data:`memprof.vocab.LEVERS`; "sharding" includes CPU offload; the step levers
            ("loss-head": the head chunked by ``loss_head_chunk_tokens`` tokens, "micro-batches": 2 or 4,
            "optimizer-in-backward", "bf16-moments"; :mod:`memprof.policy.variants`) are estimated on ``source``.
        units: unit names/patterns (default: the profile's repeated blocks).
        source: an :class:`EstimateSource` for the configurations ``prof`` is not (other precisions, sharding).
        precision: the precision ``prof`` was taken in (default: its assumptions, else fp32).
        profiles: measured profiles of other configurations, keyed by (precision, sharding), (precision,
            sharding, offload) or (precision, sharding, offload, StepVariant); they win over estimates for
            both memory and time.
        precisions: the precisions the precision lever may choose from (default: all).
        costs: measured option costs for the given configuration (:func:`memprof.policy.timing.measure_costs`);
            they replace the modelled recompute times and the profile's (tracked) step time.
        precision_timing: measured step-time ratios of precisions on this device
            (:func:`memprof.policy.precision_timing.measure_precision_ratios`); they replace the modelled ratio
            of each precision they name. Without them other precisions' times are modelled, and the plan says so.
        applicable: the levers the caller can apply (a refusal suggests only those).
        loss_head_chunk_tokens: the chunk the loss-head lever weighs (default:
            :func:`~memprof.policy.loss_head.chunk_tokens_for` the profile's step).
        variant_ratios: measured whole-step time of step variants (:class:`~memprof.policy.variants.StepVariant`)
            over the step as written, on this device (a dict, or the :class:`~memprof.policy.variant_timing.
            VariantTiming` of :func:`~memprof.policy.variant_timing.measure_variant_ratios`), for the base
            precision (or the timing's) unsharded; elsewhere, and without one, a variant's time is modelled as
            no less than the step as written (nor than the variant less any one lever), and the plan says so.
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
    # measured variant ratios hold for the precision they were timed in, unsharded
    ratio_precision = getattr(variant_ratios, "precision", base_precision)
    variant_ratios = dict(variant_ratios.priced() if hasattr(variant_ratios, "priced") else variant_ratios or {})
    profiles = {_config_key(k): v for k, v in (profiles or {}).items()}
    profiles.setdefault((base_precision, base_sharding if world_size > 1 or base_offload else "none", base_offload,
                         PLAIN), prof)

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
        missing = [k for k in [(p, s, o, PLAIN) for p in precisions for s, o in configs] if k not in profiles]
        if missing and len(profiles) == 1:  # nothing but the given profile: the lever has nothing to weigh
            raise UnweighableLeverError(tuple(lv for lv in ("precision", "sharding") if lv in levers),
                                        tuple(describe_config(*k[:3]) for k in missing))
        if missing:  # weigh the measured profiles given (profiles=), and say which configurations were not
            notes.append("not weighed (no model to estimate them, no profile given): "
                         + ", ".join(describe_config(*k[:3]) for k in missing))
            precisions = sorted({p for p, _, _, _ in profiles}, key=PRECISIONS.index)
            configs = sorted({(s, o) for _, s, o, _ in profiles},
                             key=lambda c: (c[1], SHARDING_STRATEGIES.index(c[0])))
    if "sharding" in levers and prof.environment.device == "cpu" and not any(o for _, o in configs):
        notes.append("CPU offload not weighed: on a CPU the host's memory is the device's")
    if loss_head_chunk_tokens is None:
        loss_head_chunk_tokens = chunk_tokens_for(prof)
    variants, variant_notes = weighed_variants(
        levers, chunk_tokens=loss_head_chunk_tokens, custom_step=source is not None and source.step is not None,
        optimizer=source.optimizer if source is not None else prof.assumptions.get("optimizer", "adamw"))
    notes += variant_notes
    if len(variants) > 1 and source is None and not any(not k[3].plain for k in profiles):
        asked = tuple(lv for lv in levers if any(lv in v.levers for v in variants))
        raise UnweighableLeverError(asked, tuple(v.describe() for v in variants[1:]))
    sources = {v: variant_source(source, v) for v in variants} if source is not None else {}
    dropped: dict[StepVariant, str] = {}

    base_measured_ms = prof.steady_step_ms
    full_params = prof.modules[""].param_bytes if "" in prof.modules else 0  # the given profile is unsharded
    fp32_params = full_params * (2 if base_precision == "bf16" else 1)
    modelled_base = None
    if source is not None and hasattr(source, "prefetch"):  # the estimates below, made ahead (in parallel)
        wanted = [(p, s, world_size if s != "none" else 1, shard_group_size, o) for p in precisions
                  for s, o in configs if (p, s, o, PLAIN) not in profiles]
        if len(precisions) > 1 or len(configs) > 1:
            wanted.insert(0, (base_precision, "none", 1, None, False))
        source.prefetch(wanted)
    if source is not None and (len(precisions) > 1 or len(configs) > 1 or len(variants) > 1):
        modelled_base = source.profile(base_precision, "none", 1).steady_step_ms

    candidates: list[Candidate] = []
    frontier_points: list[tuple[int, float, str]] = []
    plain_time: dict[tuple, tuple] = {}  # (p, s, o) -> (base_ms, scale, modelled step ms, measured costs)
    ratios: dict[tuple, float] = {}  # (p, s, o, variant) -> its step time over the plain step's
    unit_names = units
    for p in precisions:
        for (s, o), v in [(c, v) for c in configs for v in variants]:
            if v in dropped or not variant_allowed(v, p, s, o) or (not v.plain and (p, s, o) not in plain_time):
                continue
            key = (p, s, o, v)
            ws = world_size if s != "none" else 1
            ps = profiles.get(key)
            if ps is None:
                src = sources.get(v)
                if src is None:
                    continue
                try:
                    ps = src.profile(p, s, ws, shard_group_size, offload=o)
                except MemprofError as e:
                    if v.plain or not isinstance(e, _VARIANT_ERRORS):
                        raise
                    dropped[v] = f"{', '.join(v.levers)} not weighed ({v.describe()}): {e}"  # the lever does not apply to this model
                    continue
            names = find_units(ps, unit_names) if unit_names else find_units(ps)
            measured = costs if (costs is not None and ps is prof) else None
            if not v.plain:  # a unit's recomputation costs the same whatever the step levers do
                measured = plain_time[(p, s, o)][3]
            # Costs measured in the base precision stand for another precision too when its whole-step ratio
            # was measured on this device (unsharded): the step scales by it, recomputation (forward work) by
            # the forward's ratio when that was timed too.
            step_ratio = (precision_timing.ratios.get(p) if costs is not None and measured is None and s == "none"
                          and not o and v.plain and precision_timing is not None
                          and getattr(precision_timing, "what", "") != "the model's forward" else None)
            if step_ratio is not None:
                measured = costs
            unit_modes = modes if "checkpoint" in levers else ("keep",)
            unit_modes = tuple(m for m in unit_modes if m != "offload")
            offloaded = None
            if "activation-offload" in levers and "offload" in modes:
                offloaded = _offloaded_profile(ps, sources.get(v), names, p, s, o, notes)
                if offloaded is not None:
                    unit_modes += ("offload",)
            try:
                model = chain_model(ps, budget_bytes, names, unit_modes,
                                    extra_ms=measured.extra_ms if measured else None, offloaded=offloaded,
                                    host_link_gbs=comm.host_link_gbs)
            except MemprofError as e:  # e.g. a variant whose estimate lost the units' backward
                if v.plain:
                    raise
                dropped[v] = f"{', '.join(v.levers)} not weighed ({v.describe()}): {e}"
                continue
            if not v.plain:  # the plain step's time in this configuration, times the variant's own ratio
                plain_ms, scale, plain_modelled, _ = plain_time[(p, s, o)]
                ratio = variant_ratios.get(v) if (p == ratio_precision and s == "none" and not o) else None
                if ratio is None:  # modelled: never below the step as written, nor below it less any one lever
                    own = ps.steady_step_ms / plain_modelled if plain_modelled and key not in profiles else 1.0
                    ratio = max([1.0, own] + [ratios[(p, s, o, u)] for u in v.without_each()
                                              if (p, s, o, u) in ratios])
                ratios[key] = ratio
                base_ms = plain_ms * ratio
            # Step time without recomputation: measured for given profiles, else scaled from the model.
            elif measured is not None:  # recomputation is forward work: priced by the forward's ratio if known
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
            if v.plain:  # the variants' modelled times are compared with the same model's (the estimate's)
                modelled = (source.profile(p, s, ws, shard_group_size, offload=o).steady_step_ms
                            if source is not None and len(variants) > 1 else ps.steady_step_ms)
                plain_time[(p, s, o)] = (base_ms, scale, modelled, measured)
                ratios[key] = 1.0
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
                frontier_points.append((peak, fixed_ms + sol.extra_ms * scale,
                                        describe_choice(p, s, sol.choices, o, variant=v)))
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
                             offload=o, host_copy_ms=copies, cpu_step_ms=cpu_step, host_bytes=host_peak, variant=v)
            candidates.append((feasible and peak <= budget_bytes, cand, model))

    notes += list(dropped.values())
    weighed = sorted({v for _, c, _m in candidates for v in [c.variant] if not v.plain})
    untimed = [v for v in weighed if v not in variant_ratios]
    if untimed:
        notes.append("step time of " + "; ".join(v.describe() for v in untimed) + " modelled as no less than the "
                     "step as written (the estimate's roofline; measured on this CPU: results/levers.json)")
    if any(v in variant_ratios for v in weighed):
        notes.append("step time of " + "; ".join(f"{v.describe()} x{variant_ratios[v]:.3f}" for v in weighed
                                                 if v in variant_ratios)
                     + f" measured on this device ({ratio_precision}, unsharded; elsewhere modelled)")
    if not candidates:
        raise MemprofError("nothing to plan: no profile for the allowed configurations")
    feasible = [(c, m) for ok, c, m in candidates if ok]
    if not feasible:
        raise infeasible_budget(candidates, budget_bytes, levers, world_size, applicable)
    # Ties: the fewest step levers (one priced at no cost stays off), then the lower peak.
    best, best_model = min(feasible, key=lambda cm: (cm[0].step_ms, len(cm[0].variant.levers), cm[0].peak_bytes))
    others = [p for p in precisions if p != base_precision]
    if others:
        timed = [p for p in others if precision_timing is not None and p in precision_timing.ratios]
        if timed:
            notes.append("precision time " + precision_timing.describe())
        untimed = [p for p in others if p not in timed]
        if untimed:
            notes.append(f"precision time of {', '.join(untimed)} modelled (roofline of the estimate's device), "
                         "not measured on this device")
    baseline = baseline_candidate(candidates, base_precision)
    return make_plan(prof, best, best_model, baseline, budget_bytes, device, world_size, levers,
                      frontier_points, candidates, comm, notes, shard_group_size, costs)
