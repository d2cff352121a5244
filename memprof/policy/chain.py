"""From a profile to the checkpointing problem on a chain of units: what each option keeps, costs and needs.

For each unit (a repeated block, see :func:`find_units`) the profile gives its activation bytes ``a`` (made
in forward, alive when backward starts), its output bytes ``o``, its forward/backward peaks above entry, its
forward time, and three absolute levels measured with every unit kept: at its forward entry ``fe``, at its
backward entry ``be``, and the highest level between the end of its forward and the start of its backward.
With ``S_i`` the activations of the units before unit i:

    base during unit i's backward      b_i  = be_i - S_i - a_i      (params, grads so far, state, ...)
    base during unit i's forward       bf_i = fe_i - S_i
    base at the end of forward         F    = gap peak of the last unit - sum of all a

and each option of unit i (see :mod:`memprof.policy.solver` for how they combine into the peak):

    keep       retains a_i; during its backward a_i + backward peak
    full       retains o_i (its output, kept for the next unit anyway); recomputes its forward inside its
               backward, so during it max(a_i + backward peak, o_i + forward peak); costs its forward time
               up to the last tensor backward keeps (``recompute_fraction``: checkpointing stops there)
    selective  retains every output of matmul/attention ops (SAC keeps them all, needed or not) and o_i;
               recomputes the rest (during its backward a_i + backward peak + the matmul outputs backward
               would not have kept), costing the time of the ops it recomputes

    offload    (CUDA; weighed from a second profile, of the model with every unit offloaded,
               :mod:`memprof.activation_offload`) retains on the device what that profile's unit
               keeps (its output: the unit's inputs are never copied, so this does not depend on the
               neighbours' choices); during its backward that plus its backward peak there (the copies
               brought back); costs its saved bytes moved both ways over the host link (``host_link_gbs``,
               modelled from PCIe bandwidth, no overlap with compute: the copies run on the compute stream)

(A checkpointed unit needs as much during its own backward as a kept one: what it saves is the memory the
*other* units' backward positions would otherwise carry.)

Every unit's forward also bounds the peak: bf_i + (retained of units before) + forward peak. Memory outside
the chain's reach (the optimizer step, data loading) is a constant floor. Fitted to one profile, the model
reproduces that profile's peak exactly when every unit is kept (tested); other choices are predictions,
which ``memprof.apply`` verifies by measuring again.

Known limits: units must run forward in order and backward in reverse (a chain); a profile measured with
checkpointing already applied cannot be planned from (its activations are not the model's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MemprofError
from ..vocab import CHECKPOINT_MODES
from .costs import HOST_LINK_GBS
from .selective import SAVE_OP_NAMES
from .solver import ChainProblem, Option, Unit, peak_of

__all__ = ["UnitStats", "ChainModel", "find_units", "unit_stats", "chain_model", "offload_copied_bytes"]

@dataclass(frozen=True)
class UnitStats:
    """What the chain model reads about one unit from a profile."""

    name: str
    structure: str
    activation_bytes: int
    output_bytes: int
    saved_by_matmuls_bytes: int  # outputs of the ops selective checkpointing keeps, plus the unit's output
    kept_by_matmuls_bytes: int  # of those outputs, what backward keeps anyway (no checkpointing)
    forward_peak_bytes: int
    backward_peak_bytes: int
    forward_entry_bytes: int
    backward_entry_bytes: int
    gap_peak_bytes: int
    forward_ms: float  # what a full checkpoint recomputes: its forward up to the last tensor backward keeps
    recompute_selective_ms: float  # forward time of the ops selective checkpointing recomputes


@dataclass(frozen=True)
class ChainModel:
    """The solver's problem plus what it cannot see: the floor set by memory outside the chain."""

    problem: ChainProblem
    units: tuple[UnitStats, ...]
    floor_bytes: int  # peak of the optimizer step and other phases, whatever the choices
    floor_phase: str

    def peak(self, choices) -> int:

        return max(self.floor_bytes, peak_of(self.problem, choices))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find_units(prof, patterns: list[str] | None = None) -> list[str]:
    """Repeated blocks: siblings with the same structure (at least two), in forward order; or named ones."""
    import fnmatch

    mods = prof.modules
    if patterns:
        chosen = [n for n, m in mods.items() if n and any(m.type == p or fnmatch.fnmatchcase(n, p) for p in patterns)]
        chosen = [u for u in chosen if not any(u.startswith(v + ".") for v in chosen if v != u)]
        if not chosen:
            raise MemprofError(f"no module of the profile matches the unit patterns {patterns}")
    else:
        groups: dict[tuple, list[str]] = {}
        for name, m in mods.items():
            if name and m.structure and m.activation_bytes > 0:
                groups.setdefault((m.parent, m.structure), []).append(name)
        chosen = [n for names in groups.values() if len(names) >= 2 for n in names]
        chosen = [u for u in chosen if not any(u.startswith(v + ".") for v in chosen if v != u)]
    return sorted(chosen, key=lambda n: (mods[n].forward_entry_bytes, _natural(n)))


