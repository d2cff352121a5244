"""Estimates from structure: a model's repeated blocks are run a few times and counted for the rest.

A transformer's blocks are identical, so every quantity of a training step is affine in how many there
are: the live bytes at any point are a fixed part plus, for each block, what that block holds at that
moment (its parameters, optimizer state, activations or gradients, by where the step is relative to it).
:func:`estimate` builds the model once under fake tensors, finds the largest ``ModuleList`` whose children
repeat with a short period (one kind of block, or ``p`` kinds alternating; :mod:`.blocks`), runs the estimator on the model cut to 3 and to 4 units of ``p``
blocks (the first unit, one or two middle units, the last unit), and builds the full model's profile from
the two:

* a quantity at a fixed place (outside the blocks, or in the first or last unit) is ``q3 + (U - 3)(q4 - q3)``
  for ``U`` units;
* a quantity in middle unit ``u`` is affine in ``u`` and ``U``, fitted exactly by the 3-unit run's middle
  unit and the 4-unit run's two.

Maxima are not affine (which point is highest can change with depth), so they are taken over the timeline:
every segment between two module boundaries is a sample, the full run's samples are the short runs' with
the middle units' samples repeated and their values counted as above, and the peak, each step's peak and
each phase's peak are the highest of those samples, with their categories, phase and module. Module
statistics (bytes, levels, times) are counted as above by module; a module's own forward/backward peak is
relative to its entry, so a block's is that of its source block.

Op times measured on the host (``forward_op_ms``, ``recompute_fraction``) are noisy, so they are never
extrapolated from differences: a block has its source block's, and a module holding the blocks adds a middle
unit's for each further unit.

Known limits: the peak's list of live tensors is the 4-unit run's at the same point (a deeper model has more
blocks' tensors live there); modelled times equal a full run's up to float rounding; with CPU offload the
host's peak is counted like the other totals (exact while its highest point stays at the same place, e.g.
the largest parameter's optimizer step); where the short runs do not line up (a different sequence of module
boundaries, devices other than the accelerator and the offload host, a timeline long enough to be
downsampled), every layer is run instead and the profile says so. ``blocks="all"`` always runs every layer.
"""

from __future__ import annotations

import dataclasses
import re
import time

import torch.nn as nn

from ..categories import CATEGORIES
from ..profiles import PeakInfo, Sample, StepStats
from ..tracking.profile_builder import module_sort_key
from ..tracking.replay import downsample
from . import core
from .blocks import MIN_UNITS, catalog_layers, full_structure, probe, repeated_blocks, with_layers

__all__ = ["estimate", "MIN_UNITS_AUTO"]

MIN_UNITS_AUTO = 12  # with fewer units the two short runs (7 units) save too little to be worth it
_SHORT = (3, 4)  # units in the two short runs
_MAX_SAMPLES = 2000  # the tracker's timeline bound: short runs must stay under it (nothing downsampled)


class _Mismatch(Exception):
    """The short runs do not line up; the caller runs every layer."""


