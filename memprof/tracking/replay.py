"""Replay of the ledger's event log, once per step: peaks, timeline samples and per-module statistics.

The ledger only appends ``(record, delta)`` events and boundary marks on the per-op path. At each step's
end the replay walks that step's log in order, with every storage's final category known (a tensor made in
forward is an activation if it outlived forward, a temporary if not; a backward temporary that became a
``.grad`` is a grad), and computes:

* the running total, by category and by device; the step's peak and each phase's peak;
* the run's peak, with the live set at that instant (reconstructed by a second pass over the step);
* each module's forward/backward peak (bytes above the level at its entry) from its boundary marks, its
  activation bytes (what it made in forward that is still alive when backward starts), the bytes of
  parameters, buffers, grads and optimizer state it owns, and its times;
* timeline samples: the highest point between consecutive boundaries, and every phase change.
"""

from __future__ import annotations

import heapq

from ..categories import (
    ACTIVATION,
    BACKWARD,
    CATEGORIES,
    FORWARD,
    OPTIMIZER,
    OTHER_PHASE,
)
from .marks import BACKWARD_IN, BACKWARD_OUT, FORWARD_IN, FORWARD_OUT, FORWARD_SPAN, GAP_SPAN, PHASE, SPAN_OF

__all__ = ["NodeStats", "Replay", "downsample"]

_NO_OPS: tuple = ({}, {})  # a node that ran no forward op in a step (read only)
_OWNED = OPTIMIZER  # categories 0.._OWNED (param, buffer, grad, optimizer) are owned by a module


class NodeStats:
    __slots__ = ("fwd_peak", "bwd_peak", "act", "act_by_op", "own", "own_max", "fwd_ms", "bwd_ms", "calls",
                 "op_ms", "op_bytes", "step_fwd_ms", "step_bwd_ms", "step_calls", "seen_in_step", "levels", "step_levels")

    def __init__(self) -> None:
        self.fwd_peak = 0
        self.bwd_peak = 0
        self.act = 0
        self.act_by_op: dict[str, int] = {}
        self.own = [0] * (_OWNED + 1)
        self.own_max = [0] * (_OWNED + 1)
        self.fwd_ms: list[float] = []  # per step
        self.bwd_ms: list[float] = []
        self.calls: list[int] = []
        self.op_ms: list[dict[str, float]] = []
        self.op_bytes: list[dict[str, int]] = []  # per step: bytes each forward op made (exclusive)
        self.step_fwd_ms = 0.0
        self.step_bwd_ms = 0.0
        self.step_calls = 0
        self.seen_in_step = False
        # Absolute levels in the last step with a backward: at forward entry, at backward entry, and the
        # highest level between the end of its forward and the start of its backward.
        self.levels = (0, 0, 0)
        self.step_levels = [0, 0, 0]


def _stats(node) -> NodeStats:
    st = node.stats
    if st is None:
        st = node.stats = NodeStats()
    return st


