"""From the planner's candidates to the :class:`~memprof.plans.Plan`: the chosen configuration's plan, its
frontier, its explanation (what each lever did, why the choice), and the words of a refusal.

Only words and the plan's assembly: every number comes from the candidates :mod:`.engine` priced.
"""

from __future__ import annotations

import datetime
import hashlib

from .._version import __version__
from ..advice import allocator_advice
from ..plans import CheckpointChoice, FrontierPoint, Plan, Sharding, Source
from ..units import format_bytes
from ..vocab import LEVERS, STEP_LEVERS
from .candidates import Candidate, sharding_words
from .solver import InfeasibleBudget, dominant_term


def profile_hash(prof) -> str:
    return "sha256:" + hashlib.sha256(prof.to_json().encode()).hexdigest()[:16]


def baseline_candidate(candidates, base_precision) -> Candidate:
    """The given configuration with nothing changed: the reference for the overhead."""
    for _, c, _model in candidates:
        if c.precision == base_precision and c.sharding == "none" and not c.offload and c.variant.plain:
            return c
    return candidates[0][1]


def pareto(points: list[tuple[int, float, str]], limit: int = 40) -> list[tuple[int, float, str]]:
    out: list[tuple[int, float, str]] = []
    for peak, ms, desc in sorted(points, key=lambda p: (p[0], p[1])):
        if not out or ms < out[-1][1] - 1e-9:
            out.append((peak, ms, desc))
    if len(out) > limit:  # keep the ends and an even spread
        step = (len(out) - 1) / (limit - 1)
        out = [out[round(i * step)] for i in range(limit)]
    return out


def infeasible_budget(candidates, budget_bytes, levers, world_size, applicable=LEVERS) -> InfeasibleBudget:
    _, smallest, model = min(candidates, key=lambda c: c[1].peak_bytes)
    why = dominant_words(smallest, model)
    hints = []
    if "sharding" not in levers and "sharding" in applicable:
        hints.append("allow sharding (FSDP over more ranks, or CPU offload)")
    elif world_size == 1 and "sharding" in applicable:
        hints.append("shard over more ranks")
    if "precision" not in levers and "precision" in applicable:
        hints.append("allow other precisions")
    if "checkpoint" not in levers and "checkpoint" in applicable:
        hints.append("allow checkpointing")
    step_levers = [lv for lv in STEP_LEVERS if lv not in levers and lv in applicable]
    if step_levers:
        hints.append(f"allow {', '.join(step_levers)}")
    hint = ("; " + " or ".join(hints)) if hints else "; use a smaller batch or a lighter optimizer"
    return InfeasibleBudget(
        smallest.peak_bytes, budget_bytes, message=f"no plan fits {format_bytes(budget_bytes)}: the smallest achievable peak is "
        f"{format_bytes(smallest.peak_bytes)} ({smallest.describe()}), dominated by {why}{hint}")


def dominant_words(c: Candidate, model) -> str:
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
    return f"{where}; of it, {CATEGORY_WORDS.get(big, big)} {format_bytes(cats[big])} (the largest category)"


CATEGORY_WORDS = {"param": "parameters", "buffer": "buffers", "grad": "gradients", "optimizer": "optimizer state",
                   "activation": "activations", "temporary": "temporaries", "input": "inputs", "other": "other memory"}


def make_plan(prof, best: Candidate, model, baseline: Candidate, budget_bytes, device, world_size, levers,
               frontier_points, candidates, comm, notes, shard_group_size, costs=None) -> Plan:
    choices = tuple(CheckpointChoice(u, m) for u, m in zip(best.units, best.solution.choices))
    base_ms = baseline.base_ms + baseline.comm_ms
    overhead = best.step_ms / base_ms - 1 if base_ms > 0 else 0.0
    explanation = explain(prof, best, baseline, candidates, budget_bytes)
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
        sharding=sharding, checkpoint=choices, loss_head_chunk_tokens=best.variant.loss_head_chunk_tokens,
        micro_batches=best.variant.micro_batches, optimizer_in_backward=best.variant.optimizer_in_backward,
        bf16_moments=best.variant.bf16_moments,
        source=Source(profile_hash=profile_hash(prof), model=prof.assumptions.get("model", ""),
                      estimated=prof.estimated),
        assumptions=assumptions, explanation=tuple(explanation),
        frontier=tuple(FrontierPoint(pk, ms, d) for pk, ms, d in pareto(frontier_points)),
    )


