"""The choices a report or a comparison is rendered with, and the checks that turn a bad one into an error.

One place for the format, unit and section names that the library, the CLI's option lists and the checks
share. Limits: only names and argument checks; nothing is computed or rendered here.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MemprofError

__all__ = ["FORMATS", "DIFF_FORMATS", "SECTIONS", "UNIT_CHOICES", "check_choice", "check_count"]

FORMATS = ("table", "markdown", "csv", "json", "html")
DIFF_FORMATS = ("table", "markdown", "json")
SECTIONS = ("summary", "steps", "modules", "tensors")
UNIT_CHOICES = ("auto", "B", "KiB", "MiB", "GiB")


def check_count(name: str, value: int | None, minimum: int) -> None:
    """``value`` is None or an integer (not a bool) of at least ``minimum``; else a :class:`MemprofError`."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MemprofError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``; else a :class:`MemprofError` listing them."""
    if value not in choices:
        raise MemprofError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
