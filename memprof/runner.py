"""Run an unmodified training script under the tracker, as ``python SCRIPT ARGS`` or ``python -m MODULE ARGS``.

    result = run("train.py", ["--lr", "3e-4"], steps=2, out="memprof.json")
    result.exit_code, result.profile, result.profile_path

The script runs in this process through :mod:`runpy`, set up as Python sets up a script: module name
``__main__``, ``sys.argv == [script, *args]``, the script's folder (the current folder for a module) first
on ``sys.path``, ``__file__`` set (absolute, as Python >= 3.9 does). ``sys.argv`` and ``sys.path`` are
restored afterwards. Tracking is one :class:`ScriptTracking`: a ``Tracker(model=None, optimizer=None,
steps=N)`` started just before the script runs, which stops itself from inside the N-th
``optimizer.step()`` (the rest of the script runs untracked, without overhead) or when the script ends,
also by an exception; the profile is then written atomically.

The script's output passes through; its exit status becomes :attr:`RunResult.exit_code`: ``sys.exit(code)``
gives that code (a message: printed, 1), an uncaught exception 1 (130 for ``KeyboardInterrupt``) with the
traceback Python would print (without this module's frames) in :attr:`RunResult.stderr_text`. The library
prints nothing: the CLI writes ``stderr_text``, reports and summaries.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment) each rank writes ``OUT.rankN.json`` and
records its rank and world size from those variables (the script may have destroyed its process group
before tracking stops); rank 0, when its script succeeded, waits for every rank's file and returns them in
:attr:`RunResult.rank_profiles`.

Known limits: the script shares this process, so tensors made when its package is first imported (while
a ``-m`` target is located) are found live rather than seen being made; spawn-based DataLoader workers
re-import ``__main__`` by file name and work only for scripts; a profile file counts as this launch's when
its tracking started at most :data:`FRESH_SLACK_S` seconds before rank 0's run (launches writing the same
path within that time can mix).
"""

from __future__ import annotations

import os
import runpy
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from .errors import MemprofError, ProfileFormatError
from .files import check_output
from .forensics import find_oom
from .loading import load_profile
from .profiles import Profile
from .tracking.first_forward import FirstRootForward
from .tracking.tracker import Tracker

__all__ = [
    "FRESH_SLACK_S",
    "RankRow",
    "RunResult",
    "RunTargetError",
    "ScriptTracking",
    "Target",
    "distributed_rank",
    "rank_profile_path",
    "rank_rows",
    "resolve_target",
    "run",
    "script_traceback",
    "wait_for_ranks",
]

FRESH_SLACK_S = 10.0  # a rank's tracking may start this much earlier than rank 0's run and still count

_RUNPY_FILES = {os.path.normcase(os.path.abspath(f)) for f in (__file__, runpy.__file__)}
_NOT_USER_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (torch.__file__, __file__))


class RunTargetError(MemprofError):
    """The script or module to run does not exist or cannot be run."""


