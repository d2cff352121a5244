"""Build a :class:`~memprof.profiles.Profile` from a finished run's replay (:func:`build_profile`): data in,
profile out; the replay, its nodes and the tracker are only read.

What goes in: the :class:`~.replay.Replay` after its last step (peak, steps, timeline samples, per-module
statistics, per-device peaks), the ledger's device table, the CUDA facts read at stop, and the run's
environment, notes and options. What comes out: the peak with its largest live tensors, each step's peaks,
per-module rows (owned bytes summed over each subtree; times and per-op figures averaged over the steps after
the first when there are several, as the first pays for warm-up and calibration), a timeline downsampled to
``max_samples`` (the peak and, where few, the phase changes kept), and per-device peaks.

Limits: modules are rows by name (two nodes with one name would be one row); a module that ran in no step has
no row unless a module under it did.
"""

from __future__ import annotations

import platform
import sys

import torch

from .._version import __version__
from ..categories import BUFFER, CATEGORIES, GRAD, OPTIMIZER, PARAM, PHASES
from .devices import cpu_name, host_memory_bytes
from .replay import NodeStats, downsample

__all__ = ["build_profile", "module_sort_key"]

_NO_STATS = NodeStats()  # a module that made nothing itself (read only)


def build_profile(replay, devices: dict[str, int], cuda_facts: dict, *, created: str, dist_env: dict,
                  environment: dict, notes, replayed_steps: int, device_memory: int | None, estimated: bool,
                  assumptions: dict, max_samples: int):
    """The profile of a run. ``devices``: device name -> index (the ledger's ``devices``); ``cuda_facts``:
    CUDA device name -> facts read at stop; ``environment``: entries that override the measured ones;
    ``notes``: the run's notes; ``replayed_steps``: optimizer steps replayed from a recorded pattern."""
    from ..profiles import (
        DeviceStats,
        Environment,
        PeakInfo,
        Profile,
        Sample,
        StepStats,
        TensorInfo,
    )

    rp = replay
    dev_name = {}
    for name, idx in devices.items():
        dev_name[idx] = name
        dev_name[-(idx + 1)] = name

    def node_name(node):
        return node.name if node is not None else ""

    peak = rp.peak
    tensors = []
    for rec, b, c in peak["tensors"]:
        label = rec.label or (f"{_op(rec.op)} output" if rec.op is not None else "")
        if rec.label == "workspace":
            label = f"{_op(rec.op)} workspace"
        tensors.append(TensorInfo(
            bytes=b, category=CATEGORIES[c], module=node_name(rec.node), phase=PHASES[rec.phase],
            shape=tuple(int(x) for x in rec.shape), dtype=str(rec.dtype).replace("torch.", "") if rec.dtype else "",
            device=dev_name.get(rec.device, "?"), label=label,
        ))
    by_dev: dict[str, int] = {}
    for d, b in peak["by_device"].items():
        by_dev[dev_name.get(d, "?")] = by_dev.get(dev_name.get(d, "?"), 0) + b
    peak_info = PeakInfo(
        bytes=peak["bytes"], step=peak["step"], phase=PHASES[peak["phase"]], module=node_name(peak["node"]),
        by_category=dict(zip(CATEGORIES, peak["by_category"])), by_device=by_dev,
        tensors=tuple(tensors), time_ms=peak["time_ms"],
    )
    steps = tuple(
        StepStats(index=s["index"], peak_bytes=s["peak_bytes"],
                  phase_peak_bytes={PHASES[p]: v for p, v in s["phase_peak_bytes"].items()},
                  start_bytes=s["start_bytes"], end_bytes=s["end_bytes"], duration_ms=s["duration_ms"],
                  micro_batches=s["micro_batches"])
        for s in rp.steps
    )
    modules = _module_stats(rp.nodes)
    peak_sample = None
    samples = []
    for i, (index, t_ms, step, phase, node, total, cats) in enumerate(rp.samples):
        samples.append((index, t_ms, step, phase, node_name(node), total, cats))
        if peak_sample is None and total == peak["bytes"]:
            peak_sample = i
    phase_changes = {i for i in range(1, len(samples)) if samples[i][3] != samples[i - 1][3]}
    keep = {peak_sample} if peak_sample is not None else set()
    if len(phase_changes) < max_samples // 2:
        keep |= phase_changes
    samples = downsample(samples, max_samples, keep)
    timeline = tuple(Sample(i, t, s, PHASES[p], m, tot, tuple(c)) for i, t, s, p, m, tot, c in samples)

    device_rows = []
    env_device, env_name, env_cap = "cpu", cpu_name(), host_memory_bytes()
    for name, idx in devices.items():
        peak_b = max(rp.dev_peak.get(idx, 0), rp.dev_peak.get(-(idx + 1), 0))
        kw = {}
        facts = cuda_facts.get(name)
        if facts is not None:
            kw.update(name=facts["name"], capacity_bytes=facts["capacity_bytes"],
                      nvml_total_bytes=facts.get("nvml_total_bytes"), nvml_used_bytes=facts.get("nvml_used_bytes"))
            alloc = facts.get("allocator")
            if alloc is not None:
                kw["allocator"] = alloc
                if alloc.get("reserved_peak"):
                    kw["fragmentation"] = 1.0 - alloc["allocated_peak"] / alloc["reserved_peak"]
            env_device, env_name, env_cap = name, facts["name"], facts["capacity_bytes"]
        elif name == "cpu":
            kw.update(name=cpu_name(), capacity_bytes=host_memory_bytes())
        device_rows.append(DeviceStats(device=name, peak_bytes=peak_b, **kw))
    env = dict(
        memprof_version=__version__, torch_version=torch.__version__,
        python_version=platform.python_version(), platform=f"{sys.platform}-{platform.machine()}",
        created=created, device=env_device, device_name=env_name, device_capacity_bytes=env_cap,
    )
    env.update(dist_env)
    env.update(environment)
    notes = sorted(notes)
    if replayed_steps:
        notes.append(f"{replayed_steps} steady optimizer step(s) replayed from the allocation pattern recorded "
                     "in an earlier step with the same optimizer signature (optimizer_replay=True)")
    if device_memory is not None:
        notes.append(f"rehearsed device memory: {device_memory} bytes")
    return Profile(
        environment=Environment(**env), peak=peak_info, steps=steps, modules=modules, timeline=timeline,
        devices=tuple(device_rows), estimated=estimated, assumptions=assumptions, notes=tuple(notes),
    )


