"""Errors about bad input. Every one is a :class:`MemprofError` and says what to do next.

The CLI turns these into one-line messages with exit code 2; library users can catch the base class.
"""

from __future__ import annotations

__all__ = [
    "MemprofError",
    "TrackingError",
    "ProfileFormatError",
    "DeviceMemoryExceeded",
    "DeviceUnavailableError",
    "SizeFormatError",
]


class MemprofError(Exception):
    """Base class of every error memprof raises about its input or environment."""


class TrackingError(MemprofError):
    """``track()``/``profile()`` were given something they cannot track, or were used wrongly."""


class ProfileFormatError(MemprofError):
    """A profile or plan file is missing, unreadable, truncated, or of another schema."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class SizeFormatError(MemprofError, ValueError):
    """A memory size such as ``"24GiB"`` could not be parsed."""


class DeviceUnavailableError(MemprofError):
    """A device facility (CUDA, the NVIDIA driver) was asked for but is not present."""


class DeviceMemoryExceeded(MemprofError):
    """Tracked memory went over a rehearsed device capacity (``device_memory=``).

    ``profile`` holds what was live at that moment: the peak of the partial profile is the allocation that
    would not have fit; ``op`` is the op that would have allocated it and ``capacity_bytes`` the rehearsed
    capacity (when the tracker raised it).
    """

    def __init__(self, message: str, profile: object = None, *, op: str = "",
                 capacity_bytes: int | None = None) -> None:
        super().__init__(message)
        self.profile = profile
        self.op = op
        self.capacity_bytes = capacity_bytes