# -- the target -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What to run: a script (absolute path) or a module (dotted name), and the folder Python puts first on
    ``sys.path`` for it."""

    name: str
    module: bool
    path0: str

    @property
    def argv0(self) -> str:
        return self.name  # for a module, runpy replaces it with the module's file


def resolve_target(target: str, *, module: bool = False) -> Target:
    """Check that ``target`` can be run and say how; :class:`RunTargetError` if it cannot."""
    if module:
        return _resolve_module(target)
    path = Path(target)
    if not path.exists():
        raise RunTargetError(f"{target}: no such script file")
    if path.is_dir():
        if not (path / "__main__.py").is_file():
            raise RunTargetError(f"{target}: a folder without __main__.py cannot be run")
        folder = os.path.realpath(path)
    else:
        folder = os.path.dirname(os.path.realpath(path))
    return Target(os.path.abspath(target), False, folder)


def target_files(target: Target) -> list[str]:
    """The files ``target`` runs first (the script, a folder's ``__main__.py``, a module's file): never outputs."""
    if not target.module:
        return [target.name, os.path.join(target.name, "__main__.py")]
    import importlib.util

    with _sys_path_first(target.path0):
        try:
            spec = importlib.util.find_spec(target.name)
            main = importlib.util.find_spec(f"{target.name}.__main__") if spec and spec.submodule_search_locations \
                else None
        except (ImportError, ValueError):
            return []
    return [s.origin for s in (spec, main) if s is not None and s.origin and os.path.isfile(s.origin)]


def _resolve_module(name: str) -> Target:
    import importlib.util

    cwd = os.getcwd()
    with _sys_path_first(cwd):
        try:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.submodule_search_locations is not None:  # a package: its __main__
                if importlib.util.find_spec(f"{name}.__main__") is None:
                    raise RunTargetError(f"{name} is a package without __main__ and cannot be run (like python -m)")
        except (ImportError, ValueError) as e:
            raise RunTargetError(f"cannot find module {name!r}: {e}") from None
    if spec is None:
        raise RunTargetError(f"no module named {name!r} (looked in the current folder and on sys.path)")
    return Target(name, True, cwd)


@contextmanager
def _sys_path_first(folder: str):
    saved = list(sys.path)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path[:] = saved


@contextmanager
def _as_main(target: Target, args: Sequence[str]):
    """``sys.argv`` and ``sys.path`` as Python sets them for the target, restored afterwards."""
    saved_argv = sys.argv
    sys.argv = [target.argv0, *map(str, args)]
    try:
        with _sys_path_first(target.path0):
            yield
    finally:
        sys.argv = saved_argv


def _exec(target: Target) -> None:
    if target.module:
        runpy.run_module(target.name, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target.name, run_name="__main__")


# -- what the script left behind ---------------------------------------------------------------------------
def _is_runner_frame(tb) -> bool:
    name = tb.tb_frame.f_code.co_filename
    return (os.path.normcase(os.path.abspath(name)) in _RUNPY_FILES if not name.startswith("<")
            else name.startswith(("<frozen runpy", "<frozen importlib")))


def _script_tb(error: BaseException):
    tb = error.__traceback__
    while tb is not None and _is_runner_frame(tb):
        tb = tb.tb_next
    return tb


def script_traceback(error: BaseException) -> str:
    """The traceback Python would print for ``error`` raised by the script, without the runner's frames."""
    return "".join(traceback.format_exception(type(error), error, _script_tb(error)))


def _raised_at(error: BaseException, target: Target) -> str:
    """``file:line in function`` of the innermost frame of the user's own code (not torch's, not memprof's)."""
    folder = target.path0.rstrip(os.sep) + os.sep
    prefix = sys.prefix.rstrip(os.sep) + os.sep
    user = [f for f in traceback.extract_tb(_script_tb(error))
            if f.filename.startswith(folder) and not f.filename.startswith((*_NOT_USER_DIRS, prefix))]
    if not user:
        return ""
    f = user[-1]
    return f"{os.path.relpath(f.filename)}:{f.lineno} in {f.name}"


def _exit_status(code) -> tuple[int, str]:
    """Exit code and message of ``SystemExit(code)``, as the interpreter turns them into a process status."""
    if code is None:
        return 0, ""
    if isinstance(code, int):
        return code, ""
    return 1, f"{code}\n"


