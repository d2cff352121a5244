"""Out-of-memory forensics: what was live at the moment memory ran out, from a partial profile.

When a run stops on an out-of-memory error, the tracker still stops and builds a profile of what it saw up
to that moment. :func:`render_oom` turns it into a report: where it happened (step, phase, module, the op
when the error names it), how much was live against the capacity, the breakdown by category, the modules
that held the largest live tensors, and those tensors themselves. Two sources:

* a **rehearsal**: ``Tracker(device_memory=BYTES)`` (``memprof run --device-memory SIZE``) raises
  :class:`~memprof.errors.DeviceMemoryExceeded` as tracked memory would go over ``BYTES``; its partial
  profile's peak *is* that moment, including the allocation that would not have fit;
* a **real** CUDA out-of-memory error (``torch.OutOfMemoryError``): the failed allocation never happened,
  so the profile's peak is the highest point reached before it (normally the moment of failure, as memory
  grows up to it); the error's "Tried to allocate" amount is shown beside it.

Known limits: per-module totals are sums over the largest live tensors the tracker kept (``top_tensors``,
20 by default), not over everything live; memory an op allocates inside itself on CUDA is not in the
partial profile of a real OOM. A rehearsal's op and capacity are the error's fields
(:class:`~memprof.errors.DeviceMemoryExceeded`); two facts are read from text, as no structured field
holds them: the rehearsed capacity of a profile loaded from a file (its note) and the requested amount
from torch's CUDA error message. The library only returns text: the CLI prints it. Torch-free: a
CUDA out-of-memory error is recognised only when torch is already imported (it raised the error).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .categories import CATEGORIES
from .errors import DeviceMemoryExceeded
from .peak_words import shape_text
from .profiles import Profile, TensorInfo
from .render.tables import pct
from .units import format_bytes

__all__ = ["Moment", "OomKind", "OomCause", "failure_moment", "find_oom", "module_totals", "render_oom"]


def _is_torch_oom(error: BaseException) -> bool:
    """Whether ``error`` is torch's out-of-memory error (without importing torch: a process that has not
    imported it cannot have raised it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


# Read from text that no structured field holds (see the module's limits): the op in the tracker's
# DeviceMemoryExceeded message, the amount in torch's CUDA error message, the limit in the tracker's note.
_TRIED = re.compile(r"Tried to allocate ([0-9.]+ ?[KMGT]i?B)")
_REHEARSED = re.compile(r"rehearsed device memory: (\d+) bytes")

# What usually helps when a category dominates at the moment of failure.
_HINTS = {
    "activation": "activation checkpointing, a smaller batch or sequence, or bf16 autocast",
    "temporary": "a smaller batch or sequence, or chunking the op that makes the large temporaries",
    "optimizer": "sharding the optimizer state (ZeRO/FSDP) or an optimizer with less state",
    "param": "sharding the parameters (FSDP) or lower-precision weights",
    "grad": "sharding the gradients (FSDP) or lower-precision gradients",
    "input": "a smaller batch",
    "buffer": "checking the model's buffers (caches, masks) for oversized ones",
}


class OomKind(str, Enum):
    """Which error ran out of memory; compares equal to its value (``"rehearsal"``, ``"cuda"``, ``"other"``)."""

    REHEARSAL = "rehearsal"  # the tracker's DeviceMemoryExceeded (a rehearsed device capacity)
    CUDA = "cuda"  # torch's CUDA out-of-memory error
    OTHER = "other"  # an error that is not an out-of-memory one, given to render_oom

    __str__ = str.__str__  # the value, as StrEnum has it, also in f-strings
    __format__ = str.__format__


@dataclass(frozen=True)
class OomCause:
    """The out-of-memory error found in an exception's chain and which :class:`OomKind` it is."""

    kind: OomKind
    error: BaseException

    @property
    def rehearsed(self) -> bool:
        """True for the tracker's rehearsal (``device_memory=``), False for a real out-of-memory error."""
        return self.kind == OomKind.REHEARSAL


def find_oom(error: BaseException | None) -> OomCause | None:
    """The innermost out-of-memory error in ``error``'s ``__cause__``/``__context__`` chain, if any.

    Innermost, because an error raised while unwinding from the first one (a rehearsal keeps raising at
    every op while memory stays over the limit) chains it: the first one names the op that did not fit.
    """
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DeviceMemoryExceeded):
            found = OomCause(OomKind.REHEARSAL, error)
        elif _is_torch_oom(error):
            found = OomCause(OomKind.CUDA, error)
        error = error.__cause__ or error.__context__
    return found