def estimate(build_model, make_batch, *, blocks: str = "auto", **kwargs):
    """:func:`memprof.estimation.core.estimate`, counting repeated blocks instead of running each one.

    ``blocks``: ``"auto"`` (count them when the model has at least :data:`MIN_UNITS_AUTO` units of
    repeated blocks), ``"repeated"`` (whenever it has at least 5 units) or ``"all"`` (run every layer).
    The profile is the one running every layer gives (see the module's docstring for what that covers).
    """
    if blocks not in ("auto", "repeated", "all"):
        raise core.EstimateError(f"blocks must be 'auto', 'repeated' or 'all', got {blocks!r}")
    if blocks == "all":
        return core.estimate(build_model, make_batch, **kwargs)
    t0 = time.perf_counter()
    rep = probe(build_model)
    if rep is None or rep[1] // rep[2] < (MIN_UNITS_AUTO if blocks == "auto" else MIN_UNITS):
        return core.estimate(build_model, make_batch, **kwargs)
    fqn, n, p = rep
    found: dict = {}
    layers = catalog_layers(build_model) if p == 1 else None

    def cut(units: int):
        if layers is not None:  # a catalog architecture: its config builds the short model directly
            def build_short():
                model = with_layers(build_model, units)()
                if isinstance(model, nn.Module) and len(model.get_submodule(fqn)) == units:
                    found["cut"] = model
                else:
                    found["changed"] = True
                return model
            return build_short

        def build():
            model = build_model()
            if isinstance(model, nn.Module) and repeated_blocks(model) == rep:
                found["cut"] = model  # the last one cut: its structure (as tracked) gives the full model's
                del model.get_submodule(fqn)[units * p:]
            else:
                found["changed"] = True
            return model
        return build

    try:
        first = core.estimate(cut(_SHORT[0]), make_batch, **kwargs)
        second = core.estimate(cut(_SHORT[1]), make_batch, **kwargs)
        if found.get("changed"):
            raise _Mismatch("build_model returned a model of another structure")
        prof = _combine(first, second, fqn, n // p, p, full_structure(found.pop("cut"), fqn, n, p))
    except (core.EstimateError, _Mismatch) as e:  # the full model says what is wrong, if anything is
        full = core.estimate(build_model, make_batch, **kwargs)
        return dataclasses.replace(full, notes=full.notes + (f"every layer run: repeated blocks not counted ({e})",))
    seconds = time.perf_counter() - t0
    return dataclasses.replace(prof, assumptions={
        **prof.assumptions, "estimate_seconds": f"{seconds:.2f}",
        "blocks": (f"{n} repeated blocks in {fqn} ({p} kind{'s' if p > 1 else ''}, period {p}): the step run with "
                   f"{_SHORT[0] * p} and {_SHORT[1] * p} of them, the rest counted (memory is affine in the number "
                   "of blocks; maxima taken over the counted timeline)")})


# -- combining the two short runs ------------------------------------------------------------------------
class _Depth:
    """Where a name or sample of a short run sits: its block (or None) and that block's unit."""

    def __init__(self, prefix: str, units: int, period: int) -> None:
        self.prefix = prefix + "."
        self.units = units
        self.p = period

    def split(self, name: str):
        """(block index, rest of the name) for a module inside a block, else (None, name)."""
        if not name.startswith(self.prefix):
            return None, name
        head, _, rest = name[len(self.prefix):].partition(".")
        return (int(head), rest) if head.isdigit() else (None, name)

    def name(self, block: int, rest: str) -> str:
        return f"{self.prefix}{block}" + (f".{rest}" if rest else "")


def _lin(a, b, k):
    """a + k (b - a): ints stay ints."""
    return a + k * (b - a)


def _fit(values: tuple, k: int, u: int | None):
    """The value for ``U = 3 + k`` units: ``values`` = (q3, q4) at a fixed place, or (mid3, mid4_1, mid4_2)
    in middle unit ``u``."""
    if u is None:
        return _lin(values[0], values[1], k)
    m3, m41, m42 = values
    return m3 + (u - 1) * (m42 - m41) + k * (m41 - m3)


def _fit_vec(vals: list, k: int, u):
    return tuple(_fit(tuple(v[i] for v in vals), k, u) for i in range(len(vals[0])))


def _fit_dict(dicts: list, k: int, u):
    keys = []
    for d in dicts:
        keys.extend(x for x in d if x not in keys)
    return {key: _fit(tuple(d.get(key, 0) for d in dicts), k, u) for key in keys}


def _sources(units_full: int, block: int, p: int):
    """The short runs' blocks that stand for block ``block`` of the full model, and its middle unit (or None):
    ((3-unit block,), (4-unit block,)) for the first and last unit, (mid3, mid4_1, mid4_2) for a middle one."""
    u, r = divmod(block, p)
    if u == 0:
        return (r, r), None
    if u == units_full - 1:
        return ((_SHORT[0] - 1) * p + r, (_SHORT[1] - 1) * p + r), None
    return (p + r, p + r, 2 * p + r), u


def _groups(timeline, depth: _Depth) -> list:
    """A short run's samples as a list of stretches (same step and phase): (key, [(block or None, [samples])])
    where a block's group is the samples inside it and those after it until the next block."""
    stretches: list = []
    for s in timeline:
        key = (s.step, s.phase)
        if not stretches or stretches[-1][0] != key:
            stretches.append((key, [(None, [])]))
        groups = stretches[-1][1]
        b, rest = depth.split(s.module)
        if b is not None and groups[-1][0] != b:
            if any(g[0] == b for g in groups):
                raise _Mismatch(f"block {b} entered twice in one phase")
            groups.append((b, []))
        groups[-1][1].append((s, rest if b is not None else None))
    return stretches


def _tags(samples) -> tuple:
    return tuple((s.phase, rest if rest is not None else s.module) for s, rest in samples)


def _combine(short3, short4, prefix: str, units: int, p: int, structure: dict):
    """The full model's profile from the 3- and 4-unit runs (see the module's docstring)."""

    k = units - _SHORT[0]
    d3, d4 = _Depth(prefix, _SHORT[0], p), _Depth(prefix, _SHORT[1], p)
    full = _Depth(prefix, units, p)
    host = "host_peak_bytes" in short4.assumptions  # CPU offload: the host's bytes are counted apart
    for prof in (short3, short4):
        if (len(prof.timeline) >= _MAX_SAMPLES // 2 or len(prof.devices) != 1 + host or len(prof.peak.by_device) > 1
                or (host and prof.devices[1].device != "cpu")):
            raise _Mismatch("a short run's timeline is downsampled or it uses more than one device")
    g3, g4 = _groups(short3.timeline, d3), _groups(short4.timeline, d4)
    if [key for key, _ in g3] != [key for key, _ in g4]:
        raise _Mismatch("the short runs' phases differ")

    # The full timeline: each stretch's blocks in the order the short run went through them.
    samples = []
    for (key, a), (_, b) in zip(g3, g4):
        ga, gb = dict(a), dict(b)
        order_a = [blk for blk, _ in a if blk is not None]
        order_b = [blk for blk, _ in b if blk is not None]
        if not order_b:
            blocks_full = []
        elif order_b == list(range(_SHORT[1] * p)):
            blocks_full = list(range(units * p))
        elif order_b == list(range(_SHORT[1] * p))[::-1]:
            blocks_full = list(range(units * p))[::-1]
        else:
            raise _Mismatch(f"blocks run out of order in {key}")
        if len(order_a) != len(order_b) * _SHORT[0] // _SHORT[1] or (order_a and sorted(order_a) != list(
                range(_SHORT[0] * p))):
            raise _Mismatch(f"the short runs' blocks differ in {key}")
        parts = [(None, ((ga[None],), (gb[None],)), None)]
        for blk in blocks_full:
            src, u = _sources(units, blk, p)
            if u is None:
                parts.append((blk, ((ga[src[0]],), (gb[src[1]],)), None))
            else:
                parts.append((blk, ((ga[src[0]],), (gb[src[1]],), (gb[src[2]],)), u))
        for blk, srcs, u in parts:
            lists = [s[0] for s in srcs]
            tags = {_tags(x) for x in lists}
            if len(tags) != 1:
                raise _Mismatch(f"the samples of block {blk} differ between the short runs in {key}")
            for i in range(len(lists[0])):
                row = [x[i] for x in lists]
                s0, rest = row[0]
                vals = [(s.index, s.time_ms, s.total_bytes) + tuple(s.by_category) for s, _ in row]
                fit = _fit_vec(vals, k, u)
                module = full.name(blk, rest) if rest is not None else s0.module
                samples.append((fit[0], fit[1], s0.step, s0.phase, module, fit[2], fit[3:]))

    peak_i = max(range(len(samples)), key=lambda i: (samples[i][5], -i))
    pk = samples[peak_i]
    steps = _steps(short3, short4, samples, k, StepStats)
    modules = _maxima(_modules(short3, short4, d3, d4, full, k, structure), samples)
    keep = {peak_i}
    changes = {i for i in range(1, len(samples)) if samples[i][3] != samples[i - 1][3]}
    if len(changes) < _MAX_SAMPLES // 2:
        keep |= changes
    timeline = tuple(Sample(i, t, s, ph, m, tot, tuple(c))
                     for i, t, s, ph, m, tot, c in downsample(samples, _MAX_SAMPLES, keep))
    dev = short4.devices[0]
    tensors = tuple(dataclasses.replace(t, module=_rename_tail(t.module, d4, full), label=_rename_tail(t.label, d4, full))
                    for t in short4.peak.tensors)
    peak = PeakInfo(bytes=pk[5], step=pk[2], phase=pk[3], module=pk[4],
                    by_category=dict(zip(CATEGORIES, pk[6])), by_device={dev.device: pk[5]}, tensors=tensors,
                    time_ms=pk[1])
    assumptions = _assumptions(short3.assumptions, short4.assumptions, k)
    devices = (dataclasses.replace(dev, peak_bytes=pk[5]),)
    if host:  # the host's peak (parameter shards, gradients, optimizer state and the step's temporaries)
        devices += (dataclasses.replace(short4.devices[1], peak_bytes=int(assumptions["host_peak_bytes"])),)
    notes = short4.notes + (f"peak tensors listed from the run with {_SHORT[1] * p} of the {units * p} blocks of "
                            f"{prefix}, at the same point of the step",)
    return dataclasses.replace(short4, peak=peak, steps=steps, modules=modules, timeline=timeline,
                               devices=devices, assumptions=assumptions,
                               notes=notes)


