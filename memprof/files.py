"""Reading and writing the bytes of memprof's files: profiles (JSON), plans (TOML), figures (PNG), reports (HTML).

Every file memprof writes goes through :func:`atomic_write_bytes`; every file it reads through
:func:`read_text`/:func:`read_json`. What a file means (a profile, a plan) is :mod:`memprof.loading`'s.

Writes are atomic: the bytes go to a temporary file in the target's folder (named
``.memprof-tmp-<pid>-<name>-<random>``), which is then renamed over the target, so a reader, an interrupted run
or a full disk never leaves a truncated file where a good one was. After an error the temporary file is
removed; one left by a killed process (``kill -9``) is removed by the next write into that folder once that
process is gone. A target that exists keeps its permission bits; a symlink is followed (the file it points to
is replaced, the link stays a link).

Commands check their outputs first with :func:`check_output`: an output is refused if it is one of the
command's inputs (the script it runs, the profile or plan it reads; ``--force`` does not change that), a
folder, or an existing file that memprof did not write (not a memprof file of that kind) unless ``--force``.

Every reading problem becomes a :class:`ProfileFormatError` that names the file and the problem.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import MemprofError, ProfileFormatError

__all__ = ["OutputRefused", "TEMP_PREFIX", "atomic_write_bytes", "atomic_write_text", "check_output",
           "clean_stale_temps", "made_by_memprof", "read_json", "read_text"]

TEMP_PREFIX = ".memprof-tmp-"
_TEMP_RE = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")


class OutputRefused(MemprofError):
    """An output path that memprof will not write: one of the command's inputs, a folder, or a foreign file."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files (``.memprof-tmp-<pid>-...``) in ``folder`` whose process is gone; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: symlinks followed (a dangling link's target is created)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders; returns ``path``.

    An existing target keeps its permission bits (a new one gets ``0666 & ~umask``); a symlink is followed.
    """
    target = _target(path)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    if target.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{target.name[:80]}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes`. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


_SIGNS = {
    "profile": lambda head: re.search(rb'"schema"\s*:\s*"memprof\.profile/1"', head) is not None,
    "plan": lambda head: re.search(rb'(?m)^schema\s*=\s*"memprof\.plan/1"', head) is not None,
    "png": lambda head: head.startswith(b"\x89PNG\r\n\x1a\n") and b"Software\x00memprof" in head,
    "html": lambda head: b'<meta name="generator" content="memprof' in head,
}
KINDS = tuple(_SIGNS)


def made_by_memprof(path: str | os.PathLike, kind: str) -> bool:
    """Whether ``path`` is a regular file that memprof wrote as ``kind`` (profile, plan, png, html)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    return _SIGNS[kind](head)


def _same(a: Path, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _target(b) == a


def check_output(path: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike | None] = (),
                 force: bool = False, option: str = "--out") -> Path:
    """The absolute path a command may write ``path`` to, or :class:`OutputRefused` saying why not.

    Refused: one of ``inputs`` (always), a folder, or an existing file memprof did not write as ``kind``
    (unless ``force``). The path is made absolute here, so a script that changes folder later does not move it.
    """
    if kind not in _SIGNS:
        raise ValueError(f"unknown output kind {kind!r}")
    absolute = Path(os.path.abspath(path))
    target = _target(absolute)
    for given in inputs:
        if given is not None and os.path.exists(given) and _same(target, given):
            raise OutputRefused(f"{option} {path}: is also this command's input ({given}); memprof never writes "
                                "over its inputs: choose another path")
    if target.is_dir():
        raise OutputRefused(f"{option} {path}: is a folder; give a file name")
    if target.exists() and not force and not made_by_memprof(target, kind):
        raise OutputRefused(f"{option} {path}: exists and is not a {kind} memprof wrote; pass --force to "
                            "overwrite it, or choose another path")
    return absolute


def read_text(path: Path) -> str:
    if not path.exists():
        raise ProfileFormatError(path, "no such file")
    if path.is_dir():
        raise ProfileFormatError(path, "is a folder, not a file")
    if not path.is_file():
        raise ProfileFormatError(path, "not a regular file (a device or a pipe?)")
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
    except RecursionError:
        raise ProfileFormatError(path, "not a memprof file (JSON nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise ProfileFormatError(path, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProfileFormatError(path, "not a memprof file (the JSON is not an object)")
    return data