# -- tracking ---------------------------------------------------------------------------------------------
class ScriptTracking:
    """Tracking as ``memprof run`` does it, around any stretch of code (reusable by other commands)::

        session = ScriptTracking(steps=2, out="memprof.json", on_root_forward=lambda model: ...)
        session.start()
        try:
            run_the_script()
        finally:
            session.stop()
        session.profile, session.profile_path, session.save_error

    A ``Tracker(model=None, optimizer=None, steps=steps, device_memory=device_memory)`` tracks every module
    and optimizer the code uses; it stops itself from inside the ``steps``-th optimizer step, or at
    :meth:`stop`, and the profile is then written atomically to ``out`` (a failed write is kept in
    ``save_error``, never raised into the script). ``on_root_forward(model, args, kwargs)`` runs once, at the
    first root-level forward, before the tracker sees it (see :class:`~memprof.tracking.first_forward.FirstRootForward`);
    with ``grad_forward_only`` at the first one run with gradients on (evaluation forwards are passed over).
    """

    def __init__(self, *, steps: int | None = 2, out: str | os.PathLike | None = None,
                 device_memory: int | None = None,
                 on_root_forward: Callable[[torch.nn.Module, tuple, dict], object] | None = None,
                 environment: Mapping[str, object] | None = None,
                 on_stop: Callable[[Profile], None] | None = None, grad_forward_only: bool = False,
                 force: bool = False, inputs: Sequence[str] = ()) -> None:
        # resolved now: a script that changes folder does not move (or misname) the profile
        self.out = Path(os.path.abspath(out)) if out is not None else None
        self.force = force
        self.inputs = tuple(inputs)
        self.profile: Profile | None = None
        self.profile_path: Path | None = None
        self.save_error: OSError | MemprofError | None = None
        self.hook = (FirstRootForward(on_root_forward, grad_only=grad_forward_only)
                     if on_root_forward is not None else None)
        self.stop_error: BaseException | None = None
        self.on_stop = on_stop
        self.tracker = Tracker(steps=steps, device_memory=device_memory, on_stop=self._stopped,
                               environment=dict(environment or {}))

    def __enter__(self) -> ScriptTracking:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def start(self) -> ScriptTracking:
        if self.hook is not None:
            self.hook.install()  # before the tracker's hooks, so it runs first
        try:
            self.tracker.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop tracking (idempotent), which writes the profile, and remove the root-forward hook."""
        try:
            self.tracker.stop()
        finally:
            if self.hook is not None:
                self.hook.remove()

    @property
    def callback_error(self) -> BaseException | None:
        """What ``on_root_forward`` or ``on_stop`` raised, if one did (it reaches the script as its exception)."""
        if self.hook is not None and self.hook.error is not None:
            return self.hook.error
        return self.stop_error

    def _stopped(self, tracker: Tracker) -> None:
        self.profile = tracker.profile
        if self.out is not None:
            try:  # checked again: the script may have made a file there meanwhile
                check_output(self.out, "profile", inputs=self.inputs, force=self.force)
                self.profile.save(self.out)
                self.profile_path = self.out
            except (OSError, MemprofError) as e:
                self.save_error = e
        if self.on_stop is not None:
            try:
                self.on_stop(self.profile)
            except BaseException as e:
                self.stop_error = e
                raise


# -- ranks ------------------------------------------------------------------------------------------------
def distributed_rank(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(rank, world_size)`` from ``RANK``/``WORLD_SIZE`` (set by torchrun), or ``None`` outside it."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise MemprofError(f"RANK={env['RANK']!r} and WORLD_SIZE={env['WORLD_SIZE']!r} must be integers") from None
    if not 0 <= rank < world:
        raise MemprofError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return rank, world


def rank_profile_path(out: str | os.PathLike, rank: int) -> Path:
    """``memprof.json`` -> ``memprof.rank0.json``: each rank's own profile file."""
    p = Path(out)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def _created_at(prof: Profile) -> float | None:
    try:
        return datetime.fromisoformat(prof.environment.created).timestamp()
    except (TypeError, ValueError):
        return None


def _fresh_profile(path: Path, since: float) -> Profile | None:
    """The profile at ``path`` if it is complete and from this launch (tracking began after ``since``)."""

    if not path.is_file():
        return None
    try:
        prof = load_profile(path)
    except ProfileFormatError:
        return None
    created = _created_at(prof)
    if created is None or created + 1.0 < since - FRESH_SLACK_S:  # +1: created has whole seconds
        return None
    return prof


def wait_for_ranks(out: str | os.PathLike, world_size: int, *, since: float, timeout_s: float = 120.0,
                   poll_s: float = 0.1, have: Mapping[int, Profile] | None = None) -> dict[int, Profile | None]:
    """Every rank's profile (``None`` for ranks whose file did not appear within ``timeout_s``).

    ``since`` is a ``time.time()`` at the start of this launch: older files are left from an earlier one.
    ``have`` holds profiles already in hand (rank 0's own).
    """
    found: dict[int, Profile] = dict(have or {})
    deadline = time.monotonic() + timeout_s
    while True:
        for r in range(world_size):
            if r not in found:
                prof = _fresh_profile(rank_profile_path(out, r), since)
                if prof is not None:
                    found[r] = prof
        if len(found) >= world_size or time.monotonic() >= deadline:
            return {r: found.get(r) for r in range(world_size)}
        time.sleep(poll_s)


@dataclass(frozen=True)
class RankRow:
    """One rank's peak: how high, when, where, and its largest category (``None`` fields: no profile)."""

    rank: int
    peak_bytes: int | None = None
    step: int | None = None
    phase: str = ""
    module: str = ""
    category: str = ""
    category_bytes: int | None = None


def rank_rows(profiles: Mapping[int, Profile | None]) -> tuple[RankRow, ...]:
    rows = []
    for rank in sorted(profiles):
        prof = profiles[rank]
        if prof is None:
            rows.append(RankRow(rank))
            continue
        cats = {c: b for c, b in prof.peak.by_category.items() if b}
        top = max(cats, key=cats.get) if cats else ""
        rows.append(RankRow(rank, prof.peak.bytes, prof.peak.step, prof.peak.phase, prof.peak.module,
                            top, cats.get(top)))
    return tuple(rows)