def _assumptions(a3: dict, a4: dict, k: int) -> dict:
    """The 4-unit run's assumptions with the integers that grow with depth counted (units, host bytes); the
    op-scratch line is the first run's (the second reuses its measurements)."""
    out = dict(a4)
    for key, text in a4.items():
        other = a3.get(key, "")
        if key == "estimate_seconds" or text == other:
            continue
        if key == "scratch":
            out[key] = other
            continue
        if key == "fsdp_units":  # "N units (the first three names, ...) and the root"
            n3, n4 = (int(re.match(r"(\d+) units", t).group(1)) for t in (other, text))
            out[key] = re.sub(r"^\d+ units", f"{_lin(n3, n4, k)} units", text)
            continue
        n3, n4 = re.findall(r"\d+", other), re.findall(r"\d+", text)
        if re.sub(r"\d+", "#", other) != re.sub(r"\d+", "#", text):
            raise _Mismatch(f"assumption {key!r} differs between the short runs")
        counted = iter(str(_lin(int(x), int(y), k)) for x, y in zip(n3, n4))
        out[key] = re.sub(r"\d+", lambda _m, it=counted: next(it), text)
    return out


def _maxima(modules: dict, samples: list) -> dict:
    """Raise each module's forward/backward/gap peak to what the counted timeline shows in the last step with
    a backward (an affine count of a maximum is never above the true one; a sample is never above it
    either, so the higher of the two is exact wherever the highest point is a sample or stays in place)."""
    steps = [s[2] for s in samples if s[3] == "backward"]
    if not steps:
        return modules
    last = [s for s in samples if s[2] == steps[-1]]
    totals = [s[5] for s in last]
    fwd_max: dict = {}
    fwd_last: dict = {}
    bwd_max: dict = {}
    bwd_first: dict = {}
    for i, s in enumerate(last):
        name = s[4]
        if not name or s[3] not in ("forward", "backward"):
            continue
        parts = name.split(".")
        for j in range(1, len(parts) + 1):
            m = ".".join(parts[:j])
            if s[3] == "forward":
                fwd_max[m] = max(fwd_max.get(m, s[5]), s[5])
                fwd_last[m] = i
            else:
                bwd_max[m] = max(bwd_max.get(m, s[5]), s[5])
                bwd_first.setdefault(m, i)
    first_bwd = next(i for i, s in enumerate(last) if s[3] == "backward")
    out = dict(modules)
    for name, st in modules.items():
        if not name or st.calls != 1 or not st.backward_entry_bytes:
            continue  # the root's samples include the step's own code; levels are kept for modules with a backward
        upd = {}
        if name in fwd_max:
            upd["forward_peak_bytes"] = max(st.forward_peak_bytes, fwd_max[name] - st.forward_entry_bytes)
        if name in bwd_max:
            upd["backward_peak_bytes"] = max(st.backward_peak_bytes, bwd_max[name] - st.backward_entry_bytes)
        end = bwd_first.get(name, first_bwd)  # its backward starts after the first backward sample at the earliest
        if name in fwd_last and end > fwd_last[name] + 1:
            upd["gap_peak_bytes"] = max(st.gap_peak_bytes, max(totals[fwd_last[name] + 1:end]))
        if upd:
            out[name] = dataclasses.replace(st, **upd)
    return out