def unit_stats(prof, units: list[str]) -> list[UnitStats]:
    """Per-unit numbers; forward times are averaged over structurally identical units (less noise)."""
    times: dict[str, list[tuple[float, float]]] = {}
    out = []
    for name in units:
        m = prof.modules.get(name)
        if m is None:
            raise MemprofError(f"the profile has no module {name!r}")
        if not m.backward_entry_bytes:
            raise MemprofError(f"unit {name!r} has no backward in the profile: plan from a training step")
        # Selective checkpointing stores every output of the ops it must save (not only what backward needs).
        saved = sum(b for op, b in m.forward_op_bytes.items() if op in SAVE_OP_NAMES)
        kept = sum(b for op, b in m.activation_by_op.items() if op in SAVE_OP_NAMES)
        recompute_ms = sum(ms for op, ms in m.forward_op_ms.items() if op not in SAVE_OP_NAMES)
        out.append(UnitStats(
            name=name, structure=m.structure, activation_bytes=m.activation_bytes, output_bytes=m.output_bytes,
            saved_by_matmuls_bytes=saved + m.output_bytes, kept_by_matmuls_bytes=kept,
            forward_peak_bytes=m.forward_peak_bytes,
            backward_peak_bytes=m.backward_peak_bytes, forward_entry_bytes=m.forward_entry_bytes,
            backward_entry_bytes=m.backward_entry_bytes, gap_peak_bytes=m.gap_peak_bytes,
            forward_ms=m.forward_ms * m.recompute_fraction,
            recompute_selective_ms=min(recompute_ms, m.forward_ms) * m.recompute_fraction,
        ))
        times.setdefault(m.structure, []).append((out[-1].forward_ms, out[-1].recompute_selective_ms))
    from dataclasses import replace

    def mean(xs):
        return sum(xs) / len(xs)

    return [replace(u, forward_ms=mean([t[0] for t in times[u.structure]]),
                    recompute_selective_ms=mean([t[1] for t in times[u.structure]])) for u in out]


def _floor(prof) -> tuple[int, str]:
    best, phase = 0, "optimizer"
    for s in prof.steps:
        for p in ("optimizer", "other"):
            v = s.phase_peak_bytes.get(p, 0)
            if v > best:
                best, phase = v, p
    return best, phase


def offload_copied_bytes(offloaded) -> int:
    """Bytes an offloaded profile's step copies to the host (and back), per step: the estimator's count."""
    total = int(offloaded.assumptions.get("activation_host_copied_bytes", 0))
    steps = max(1, len(offloaded.steps))
    return total // steps


def chain_model(prof, budget_bytes: int, units: list[str] | None = None, modes=CHECKPOINT_MODES,
                extra_ms: dict | None = None, offloaded=None, host_link_gbs: float = HOST_LINK_GBS) -> ChainModel:
    """The chain problem of a profile's units under ``budget_bytes``; ``extra_ms`` (mode -> unit -> ms, from
    :func:`memprof.policy.timing.measure_costs`) replaces the modelled cost of options it names.
    ``offloaded``: the profile of the same step with every unit offloaded (an estimate of a CUDA device);
    without it, "offload" is not an option."""
    for mode in modes:
        if mode not in CHECKPOINT_MODES:
            raise MemprofError(f"unknown checkpoint mode {mode!r}; choose from {', '.join(CHECKPOINT_MODES)}")
    names = units if units is not None else find_units(prof)
    if not names:
        raise MemprofError("no repeated units found in the profile to checkpoint; name them (units=[...])")
    stats = unit_stats(prof, names)
    if offloaded is not None and "offload" in modes:
        missing = [n for n in names if n not in offloaded.modules or not offloaded.modules[n].backward_entry_bytes]
        if missing:
            raise MemprofError(f"the offloaded profile lacks units {missing[:4]}: estimate it with the same units")
        # the step's copies split over the units by their activations (equal units: equal shares)
        copied = offload_copied_bytes(offloaded)
        total_a = sum(u.activation_bytes for u in stats) or 1
    prefix = 0
    chain = []
    for u in stats:
        a, o = u.activation_bytes, u.output_bytes
        b = u.backward_entry_bytes - prefix - a
        forward_term = (u.forward_entry_bytes - prefix + u.forward_peak_bytes) - b  # same shape as a local term
        own = a + u.backward_peak_bytes  # its activations (kept or recomputed) plus its backward's working set
        options = []
        if "keep" in modes:
            options.append(Option("keep", a, max(own, forward_term), 0.0))
        if "full" in modes:  # recomputation runs its whole forward again on top of the kept output
            options.append(Option("full", o, max(own, o + u.forward_peak_bytes, forward_term), u.forward_ms))
        if "selective" in modes and u.saved_by_matmuls_bytes < a:
            s = u.saved_by_matmuls_bytes
            # It keeps matmul outputs backward does not need (kept ones: keep_saved); during its own backward
            # they can still be live beside the recomputed activations: counted, so the bound is safe.
            unneeded = max(0, s - o - u.kept_by_matmuls_bytes)
            options.append(Option("selective", s, max(own + unneeded, u.forward_peak_bytes, forward_term),
                                  u.recompute_selective_ms))
        if "offload" in modes and offloaded is not None:
            m = offloaded.modules[u.name]
            r = m.activation_bytes
            moved = copied * a // total_a
            options.append(Option("offload", r, max(r + m.backward_peak_bytes, forward_term),
                                  2 * moved / (host_link_gbs * 1e9) * 1e3))
        if extra_ms:
            options = [Option(o.name, o.retained_bytes, o.local_bytes, extra_ms.get(o.name, {}).get(u.name, o.extra_ms))
                       for o in options]
        options = tuple(options)
        # The solver shares work between units with equal structure strings, which must have equal options.
        chain.append(Unit(u.name, options, max(0, b), structure=f"{u.structure}/{hash(options)}"))
        prefix += a
    forward_base = max(0, stats[-1].gap_peak_bytes - prefix)
    floor, phase = _floor(prof)
    problem = ChainProblem(tuple(chain), forward_base, budget_bytes)
    return ChainModel(problem, tuple(stats), floor, phase)
