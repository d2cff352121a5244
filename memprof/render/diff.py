"""Two profiles compared: the peak, the peak's categories, and every module's owned bytes and peaks.

:func:`diff` computes a :class:`ProfileDiff` of :class:`Change` records (bytes stay ``int``);
:meth:`ProfileDiff.regressions` names what grew beyond a percentage, one line each, and
:meth:`ProfileDiff.exceeds` says whether anything did (``memprof diff --fail-over`` turns it into an exit
code). :mod:`.diff_text` renders the comparison; :func:`change_text` and friends word one change.

Known limits: forward/backward times are not compared (they are noise-prone and not memory); modules are
matched by name only, so a renamed module is one removed and one added.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..categories import CATEGORIES
from ..profiles import Profile
from ..units import format_bytes
from .rows import OWNED_CATEGORIES
from .tables import module_label

__all__ = ["DIFF_SCHEMA", "DIFF_FIELDS", "ModuleStatus", "Change", "ModuleDiff", "ProfileDiff", "diff",
           "percent_text", "delta_text", "change_text"]

DIFF_SCHEMA = "memprof.diff/1"
DIFF_FIELDS: tuple[str, ...] = (*OWNED_CATEGORIES, "forward_peak", "backward_peak")
"""What is compared for each module: its owned categories' bytes and its forward/backward peaks."""


class ModuleStatus(str, Enum):
    """Whether a module is in both profiles, only the new one, or only the base; compares equal to its value."""

    COMMON = "common"
    ADDED = "added"
    REMOVED = "removed"

    __str__ = str.__str__  # the value, as StrEnum has it, also in f-strings and tables
    __format__ = str.__format__


@dataclass(frozen=True)
class Change:
    """One quantity in the base and the new profile. ``percent`` is None when it grew from zero."""

    field: str
    base_bytes: int
    new_bytes: int

    @property
    def delta_bytes(self) -> int:
        return self.new_bytes - self.base_bytes

    @property
    def percent(self) -> float | None:
        if self.base_bytes == 0:
            return 0.0 if self.new_bytes == 0 else None
        return 100.0 * self.delta_bytes / self.base_bytes

    def grew_beyond(self, fail_over: float) -> bool:
        """True when it grew by more than ``fail_over`` percent (any growth from zero counts)."""
        if self.delta_bytes <= 0:
            return False
        return self.percent is None or self.percent > fail_over

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "base_bytes": self.base_bytes, "new_bytes": self.new_bytes,
                "delta_bytes": self.delta_bytes, "percent": self.percent}


@dataclass(frozen=True)
class ModuleDiff:
    """One module present in either profile; ``status`` says in which (a :class:`ModuleStatus`)."""

    name: str
    type: str
    status: ModuleStatus
    changes: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        return self.status != ModuleStatus.COMMON or any(c.delta_bytes for c in self.changes)

    def grew_beyond(self, fail_over: float) -> bool:
        """An added module counts as grown; otherwise any category or peak beyond ``fail_over`` percent."""
        return self.status == ModuleStatus.ADDED or any(c.grew_beyond(fail_over) for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "status": str(self.status),
                "changes": [c.to_dict() for c in self.changes]}


@dataclass(frozen=True)
class ProfileDiff:
    """Base vs new: the peak, the peak's categories, and every module's owned bytes and peaks."""

    peak: Change
    by_category: tuple[Change, ...]
    modules: tuple[ModuleDiff, ...]
    notes: tuple[str, ...] = ()

    def regressions(self, fail_over: float) -> tuple[str, ...]:
        """What grew beyond ``fail_over`` percent, one line each (empty when nothing did)."""
        out = []
        if self.peak.grew_beyond(fail_over):
            out.append(f"peak grew {change_text(self.peak, 'auto')}")
        for m in self.modules:
            if m.status == ModuleStatus.ADDED:
                out.append(f"module {module_label(m.name)} is new")
                continue
            out.extend(f"module {module_label(m.name)} {c.field} grew {change_text(c, 'auto')}"
                       for c in m.changes if c.grew_beyond(fail_over))
        return tuple(out)

    def exceeds(self, fail_over: float) -> bool:
        """True when the peak or any module grew beyond ``fail_over`` percent (a new module counts)."""
        return bool(self.regressions(fail_over))

    def to_dict(self, fail_over: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": DIFF_SCHEMA,
            "peak": self.peak.to_dict(),
            "by_category": [c.to_dict() for c in self.by_category],
            "modules": [m.to_dict() for m in self.modules],
            "notes": list(self.notes),
            "fail_over": fail_over,
        }
        if fail_over is not None:
            d["regressions"] = list(self.regressions(fail_over))
            d["exceeds"] = bool(d["regressions"])
        return d


def _module_changes(base, new) -> tuple[Change, ...]:
    return tuple(Change(f, getattr(base, f"{f}_bytes", 0) if base else 0,
                        getattr(new, f"{f}_bytes", 0) if new else 0) for f in DIFF_FIELDS)


def diff(base: Profile, new: Profile) -> ProfileDiff:
    """Compare two profiles (typically the same model before and after a change)."""
    names = list(base.modules) + [n for n in new.modules if n not in base.modules]
    mods = []
    for n in names:
        b, w = base.modules.get(n), new.modules.get(n)
        status = ModuleStatus.COMMON if b and w else (ModuleStatus.REMOVED if b else ModuleStatus.ADDED)
        mods.append(ModuleDiff(n, (w or b).type, status, _module_changes(b, w)))
    cats = tuple(Change(c, int(base.peak.by_category.get(c, 0)), int(new.peak.by_category.get(c, 0)))
                 for c in CATEGORIES)
    notes = []
    if base.estimated != new.estimated:
        notes.append("one profile is estimated and the other measured")
    eb, en = base.environment, new.environment
    if (eb.device, eb.world_size) != (en.device, en.world_size):
        notes.append(f"different setups: {eb.device} x{eb.world_size} vs {en.device} x{en.world_size}")
    return ProfileDiff(Change("peak", base.peak_bytes, new.peak_bytes), cats, tuple(mods), tuple(notes))


# -- one change in words -------------------------------------------------------------------------------------
def percent_text(c: Change) -> str:
    """``+12.5%``, ``0%`` when unchanged, ``new`` when it grew from zero."""
    p = c.percent
    if p is None:
        return "new"
    return f"{p:+.1f}%" if c.delta_bytes else "0%"


def delta_text(n: int, units: str) -> str:
    """A byte difference with its sign (``+`` for growth)."""
    return ("+" if n > 0 else "") + format_bytes(n, units)


def change_text(c: Change, units: str) -> str:
    """``base -> new (delta, percent)``."""
    return (f"{format_bytes(c.base_bytes, units)} -> {format_bytes(c.new_bytes, units)} "
            f"({delta_text(c.delta_bytes, units)}, {percent_text(c)})")
