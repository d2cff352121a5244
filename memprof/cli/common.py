"""Options and helpers shared by the CLI's commands."""

from __future__ import annotations

import json

import click

from ..units import format_bytes

__all__ = ["FORMAT", "UNITS", "echo_json", "fmt_bytes"]

FORMAT = click.Choice(["table", "markdown", "csv", "json"])
UNITS = click.Choice(["auto", "B", "KiB", "MiB", "GiB"])


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


def fmt_bytes(n, units: str = "auto") -> str:
    return format_bytes(n, units)