@dataclass(frozen=True)
class Moment:
    """A point of the run: when, where, and how much was live, by category."""

    step: int
    phase: str
    module: str
    total_bytes: int
    by_category: Mapping[str, int]


def _peak_moment(prof: Profile) -> Moment:
    p = prof.peak
    return Moment(p.step, p.phase, p.module, p.bytes, dict(p.by_category))


def failure_moment(prof: Profile, cause: OomCause | None) -> Moment:
    """When memory ran out. A rehearsal stops at the partial profile's peak; a real error ends the run, so
    it is the highest point of the phase the timeline ends in (the peak itself when memory grew up to it)."""
    if cause is None or cause.kind == OomKind.REHEARSAL or not prof.timeline:
        return _peak_moment(prof)
    last = prof.timeline[-1]
    stretch = []
    for s in reversed(prof.timeline):
        if (s.step, s.phase) != (last.step, last.phase):
            break
        stretch.append(s)
    top = max(reversed(stretch), key=lambda s: s.total_bytes)  # the earliest of equal highs
    if top.total_bytes == prof.peak.bytes and top.step == prof.peak.step and top.phase == prof.peak.phase:
        return _peak_moment(prof)
    return Moment(top.step, top.phase, top.module, top.total_bytes, dict(zip(CATEGORIES, top.by_category)))


def module_totals(tensors: tuple[TensorInfo, ...]) -> list[tuple[str, int, int]]:
    """(module, bytes, tensor count) summed over ``tensors``, largest first."""
    totals: dict[str, list[int]] = {}
    for t in tensors:
        entry = totals.setdefault(t.module, [0, 0])
        entry[0] += t.bytes
        entry[1] += 1
    return sorted(((m, b, n) for m, (b, n) in totals.items()), key=lambda r: (-r[1], r[0]))


def _module_label(name: str, phase: str = "") -> str:
    if name:
        return name
    return "optimizer.step() (no module)" if phase == "optimizer" else "(root)"


def _capacity(prof: Profile, cause: OomCause | None, capacity_bytes: int | None) -> int | None:
    """The capacity that ran out: given, else the rehearsed one, else a CUDA device's own."""
    if capacity_bytes is not None:
        return capacity_bytes
    if cause is not None and getattr(cause.error, "capacity_bytes", None) is not None:
        return cause.error.capacity_bytes
    if cause is None or cause.kind == OomKind.REHEARSAL:  # a profile loaded from a file: its note says it
        for note in prof.notes:
            m = _REHEARSED.search(note)
            if m:
                return int(m.group(1))
    if cause is not None and cause.kind == OomKind.CUDA and prof.environment.device.startswith("cuda"):
        return prof.capacity_bytes
    return None


def _title(cause: OomCause | None, capacity: int | None) -> str:
    if cause is not None and cause.kind == OomKind.REHEARSAL:
        size = f" of {format_bytes(capacity)}" if capacity is not None else ""
        return f"Out of memory (rehearsed device memory{size})"
    if cause is not None and cause.kind == OomKind.CUDA:
        return "Out of memory (CUDA)"
    return "Out of memory"


def _where(m: Moment) -> str:
    return f"step {m.step}, {m.phase} phase, in {_module_label(m.module, m.phase)}"


def _overview(prof: Profile, cause: OomCause | None, moment: Moment, capacity: int | None) -> list[tuple]:
    message = str(cause.error).strip() if cause is not None else ""
    where = _where(moment)
    op = getattr(cause.error, "op", "") if cause is not None and cause.kind == OomKind.REHEARSAL else ""
    if op:
        where += f" (op {op})"
    pairs = [("Where", where)]
    if message and cause.kind != OomKind.REHEARSAL:
        pairs.append(("Error", message.splitlines()[0]))
    live = f"{format_bytes(moment.total_bytes)} tracked"
    if capacity is not None:
        over = moment.total_bytes - capacity
        live += f" of {format_bytes(capacity)} capacity ({pct(moment.total_bytes, capacity)}"
        live += f", over by {format_bytes(over)})" if over > 0 else ")"
    pairs.append(("Live", live))
    tried = _TRIED.search(message)
    if tried:
        pairs.append(("Requested", f"{tried.group(1)} more (from the error message; not in the profile)"))
    if moment != _peak_moment(prof):
        pairs.append(("Peak before", f"{format_bytes(prof.peak.bytes)} at {_where(_peak_moment(prof))}"))
    return pairs


