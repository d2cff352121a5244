"""The decision: checkpointing, precision, sharding and loss-head chunking under a memory budget, for the least
step time.

For every configuration of the allowed levers — precision x sharding strategy x CPU offload x loss head as
written or chunked (the chunked one estimated on the model with :func:`memprof.policy.loss_head.chunk_loss_head`
applied; its time priced no lower than the head as written, and on a tie it stays off) (outer
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
:mod:`.candidates` holds each configuration's answer, :mod:`.plan_words` the plan's assembly and words.
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
from .loss_head import DEFAULT_CHUNK_TOKENS, LossHeadError, chunk_loss_head
from .plan_words import baseline_candidate, infeasible_budget, make_plan
from .solver import InfeasibleBudget, frontier, min_peak, solve_dp

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


def _travelling_bytes(fp32_param_bytes: int, precision: str) -> tuple[int, int]:
    """Bytes of params in their compute dtype and of grads in their reduce dtype (whole model)."""
    if precision in AUTOCAST_PRECISIONS:  # MixedPrecisionPolicy: 16-bit all-gathers, fp32 reductions
        return fp32_param_bytes // 2, fp32_param_bytes
    if precision == "bf16":
        return fp32_param_bytes // 2, fp32_param_bytes // 2
    return fp32_param_bytes, fp32_param_bytes


def _chunked(chunk_tokens: int):
    """The loss-head lever as a model transform, for estimating the model with it applied."""
    def transform(model):
        chunk_loss_head(model, chunk_tokens=chunk_tokens)
        return model
    return transform


def plan(prof, budget, *, world_size: int = 1, levers=("checkpoint",), units: list[str] | None = None,
         source=None, precision: str | None = None, modes=CHECKPOINT_MODES, comm: CommModel | None = None,
         shard_group_size: int | None = None, profiles: dict | None = None,
         precisions: tuple[str, ...] | None = None, costs=None, precision_timing=None,
         applicable=LEVERS, loss_head_chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Plan:
    """The configuration with the least predicted step time whose predicted peak fits ``budget``.

    Args:
        prof: the profile to plan from (measured or estimated), of an un-checkpointed model.
        budget: bytes, a size ("24GiB") or a device name ("H100-80GB").
        world_size: ranks the plan is for; FSDP strategies are considered only when > 1, CPU offload
            (FSDP2 ``CPUOffloadPolicy``) at any world size (at 1, as FSDP over a one-rank mesh).
        levers: subset of ("checkpoint", "precision", "sharding", "loss-head"); "sharding" includes CPU
            offload; "loss-head" weighs the model's loss head chunked by ``loss_head_chunk_tokens`` tokens
            (:func:`memprof.policy.loss_head.chunk_loss_head`), estimated on ``source``.
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
        loss_head_chunk_tokens: the chunk the loss-head lever weighs.
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
                                        tuple(describe_config(*k) for k in missing))
        if missing:  # weigh the measured profiles given (profiles=), and say which configurations were not
            notes.append("not weighed (no model to estimate them, no profile given): "
                         + ", ".join(describe_config(*k) for k in missing))
            precisions = sorted({p for p, _, _ in profiles}, key=PRECISIONS.index)
            configs = sorted({(s, o) for _, s, o in profiles},
                             key=lambda c: (c[1], SHARDING_STRATEGIES.index(c[0])))
    if "sharding" in levers and prof.environment.device == "cpu" and not any(o for _, o in configs):
        notes.append("CPU offload not weighed: on a CPU the host's memory is the device's")
    heads = [0]  # loss-head chunk tokens: 0 = the head as the model computes it
    head_source = None
    if "loss-head" in levers:
        if source is None:
            raise UnweighableLeverError(("loss-head",), (f"the loss head chunked by {loss_head_chunk_tokens} tokens",))
        heads.append(loss_head_chunk_tokens)
        head_source = source.derived(_chunked(loss_head_chunk_tokens),
                                     f"loss head chunked by {loss_head_chunk_tokens} tokens")

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
    if source is not None and (len(precisions) > 1 or len(configs) > 1 or len(heads) > 1):
        modelled_base = source.profile(base_precision, "none", 1).steady_step_ms

    candidates: list[Candidate] = []
    frontier_points: list[tuple[int, float, str]] = []
    unit_names = units
    for p in precisions:
        for (s, o), h in [(c, h) for c in configs for h in heads]:
            key = (p, s, o)
            src = head_source if h else source
            ps = None if h else profiles.get(key)
            if ps is None:
                if src is None or (h and h not in heads):
                    continue
                try:
                    ps = src.profile(p, s, world_size if s != "none" else 1, shard_group_size, offload=o)
                except LossHeadError as e:  # no head to chunk: the lever does not apply to this model
                    notes.append(f"loss-head chunking not weighed: {e}")
                    heads.remove(h)
                    continue
            names = find_units(ps, unit_names) if unit_names else find_units(ps)
            measured = costs if (costs is not None and ps is prof) else None
            # Costs measured in the base precision stand for another precision too when its whole-step ratio
            # was measured on this device (unsharded): the step scales by it, recomputation (forward work) by
            # the forward's ratio when that was timed too.
            step_ratio = (precision_timing.ratios.get(p) if costs is not None and measured is None and s == "none"
                          and not o and not h and precision_timing is not None
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
            elif not h and key in profiles and ps.steady_step_ms:
                base_ms = ps.steady_step_ms
                scale = 1.0
            else:
                step_ms = ps.steady_step_ms
                if h:  # chunking adds a loop over chunks: never priced below the head as written
                    step_ms = max(step_ms, source.profile(p, s, world_size if s != "none" else 1, shard_group_size,
                                                          offload=o).steady_step_ms)
                ratio = step_ms / modelled_base if modelled_base else 1.0
                measured_ratio = precision_timing.ratios.get(p) if precision_timing is not None else None
                if measured_ratio is not None and modelled_base:  # this device's precision cost, not the model's
                    unsharded = src.profile(p, "none", 1).steady_step_ms if s != "none" or o else 0.0
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
                frontier_points.append((peak, fixed_ms + sol.extra_ms * scale,
                                        describe_choice(p, s, sol.choices, o, loss_head=h)))
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
                             offload=o, host_copy_ms=copies, cpu_step_ms=cpu_step, host_bytes=host_peak,
                             loss_head_chunk_tokens=h)
            candidates.append((feasible and peak <= budget_bytes, cand, model))

    if len(heads) > 1:
        notes.append("loss-head chunking's step time modelled as no less than the head's as written (the "
                     "roofline sees less memory traffic; on a CPU it measured 4-17% slower, results/levers.json)")
    if not candidates:
        raise MemprofError("nothing to plan: no profile for the allowed configurations")
    feasible = [(c, m) for ok, c, m in candidates if ok]
    if not feasible:
        raise infeasible_budget(candidates, budget_bytes, levers, world_size, applicable)
    # Ties: a lever not needed stays off (chunking is priced at no cost), then the lower peak.
    best, best_model = min(feasible, key=lambda cm: (cm[0].step_ms, cm[0].loss_head_chunk_tokens > 0, cm[0].peak_bytes))
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