def _rename_tail(name: str, d4: _Depth, full: _Depth) -> str:
    b, rest = d4.split(name)
    if b is None or b < (_SHORT[1] - 1) * d4.p:
        return name
    return full.name(b + (full.units - d4.units) * d4.p, rest)


def _steps(short3, short4, samples, k, StepStats) -> tuple:
    if len(short3.steps) != len(short4.steps):
        raise _Mismatch("the short runs have different numbers of steps")
    out = []
    prev_phase = None
    for s3, s4 in zip(short3.steps, short4.steps):
        mine = [s for s in samples if s[2] == s4.index]
        start = _lin(s3.start_bytes, s4.start_bytes, k)
        phase_peak = {}
        for ph in s4.phase_peak_bytes:
            cands = [s[5] for s in mine if s[3] == ph] + ([start] if ph == prev_phase else [])
            phase_peak[ph] = max(cands) if cands else _lin(s3.phase_peak_bytes.get(ph, 0), s4.phase_peak_bytes[ph], k)
        out.append(StepStats(index=s4.index, peak_bytes=max([start] + [s[5] for s in mine]),
                             phase_peak_bytes=phase_peak, start_bytes=start,
                             end_bytes=_lin(s3.end_bytes, s4.end_bytes, k),
                             duration_ms=_lin(s3.duration_ms, s4.duration_ms, k), micro_batches=s4.micro_batches))
        if mine:
            prev_phase = mine[-1][3]
    return tuple(out)


