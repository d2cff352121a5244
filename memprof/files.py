"""Reading and writing memprof files: profiles (JSON, ``memprof.profile/1``) and plans (TOML, ``memprof.plan/1``).

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so an interrupted run never
leaves a truncated file where a good one was. Every reading problem becomes a :class:`ProfileFormatError`
that names the file and the problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ProfileFormatError

__all__ = ["atomic_write_text", "load", "load_profile", "read_json", "read_text"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, creating parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a profile is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_text(path: Path) -> str:
    if not path.exists():
        raise ProfileFormatError(path, "no such file")
    if path.is_dir():
        raise ProfileFormatError(path, "is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProfileFormatError(path, "not a text file (not UTF-8)") from None
    except OSError as e:
        raise ProfileFormatError(path, f"cannot read: {e.strerror or e}") from None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise ProfileFormatError(path, "empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        body = text.strip()
        truncated = body[:1] in "{[" and body[-1:] not in "}]" or e.pos >= len(body)
        hint = "truncated JSON (the file ends early)" if truncated else "not valid JSON"
        raise ProfileFormatError(path, f"{hint}: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ProfileFormatError(path, "not a memprof file (the JSON is not an object)")
    return data


def load_profile(path: str | os.PathLike):
    """Read a profile JSON file written by ``Profile.save``."""
    from .profiles import SCHEMA, Profile

    data = read_json(path)
    schema = data.get("schema")
    if schema != SCHEMA:
        if schema is None:
            raise ProfileFormatError(path, f"not a memprof profile (no 'schema' field; expected {SCHEMA!r})")
        raise ProfileFormatError(path, f"schema {schema!r} is not supported (expected {SCHEMA!r})")
    try:
        return Profile.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ProfileFormatError(path, f"malformed profile: {what}") from None


def load(path: str | os.PathLike):
    """Load a memprof file: a profile (``.json``) or a plan (``.toml``), chosen by content."""
    p = Path(path)
    if p.suffix.lower() == ".toml":
        from .policy.plan import load_plan

        return load_plan(p)
    return load_profile(p)