def explain_offload(best: Candidate, candidates) -> list[str]:
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
        line += (f" vs {format_bytes(twin.profile.peak_bytes)} with {sharding_words(twin.sharding, False)} "
                 f"({format_bytes(saved)} less per device)")
    comm = f"; {best.comm_ms:.1f} ms of communication not hidden by compute" if best.sharding != "none" and \
        best.profile.environment.world_size > 1 else ""
    return [line + f"; the host needs {format_bytes(best.host_bytes)} per rank; +{best.offload_ms:.1f} ms per step "
            f"({best.host_copy_ms:.1f} ms of host copies not hidden by compute, {best.cpu_step_ms:.1f} ms of "
            f"optimizer step on the CPU){comm}."]


_LEVER_WORDS = {
    "loss-head": lambda v: (f"Loss head chunked by {v.loss_head_chunk_tokens} tokens: the full logits and their "
                            "gradient never exist at once"),
    "micro-batches": lambda v: (f"{v.micro_batches} micro-batches: each batch runs as {v.micro_batches} slices with "
                                "the gradients accumulated, one slice's activations at a time"),
    "optimizer-in-backward": lambda v: ("Optimizer step in backward: each parameter is stepped as its gradient "
                                        "completes and the gradient freed"),
    "bf16-moments": lambda v: "bf16 optimizer moments: Adam's two moments in bf16, half their bytes",
}


def explain_variant(best: Candidate, candidates) -> list[str]:
    """Each step lever of the chosen configuration: the bytes it saves and the time it adds, against the same
    configuration without it (checkpointing solved again there), and how to run it where it is the loop's."""
    lines = []
    same = {c.variant: c for _, c, _m in candidates if c.precision == best.precision and c.sharding == best.sharding
            and c.offload == best.offload}
    for lever in best.variant.levers:
        line = _LEVER_WORDS[lever](best.variant)
        other = same.get(best.variant.without(lever))
        if other is not None:
            line += (f"; peak {format_bytes(best.profile.peak_bytes)} before checkpointing vs "
                     f"{format_bytes(other.profile.peak_bytes)} without it "
                     f"({format_bytes(other.profile.peak_bytes - best.profile.peak_bytes)} saved), step "
                     f"{best.base_ms - other.base_ms:+.1f} ms")
        lines.append(line + ".")
    if best.variant.micro_batches > 1:
        k = best.variant.micro_batches
        lines.append(f"Micro-batches are the training loop's to run: memprof.apply returns the step that runs them "
                     f"(handle.step, memprof.policy.microbatch.microbatched({k})); a script with its own loop sets its "
                     f"accumulation instead (HF Trainer: per_device_train_batch_size / {k} with "
                     f"gradient_accumulation_steps x {k}; nanoGPT: batch_size / {k}, gradient_accumulation_steps x {k}).")
    if best.variant.optimizer_in_backward:
        lines.append("The optimizer step in backward needs the optimizer (memprof.apply(model, plan, optimizer=opt)) "
                     "and excludes gradient accumulation, gradient clipping and a GradScaler in the loop.")
    return lines


def explain(prof, best: Candidate, baseline: Candidate, candidates, budget_bytes) -> list[str]:
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
    n_off = modes.count("offload")
    if n_off:
        lines.append(f"Activation offload of {n_off} unit{'s' if n_off != 1 else ''}: their saved tensors kept in "
                     "host memory from forward to backward, copied over the host link (priced from PCIe "
                     "bandwidth, modelled, without overlap).")
    if best.precision != baseline.precision:
        lines.append(f"Precision {best.precision}: peak {format_bytes(best.profile.peak_bytes)} before "
                     f"checkpointing (vs {format_bytes(keep_peak)}), step {best.base_ms:.1f} ms (vs "
                     f"{baseline.base_ms:.1f} ms).")
    if best.sharding != "none" and not best.offload:
        lines.append(f"FSDP {best.sharding}: per-rank peak {format_bytes(best.profile.peak_bytes)} before "
                     f"checkpointing; {best.comm_ms:.1f} ms of communication not hidden by compute.")
    lines += explain_variant(best, candidates)
    lines += explain_offload(best, candidates)
    feasible = sorted((c for ok, c, _ in candidates if ok), key=lambda c: c.step_ms)
    lines.append(f"Chosen: {best.describe()} — predicted peak {format_bytes(best.peak_bytes)}, step "
                 f"{best.step_ms:.1f} ms: the least step time of {len(feasible)} configurations that fit.")
    if len(feasible) > 1:
        nxt = feasible[1]
        lines.append(f"Next best: {nxt.describe()} — {format_bytes(nxt.peak_bytes)}, {nxt.step_ms:.1f} ms.")
    return lines