class Replay:
    """Accumulates a run's results step by step. ``time_of`` turns a mark's timestamp into seconds."""

    def __init__(self, t0: float, time_of=lambda t: t, top_k: int = 20) -> None:
        self.t0 = t0
        self.time_of = time_of
        self.top_k = top_k
        self.live: dict = {}  # record -> bytes
        self.total = 0
        self.cat = [0] * len(CATEGORIES)
        self.dev: dict[int, int] = {}
        self.dev_peak: dict[int, int] = {}
        # Device indices counted per device only, not in the totals (the host when an accelerator is in use).
        self.apart: frozenset = frozenset()
        self.event_base = 0
        self.phase = OTHER_PHASE
        self.cur = None
        self.open: list = []  # [node, kind, entry_total, max_total, entry_time]
        self.steps: list[dict] = []
        self.samples: list[tuple] = []  # (index, time_ms, step, phase, node, total, by_cat tuple)
        self.peak: dict | None = None
        self.nodes: list = []  # every node that got stats, in first-seen order

    # ------------------------------------------------------------------------------------------------
    def _ms(self, t) -> float:
        return (self.time_of(t) - self.time_of(self.t0)) * 1e3

    def _node_stats(self, node) -> NodeStats:
        st = node.stats
        if st is None:
            st = _stats(node)
            self.nodes.append(node)
        st.seen_in_step = True
        return st

    def replay_step(self, index: int, prelude: list, events: list, marks: list, t_start, t_end,
                    op_stats: dict | None = None) -> None:
        """Replay one step's log. ``op_stats``: {node: (op_ms, op_bytes)} of that step, where the step is
        replayed after later ones ran (the nodes' own dicts then hold a later step's)."""
        if self.apart:
            prelude, events = self._set_apart(prelude), self._set_apart(events)
        live, cat, dev, dev_peak = self.live, self.cat, self.dev, self.dev_peak
        # Memory found already live counts from the step's start.
        for rec, nb in prelude:
            self._apply(rec, nb)
        start_live = dict(live)
        start_total = self.total
        step_peak = self.total
        step_peak_i = -1
        step_peak_cat = list(cat)
        step_peak_dev = dict(dev)
        step_peak_where = (self.phase, self.cur, t_start)
        phase_peak = {p: 0 for p in range(4)}
        phase_peak[self.phase] = self.total
        micro_batches = 0
        samples = self.samples
        base = self.event_base
        total = self.total
        last_t = t_start
        if not samples or samples[-1][5] != total:
            samples.append((base, self._ms(t_start), index, self.phase, self.cur, total, tuple(cat)))
        pos = 0
        n_events = len(events)
        marks = list(marks) + [(n_events, None, None, t_end, self.phase, self.cur)]
        for idx, kind, payload, t, phase_after, cur_after in marks:
            if idx > pos:
                seg_max = -1
                seg_i = pos
                seg_cat = None
                ppk = phase_peak[self.phase]
                top = self.open[-1] if self.open else None
                for i in range(pos, idx):
                    rec, d = events[i]
                    if not d:
                        continue
                    v = live.get(rec, 0) + d
                    if v:
                        live[rec] = v
                    else:
                        del live[rec]
                    total += d
                    c = rec.cat
                    cat[c] += d
                    dv = rec.device
                    x = dev.get(dv, 0) + d
                    dev[dv] = x
                    if x > dev_peak.get(dv, 0):
                        dev_peak[dv] = x
                    if c <= _OWNED and rec.node is not None:
                        st = rec.node.stats or self._node_stats(rec.node)
                        y = st.own[c] + d
                        st.own[c] = y
                        if y > st.own_max[c]:
                            st.own_max[c] = y
                    if total > seg_max:
                        seg_max = total
                        seg_i = i
                        seg_cat = tuple(cat)
                        if top is not None and total > top[3]:
                            top[3] = total
                        if total > ppk:
                            ppk = total
                        if total > step_peak:
                            step_peak = total
                            step_peak_i = i
                            step_peak_cat = list(cat)
                            step_peak_dev = dict(dev)
                            step_peak_where = (self.phase, self.cur, last_t)
                phase_peak[self.phase] = ppk
                self.total = total
                if seg_cat is not None:
                    samples.append((base + seg_i, self._ms(last_t), index, self.phase, self.cur, seg_max, seg_cat))
                pos = idx
            if kind is None:
                break
            last_t = t
            self._mark(kind, payload, t, index)
            if kind == PHASE and phase_after == BACKWARD:
                micro_batches += 1
            if phase_after != self.phase:
                samples.append((base + idx, self._ms(t), index, phase_after, cur_after, total, tuple(cat)))
                phase_peak[phase_after] = max(phase_peak[phase_after], total)
            self.phase = phase_after
            self.cur = cur_after
        self.total = total
        self.event_base += n_events
        self.open = [e for e in self.open if e[1] != GAP_SPAN]  # forwards whose backward never came (no grad)

        # Per-step module statistics.
        for node in self.nodes:
            st = node.stats
            if st.step_levels[1]:
                st.levels = tuple(st.step_levels)
            st.step_levels = [0, 0, 0]
            if op_stats is None:
                op_ms, op_bytes = node.op_ms, node.op_bytes
            else:
                op_ms, op_bytes = op_stats.get(node, _NO_OPS)
            if st.seen_in_step or op_ms:
                st.fwd_ms.append(st.step_fwd_ms)
                st.bwd_ms.append(st.step_bwd_ms)
                st.calls.append(st.step_calls)
                st.op_ms.append(dict(op_ms))
                st.op_bytes.append(dict(op_bytes))
            if op_stats is None:
                node.op_ms.clear()
                node.op_bytes.clear()
            st.step_fwd_ms = st.step_bwd_ms = 0.0
            st.step_calls = 0
            st.seen_in_step = False

        self.steps.append({
            "index": index,
            "peak_bytes": step_peak,
            "phase_peak_bytes": phase_peak,
            "start_bytes": start_total,
            "end_bytes": total,
            "duration_ms": (self.time_of(t_end) - self.time_of(t_start)) * 1e3,
            "micro_batches": micro_batches,
        })
        if self.peak is None or step_peak > self.peak["bytes"]:
            self._take_peak(index, step_peak, step_peak_i, step_peak_cat, step_peak_dev, step_peak_where,
                            start_live, events)

    # ------------------------------------------------------------------------------------------------
    def _set_apart(self, events: list) -> list:
        """Count the events of devices in ``apart`` on their device only; the rest become zero-byte events
        (same positions, so marks and sample indices stay valid)."""
        apart, dev, dev_peak = self.apart, self.dev, self.dev_peak
        out = []
        for rec, d in events:
            dv = rec.device
            if d and dv in apart:
                x = dev.get(dv, 0) + d
                dev[dv] = x
                if x > dev_peak.get(dv, 0):
                    dev_peak[dv] = x
                d = 0
            out.append((rec, d))
        return out

    def _apply(self, rec, d) -> None:
        if not d:
            return
        v = self.live.get(rec, 0) + d
        if v:
            self.live[rec] = v
        else:
            self.live.pop(rec, None)
        self.total += d
        self.cat[rec.cat] += d
        x = self.dev.get(rec.device, 0) + d
        self.dev[rec.device] = x
        if x > self.dev_peak.get(rec.device, 0):
            self.dev_peak[rec.device] = x
        if rec.cat <= _OWNED and rec.node is not None:
            st = self._node_stats(rec.node)
            y = st.own[rec.cat] + d
            st.own[rec.cat] = y
            st.own_max[rec.cat] = max(st.own_max[rec.cat], y)

    def _take_peak(self, step, nbytes, upto, by_cat, by_dev, where, start_live, events) -> None:
        live = dict(start_live)
        for i in range(upto + 1):
            rec, d = events[i]
            if not d:
                continue
            v = live.get(rec, 0) + d
            if v:
                live[rec] = v
            else:
                live.pop(rec, None)
        top = heapq.nlargest(self.top_k, live.items(), key=lambda kv: kv[1])
        phase, node, t = where
        self.peak = {
            "bytes": nbytes,
            "step": step,
            "phase": phase,
            "node": node,
            "time_ms": self._ms(t),
            "by_category": by_cat,
            "by_device": by_dev,
            "tensors": [(rec, b, rec.cat) for rec, b in top],
        }

    def _mark(self, kind, payload, t, step) -> None:
        if kind == FORWARD_IN or kind == BACKWARD_IN:
            st = self._node_stats(payload)
            if kind == FORWARD_IN:
                st.step_calls += 1
                st.step_levels[0] = max(st.step_levels[0], self.total)
            else:
                self._close(payload, GAP_SPAN, t)
                st.step_levels[1] = max(st.step_levels[1], self.total)
            self.open.append([payload, SPAN_OF[kind], self.total, self.total, t])
        elif kind == FORWARD_OUT or kind == BACKWARD_OUT:
            self._close(payload, SPAN_OF[kind], t)
            if kind == FORWARD_OUT:  # the gap until this module's backward starts
                self.open.append([payload, GAP_SPAN, self.total, self.total, t])
        elif kind == PHASE and payload is not None:
            self._activations(payload)

    def _close(self, node, kind, t) -> None:
        open_ = self.open
        for j in range(len(open_) - 1, -1, -1):
            entry = open_[j]
            if entry[0] is node and entry[1] == kind:
                break
        else:
            return
        true_max = max(e[3] for e in open_[j:])
        del open_[j]
        if j > 0 and true_max > open_[j - 1][3]:
            open_[j - 1][3] = true_max
        st = self._node_stats(node)
        if kind == GAP_SPAN:
            st.step_levels[2] = max(st.step_levels[2], true_max)
            return
        rise = true_max - entry[2]
        dt = (self.time_of(t) - self.time_of(entry[4])) * 1e3
        if kind == FORWARD_SPAN:
            st.fwd_peak = max(st.fwd_peak, rise)
            st.step_fwd_ms += dt
        else:
            st.bwd_peak = max(st.bwd_peak, rise)
            st.step_bwd_ms += dt

    def close_all(self, t) -> None:
        self.open = [e for e in self.open if e[1] != GAP_SPAN]
        while self.open:
            node, kind = self.open[-1][0], self.open[-1][1]
            self._close(node, kind, t)

    def _activations(self, forward_phase_id) -> None:
        """Forward just ended: what each module made in it and is still alive is its activation memory."""
        exclusive: dict = {}
        by_op: dict = {}
        for rec, b in self.live.items():
            if rec.phase_id == forward_phase_id and rec.cat == ACTIVATION and rec.phase == FORWARD:
                node = rec.node
                while node is not None:
                    exclusive[node] = exclusive.get(node, 0) + b
                    ops = by_op.setdefault(node, {})
                    name = _op_name(rec.op)
                    ops[name] = ops.get(name, 0) + b
                    node = node.parent
        for node, b in exclusive.items():
            st = self._node_stats(node)
            if b > st.act:
                st.act = b
                st.act_by_op = by_op[node]


def _op_name(op) -> str:
    if op is None:
        return "?"
    try:
        return op.overloadpacket.__name__
    except AttributeError:
        return str(op)


def downsample(samples: list, limit: int, keep: set[int]) -> list:
    """At most about ``limit`` samples: per bucket the highest and lowest, plus the indices in ``keep``."""
    n = len(samples)
    if n <= limit:
        return samples
    buckets = max(1, limit // 2)
    chosen = set(i for i in keep if 0 <= i < n)
    size = n / buckets
    for b in range(buckets):
        lo, hi = int(b * size), min(n, int((b + 1) * size))
        if lo >= hi:
            continue
        seg = range(lo, hi)
        chosen.add(max(seg, key=lambda i: samples[i][5]))
        chosen.add(min(seg, key=lambda i: samples[i][5]))
    return [samples[i] for i in sorted(chosen)]