_INT_FIELDS = ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
               "forward_peak_bytes", "backward_peak_bytes", "calls", "output_bytes", "forward_entry_bytes",
               "backward_entry_bytes", "gap_peak_bytes")
# What a block's own numbers are, wherever it sits: middle blocks must agree on them.
_RELATIVE = ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "forward_peak_bytes",
             "backward_peak_bytes", "calls", "output_bytes", "activation_by_op", "forward_op_bytes")
_FLOAT_FIELDS = ("forward_ms", "backward_ms")
_DICT_FIELDS = ("activation_by_op", "forward_op_bytes")


def _modules(short3, short4, d3: _Depth, d4: _Depth, full: _Depth, k: int, structure: dict) -> dict:
    """Module statistics of the full model: blocks from their source blocks, the rest counted."""
    by_block: dict = {}
    fixed = []
    for name in short4.modules:
        b, rest = d4.split(name)
        if b is None:
            fixed.append(name)
        elif b < d4.p:
            by_block.setdefault(rest, None)
    if sorted(n for n in short3.modules if d3.split(n)[0] is None) != sorted(fixed):
        raise _Mismatch("the short runs' modules outside the blocks differ")
    # Forward op times and recompute fractions are measured on the host (noisy): never extrapolated from
    # differences; a block has its source block's, a module holding the blocks adds a middle unit's per unit.
    prefix = d4.prefix[:-1]
    per_unit: dict = {}
    for r in range(d4.p):
        for op, ms in short4.modules[d4.name(d4.p + r, "")].forward_op_ms.items():
            per_unit[op] = per_unit.get(op, 0.0) + ms
    out = {}
    for name in fixed:
        st4 = short4.modules[name]
        ops = dict(st4.forward_op_ms)
        if name == "" or name == prefix or prefix.startswith(name + "."):
            for op, ms in per_unit.items():
                ops[op] = ops.get(op, 0.0) + (full.units - d4.units) * ms
        out[name] = _module(name, [short3.modules[name], st4], k, None, structure.get(name),
                            host=(ops, st4.recompute_fraction))
    for blk in range(full.units * full.p):
        src, u = _sources(full.units, blk, full.p)
        runs = (short3, short4) if u is None else (short3, short4, short4)
        depths = (d3, d4) if u is None else (d3, d4, d4)
        r = blk % full.p
        rests = {rest for n in short4.modules for b, rest in [d4.split(n)] if b is not None and b % full.p == r}
        for rest in sorted(rests):
            names = [dp.name(s, rest) for dp, s in zip(depths, src)]
            try:
                stats = [prof.modules[nm] for prof, nm in zip(runs, names)]
            except KeyError as e:
                raise _Mismatch(f"module {e} missing in a short run") from None
            if u is not None and len({tuple(repr(getattr(st, f)) for f in _RELATIVE) for st in stats}) != 1:
                raise _Mismatch(f"middle blocks differ ({rest or 'the block'} of kind {r})")
            host = stats[1]  # the 4-unit run's block: first, last or first middle unit
            out[full.name(blk, rest)] = _module(full.name(blk, rest), stats, k, u,
                                                host=(dict(host.forward_op_ms), host.recompute_fraction))
    return {name: out[name] for name in sorted(out, key=module_sort_key)}


def _module(name: str, stats: list, k: int, u, structure: str | None = None, host=None):
    """One module's statistics counted; ``structure``: its hash in the uncut model (it holds the blocks);
    ``host``: its host-measured (forward op times, recompute fraction)."""
    base = stats[-1]
    if len({(s.type, s.structure if structure is None else "") for s in stats}) != 1:
        raise _Mismatch(f"module {name} differs between the short runs")
    upd = {f: _fit(tuple(getattr(s, f) for s in stats), k, u) for f in _INT_FIELDS + _FLOAT_FIELDS}
    upd.update({f: _fit_dict([getattr(s, f) for s in stats], k, u) for f in _DICT_FIELDS})
    upd["forward_op_ms"], upd["recompute_fraction"] = host
    for f in ("activation_by_op", "forward_op_bytes"):
        upd[f] = dict(sorted(upd[f].items(), key=lambda kv: -kv[1]))
    upd["forward_op_ms"] = dict(sorted(upd["forward_op_ms"].items(), key=lambda kv: -kv[1]))
    if structure is not None:
        upd["structure"] = structure
    return dataclasses.replace(base, name=name, **upd)