def _category_rows(m: Moment) -> list[tuple[str, str, str]]:
    cats = sorted(((c, b) for c, b in m.by_category.items() if b), key=lambda cb: -cb[1])
    return [(c, format_bytes(b), pct(b, m.total_bytes)) for c, b in cats]


def _module_rows(prof: Profile, top: int) -> list[tuple[str, str, str, int]]:
    return [(_module_label(m), format_bytes(b), pct(b, prof.peak.bytes), n)
            for m, b, n in module_totals(prof.peak.tensors)[:top]]


def _tensor_rows(prof: Profile, top: int) -> list[tuple]:
    return [(format_bytes(t.bytes), shape_text(t), t.dtype, t.category,
             _module_label(t.module), t.phase, t.label) for t in prof.peak.tensors[:top]]


def _hint(m: Moment) -> str | None:
    cats = {c: b for c, b in m.by_category.items() if b}
    if not cats:
        return None
    top = max(cats, key=cats.get)
    hint = _HINTS.get(top)
    if hint is None:
        return None
    return f"Largest share: {top} ({pct(cats[top], m.total_bytes)} of live memory). Try {hint}."


def _section(title: str, body: str) -> str:
    return f"{title}\n{'-' * len(title)}\n{body}"


def _tensor_sections(prof: Profile, at_failure: bool, top: int) -> list[str]:
    from tabulate import tabulate

    tensors = prof.peak.tensors
    if not tensors:
        return []
    when = "at that moment" if at_failure else f"at the peak before ({_where(_peak_moment(prof))})"
    covered = sum(t.bytes for t in tensors)
    modules = (f"Top modules {when}: summed over the {len(tensors)} largest live tensors, "
               f"{pct(covered, prof.peak.bytes)} of live memory")
    return [
        _section(modules, tabulate(_module_rows(prof, top), ["module", "bytes", "share", "tensors"],
                                   colalign=("left", "right", "right", "right"), disable_numparse=True)),
        _section(f"Largest live tensors {when}", tabulate(
            _tensor_rows(prof, top), ["bytes", "shape", "dtype", "category", "module", "phase", "label"],
            colalign=("right",) + ("left",) * 6, disable_numparse=True)),
    ]


def render_oom(prof: Profile, capacity_bytes: int | None = None, error: BaseException | None = None, *,
               top: int = 10) -> str:
    """A text report of what was live when memory ran out.

    Args:
        prof: the partial profile of the run that ran out of memory.
        capacity_bytes: the capacity that was exceeded; by default the rehearsed device memory (from the
            profile's notes) or, for a CUDA error, the CUDA device's capacity.
        error: the exception (or one chaining it): a rehearsal's ``DeviceMemoryExceeded`` names the op, a
            CUDA error the amount it tried to allocate. Without one, the profile's peak is the moment.
        top: rows in the module and tensor tables.
    """
    from tabulate import tabulate

    cause = find_oom(error) if error is not None else None
    if error is not None and cause is None:
        cause = OomCause(OomKind.OTHER, error)
    moment = failure_moment(prof, cause)
    capacity = _capacity(prof, cause, capacity_bytes)
    title = _title(cause, capacity)
    parts = [f"{title}\n{'=' * len(title)}",
             tabulate(_overview(prof, cause, moment, capacity), tablefmt="plain", disable_numparse=True)]
    cats = _category_rows(moment)
    if cats:
        parts.append(_section("Live by category", tabulate(
            cats, ["category", "bytes", "share"], colalign=("left", "right", "right"), disable_numparse=True)))
    parts.extend(_tensor_sections(prof, moment == _peak_moment(prof), top))
    hint = _hint(moment)
    if hint:
        parts.append(hint)
    if moment.phase == "optimizer" and moment.by_category.get("optimizer", 0) == 0:
        parts.append("Note: the optimizer ran out while creating its state, which counts as temporary here "
                     "(state is labelled optimizer only once its first step ends).")
    return "\n\n".join(parts) + "\n"