# -- run --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunResult:
    """How a script run under the tracker ended, and what was measured."""

    exit_code: int
    profile: Profile | None  # None only if tracking failed to build one
    profile_path: Path | None  # where it was written (None: not written, see save_error)
    error: BaseException | None = None  # the script's uncaught exception (not SystemExit)
    rehearsed_oom: bool = False  # the error is (or chains) the tracker's DeviceMemoryExceeded
    out_of_memory: bool = False  # ... or a real torch.OutOfMemoryError
    stderr_text: str = ""  # what Python would print on the way out: the traceback, or sys.exit's message
    raised_at: str = ""  # "file:line in function" of the user's innermost frame when the script raised
    save_error: OSError | None = None
    rank: int | None = None  # under torchrun
    world_size: int | None = None
    rank_profiles: Mapping[int, Profile | None] = field(default_factory=dict)  # rank 0: every rank's


def _execute(target: Target, args: Sequence[str], session: ScriptTracking):
    """Run the target under ``session``: (exit code, message, exception)."""
    with _as_main(target, args):
        session.start()
        try:
            _exec(target)
        except SystemExit as e:
            return (*_exit_status(e.code), None)
        except BaseException as e:
            ours = session.callback_error
            if isinstance(ours, MemprofError) and _chains(e, ours):
                raise ours from None  # memprof's own callback refused the model or budget: a usage error
            return 130 if isinstance(e, KeyboardInterrupt) else 1, script_traceback(e), e
        finally:
            session.stop()
    return 0, "", None


def _chains(error: BaseException, cause: BaseException) -> bool:
    """Whether ``cause`` is ``error`` or what it was raised from or during (a script may wrap it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if error is cause:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def run(target: str, args: Sequence[str] = (), *, module: bool = False, steps: int | None = 2,
        out: str | os.PathLike = "memprof.json", device_memory: int | None = None,
        on_root_forward: Callable[[torch.nn.Module, tuple, dict], object] | None = None,
        rank_timeout_s: float = 120.0, on_stop: Callable[[Profile], None] | None = None,
        session_hook: Callable[[ScriptTracking], None] | None = None,
        grad_forward_only: bool = False, force: bool = False,
        inputs: Sequence[str | os.PathLike] = ()) -> RunResult:
    """Run a script (or, with ``module=True``, a module) as Python would, tracking its first ``steps``
    optimizer steps; write the profile to ``out`` (``OUT.rankN.json`` under torchrun).

    Raises :class:`RunTargetError` when the target cannot be found, and whatever :class:`MemprofError`
    ``on_root_forward`` raises (after tracking stopped); everything the script does ends in the result.
    ``on_stop(profile)`` runs when tracking stops (the script may go on); ``session_hook`` sees the
    :class:`ScriptTracking` before it starts; ``grad_forward_only``: ``on_root_forward`` waits for the first root
    forward run with gradients on.

    ``out`` is resolved against the current folder now, and refused (:class:`~memprof.files.OutputRefused`,
    before the script runs) when it is the script, one of ``inputs``, or an existing file that is not a
    memprof profile, unless ``force`` (see :func:`memprof.files.check_output`).
    """
    tgt = resolve_target(target, module=module)
    started = time.time()
    ranks = distributed_rank()
    out = Path(os.path.abspath(out))
    path = out
    environment = None
    inputs = [*target_files(tgt), *inputs]
    if ranks is not None:
        path = rank_profile_path(out, ranks[0])
        check_output(path, "profile", inputs=inputs, force=force)
        path.unlink(missing_ok=True)  # a file left by an earlier launch must not pass for this one's
        environment = {"rank": ranks[0], "world_size": ranks[1]}
    else:
        check_output(path, "profile", inputs=inputs, force=force)
    session = ScriptTracking(steps=steps, out=path, device_memory=device_memory,
                             on_root_forward=on_root_forward, environment=environment, on_stop=on_stop,
                             grad_forward_only=grad_forward_only, force=force, inputs=inputs)
    if session_hook is not None:
        session_hook(session)
    code, text, error = _execute(tgt, args, session)
    oom = find_oom(error)
    rank_profiles: dict[int, Profile | None] = {}
    if ranks is not None and ranks[0] == 0 and code == 0 and session.profile is not None:
        rank_profiles = wait_for_ranks(out, ranks[1], since=started, timeout_s=rank_timeout_s,
                                       have={0: session.profile})
    return RunResult(
        exit_code=code, profile=session.profile, profile_path=session.profile_path, error=error,
        rehearsed_oom=oom is not None and oom.rehearsed, out_of_memory=oom is not None,
        stderr_text=text, raised_at=_raised_at(error, tgt) if error is not None else "",
        save_error=session.save_error, rank=ranks[0] if ranks else None, world_size=ranks[1] if ranks else None,
        rank_profiles=rank_profiles,
    )