def _module_stats(replayed_nodes) -> dict:
    """Module name -> ModuleStats, for the nodes that got statistics and their ancestors."""
    from ..profiles import ModuleStats

    nodes = list(replayed_nodes)
    known = {id(n) for n in nodes}
    for n in list(nodes):  # ancestors that made nothing themselves still belong to the tree
        p = n.parent
        while p is not None and id(p) not in known:
            nodes.append(p)
            known.add(id(p))
            p = p.parent
    children: dict = {}
    for n in nodes:
        if n.parent is not None:
            children.setdefault(id(n.parent), []).append(n)
    inclusive: dict = {}

    def stats(n) -> NodeStats:
        return n.stats if n.stats is not None else _NO_STATS

    def subtree(n):
        """Owned bytes (maxima of each module's own, summed), forward op times and op-made bytes per step,
        over the subtree."""
        if id(n) not in inclusive:
            st = stats(n)
            owned = list(st.own_max)
            ops = dict(_steady_mean_dict(st.op_ms))
            made = dict(_steady_mean_dict(st.op_bytes))
            for c in children.get(id(n), ()):
                c_owned, c_ops, c_made = subtree(c)
                owned = [a + b for a, b in zip(owned, c_owned)]
                for k, v in c_ops.items():
                    ops[k] = ops.get(k, 0.0) + v
                for k, v in c_made.items():
                    made[k] = made.get(k, 0.0) + v
            inclusive[id(n)] = (owned, ops, made)
        return inclusive[id(n)]

    out = {}
    for n in sorted(nodes, key=lambda n: module_sort_key(n.name)):
        st = stats(n)
        owned, ops, made = subtree(n)
        per_call = max(1.0, _steady_mean(st.calls))  # calls in the steps ``made`` is averaged over
        out[n.name] = ModuleStats(
            name=n.name, type=n.type, param_bytes=owned[PARAM], buffer_bytes=owned[BUFFER],
            grad_bytes=owned[GRAD], optimizer_bytes=owned[OPTIMIZER], activation_bytes=st.act,
            forward_peak_bytes=st.fwd_peak, backward_peak_bytes=st.bwd_peak,
            forward_ms=_steady_mean(st.fwd_ms), backward_ms=_steady_mean(st.bwd_ms),
            calls=max(st.calls) if st.calls else 0, structure=n.structure, output_bytes=n.output_bytes,
            recompute_fraction=n.recompute_fraction,
            forward_entry_bytes=st.levels[0], backward_entry_bytes=st.levels[1], gap_peak_bytes=st.levels[2],
            activation_by_op=dict(sorted(st.act_by_op.items(), key=lambda kv: -kv[1])),
            forward_op_ms=dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            forward_op_bytes={k: int(round(v / per_call)) for k, v in sorted(made.items(), key=lambda kv: -kv[1])},
        )
    subtree = None  # a recursive closure refers to itself: free it now, not at the next full collection
    return out


def _steady(xs: list) -> list:
    """Steps after the first when there are several (the first pays for warm-up and calibration)."""
    return xs[1:] if len(xs) > 1 else xs


def _steady_mean(xs: list) -> float:
    xs = _steady(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _steady_mean_dict(ds: list) -> dict:
    ds = _steady(ds)
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v / len(ds)
    return out


def module_sort_key(name: str):
    """Module names in tree order, numbered children by number ("blocks.2" before "blocks.10")."""
    return [int(p) if p.isdigit() else p for p in name.split(".")] if name else []


def _op(op) -> str:
    try:
        return op.overloadpacket.__name__
    except AttributeError:
        return str(op)
