"""What the storage ledger records: one :class:`StorageRecord` per storage, the :class:`ModuleNode` tree of
tracked modules, and :class:`PatternRun` placeholders for replayed optimizer steps.

These are plain slotted objects, made and read on the per-op path: no validation, no methods beyond what
the replay needs. A record is shared by every event of its storage (birth, resizes, free), so a change to its
category after the fact (a gradient claimed, a storage freed in the phase it was made in) applies to all of
them when the step is replayed. Known limit: records hold no reference to their storage's data, only a weak
reference (:class:`FreeRef`) while the ledger follows it.
"""

from __future__ import annotations

import weakref

from ..categories import TEMPORARY

__all__ = ["FreeRef", "StorageRecord", "ModuleNode", "PatternRun", "expand_pattern_runs"]


class FreeRef(weakref.ref):
    """A weak reference to a storage that calls the ledger back when it is freed, carrying the storage's key
    (one object per storage, where a plain ref with a ``partial`` callback is two)."""

    __slots__ = ("key",)


class StorageRecord:
    """One storage's life: its size, category, owner module and where it was made.

    ``device`` is the ledger's device index, stored as ``-(index + 1)`` for devices whose allocator rounds
    sizes (CUDA, :mod:`.cuda_blocks`), so that the per-op path needs one attribute to know both."""

    __slots__ = ("nbytes", "cat", "node", "phase", "phase_id", "op", "shape", "dtype", "device", "label",
                 "ref", "t")

    def __init__(self, nbytes, cat, node, phase, phase_id, op, shape, dtype, device, label=""):
        self.nbytes = nbytes
        self.cat = cat
        self.node = node
        self.phase = phase
        self.phase_id = phase_id
        self.op = op
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.label = label
        self.ref = None
        self.t = 0.0  # forward op time elapsed when it was made (Ledger.op_clock)


class ModuleNode:
    """A tracked module: its name in the tree and the statistics the replay accumulates for it."""

    __slots__ = ("name", "type", "parent", "structure", "op_ms", "op_bytes", "stats", "module", "output_bytes",
                 "clock_in", "clock_out", "recompute_fraction", "output_ids")

    def __init__(self, name: str, type_name: str, parent: ModuleNode | None, structure: str = "", module=None):
        self.module = weakref.ref(module) if module is not None else None
        self.name = name
        self.type = type_name
        self.parent = parent
        self.structure = structure
        self.op_ms: dict[str, float] = {}  # forward op time in the current step (exclusive of children)
        self.op_bytes: dict[str, int] = {}  # bytes forward ops made in the current step (exclusive), freed or not
        self.stats = None  # filled by replay.NodeStats
        self.output_bytes = 0  # bytes of the outputs its forward made (max over calls)
        self.clock_in = self.clock_out = 0.0  # Ledger.op_clock at its last forward's entry and exit
        self.recompute_fraction = 1.0  # share of its forward op time up to its last tensor backward keeps
        self.output_ids: frozenset = frozenset()  # records its last forward returned


class PatternRun:
    """A placeholder in the event log for a replayed optimizer step's events (:meth:`.Ledger.replay_pattern`)."""

    __slots__ = ("pattern", "phase", "phase_id", "devices")

    def __init__(self, pattern, phase, phase_id, devices) -> None:
        self.pattern = pattern
        self.phase = phase
        self.phase_id = phase_id
        self.devices = devices  # device name -> the ledger's device index

    def events(self) -> list:
        phase, pid, devices = self.phase, self.phase_id, self.devices
        recs = [StorageRecord(nb, TEMPORARY, None, phase, pid, op, shape, dtype, devices[dev], label)
                for nb, op, shape, dtype, dev, label in self.pattern.templates]
        return [(recs[i], delta) for i, delta in self.pattern.events]


def expand_pattern_runs(events: list, marks: list) -> tuple[list, list]:
    """A step's log with each :class:`PatternRun` replaced by its events, and the marks' event positions
    moved to match (a mark made after a placeholder points past it)."""
    where = [i for i, (rec, _) in enumerate(events) if type(rec) is PatternRun]
    if not where:
        return events, marks
    out: list = []
    shifts = []  # (position in the old log after which marks move, by how much in all)
    start = 0
    for i in where:
        out.extend(events[start:i])
        run = events[i][0].events()
        out.extend(run)
        shifts.append((i, len(out) - (i + 1)))
        start = i + 1
    out.extend(events[start:])
    moved = []
    for m in marks:
        pos = m[0]
        shift = 0
        for i, by in shifts:
            if pos > i:
                shift = by
        moved.append((pos + shift, *m[1:]) if shift else m)
    return out, moved
