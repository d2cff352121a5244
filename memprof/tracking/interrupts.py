"""Interrupts while tracking: Ctrl-C (and any exception a Python signal handler raises) reaches the user's code.

Why it is needed
    A Python signal handler runs in the main thread at whatever bytecode that thread executes when Python next
    checks for signals; SIGINT's default handler raises ``KeyboardInterrupt`` there, a SIGTERM handler may raise
    ``SystemExit``. While tracking, memprof runs Python inside the user's step where Python cannot pass an
    exception on: the ledger's free callback is a weakref callback, run at every free of a tracked storage,
    and an exception in it is printed as "Exception ignored" and dropped (training goes on). Elsewhere in
    memprof's own code (the dispatch mode, hooks, ``stop()``'s restoration) an exception half-way through its
    bookkeeping would leave the tracker inconsistent or a hook or patch behind.

How
    While a tracker is live (started, not stopped) in the main thread, every signal whose handler is a Python
    callable gets a wrapping handler (:func:`acquire`). When a signal arrives while the main thread runs
    memprof's tracking code (a frame of one of :data:`_DEFER_FILES` innermost on its stack, below any frame
    that runs the user's code with exceptions passing through, :func:`pass_through`), the wrapper only
    records it. A recorded signal's original handler runs, and raises, at the next safe point
    (:func:`deliver`): the entry of the next op the ledger sees or hook the tracker runs, the end of a
    backward the tracker ran, and at the latest when tracking stops, after every hook and patch is removed.
    A signal that arrives anywhere else runs its handler at once, as without memprof. The handlers are put
    back when the last tracker stops (a handler the user installed meanwhile is left alone).

The frame test runs only when a signal arrives; the per-op cost is one check of a module-level flag.

Why not simpler: a ``try``/``except KeyboardInterrupt`` in the callback cannot work alone, as the handler may
run at the callback's first instruction, before the ``try`` (it is kept as a fallback for handlers memprof
did not wrap); blocking SIGINT with ``pthread_sigmask`` around callbacks does not either, as the kernel then
delivers the process's signal to another thread and Python still runs the handler in the main thread at its
next check.

Known limits: a signal recorded in memprof's code is raised at the next op or hook; in a tracked block that
then runs pure Python for a long time (no tensor op, no module, no optimizer step) it waits for that, or for
the next signal (which is raised at once outside memprof's code). Only the main thread's signals exist in
Python: a tracker started in another thread installs nothing. A handler installed while tracking runs is not
wrapped; a ``KeyboardInterrupt``/``SystemExit`` it raises in the free callback is recorded there
(:func:`defer_exception`) and raised at the next safe point.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["acquire", "release", "deliver", "pending", "pass_through", "defer_exception", "handler_state",
           "live_guards"]

_HERE = os.path.dirname(os.path.abspath(__file__))
# Modules whose code keeps tracker state consistent only if it runs to the end (a signal there is recorded).
_DEFER_FILES = frozenset(os.path.join(_HERE, name) for name in (
    "ledger.py", "tracker.py", "native.py", "scratch.py", "optpattern.py", "replay.py", "interrupts.py",
    "records.py", "ledger_recording.py", "op_kinds.py", "cuda_blocks.py",
    # the tracker's parts
    "boundaries.py", "clock.py", "device_watch.py", "hierarchy.py", "optimizer_steps.py", "patches.py",
    "phases.py", "profile_builder.py", "recorded_backward.py", "marks.py"))
_PASS: set = set()  # code objects under which the user's code runs and exceptions pass through

pending = False  # something was recorded (read per op by the ledger: keep it a plain module attribute)
_recorded: list = []  # (signal number, original handler) or (None, exception)
_originals: dict = {}  # signal number -> the handler our wrapper replaced
_users = 0  # live trackers holding the wrappers
_lock = threading.Lock()


def pass_through(fn):
    """Mark ``fn`` as a frame under which the user's code runs with exceptions passing through (autograd's
    engine entry while tracking): a signal in the code it calls is not recorded. Returns ``fn``."""
    _PASS.add(fn.__code__)
    return fn


def _in_tracking_code(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if code in _PASS:
            return False
        if code.co_filename in _DEFER_FILES:
            return True
        frame = frame.f_back
    return False


def _wrapper(signum, frame):
    original = _originals.get(signum)
    if original is None:  # released meanwhile: nothing to defer to
        return
    if _in_tracking_code(frame):
        _record((signum, original))
        return
    original(signum, frame)


def _record(entry) -> None:
    global pending
    with _lock:
        _recorded.append(entry)
        pending = True


def defer_exception(exc: BaseException) -> None:
    """Keep ``exc`` (a ``KeyboardInterrupt``/``SystemExit`` caught where Python would drop it) to be raised
    at the next safe point."""
    _record((None, exc))


def deliver(skip: int = 1, force: bool = False) -> None:
    """Run the handlers of recorded signals (raising what they raise), unless the caller is itself inside
    memprof's tracking code below its entry (then a later safe point does it) and not ``force``. ``skip``:
    how many frames above this call belong to the entry point that calls it."""
    global pending
    if not pending or threading.current_thread() is not threading.main_thread():
        return
    frame = sys._getframe(skip + 1)
    if not force and _in_tracking_code(frame):
        return
    with _lock:
        recorded = list(_recorded)
        _recorded.clear()
        pending = False
    for signum, what in recorded:
        if signum is None:
            raise what
        what(signum, frame)  # the original handler: raises KeyboardInterrupt for SIGINT


def acquire() -> bool:
    """Wrap the Python signal handlers (first live tracker); False where this thread cannot (not main)."""
    global _users
    if threading.current_thread() is not threading.main_thread():
        return False
    if _users == 0:
        for signum in signal.valid_signals():
            try:
                handler = signal.getsignal(signum)
            except (OSError, ValueError):
                continue
            if callable(handler) and handler is not _wrapper:
                try:
                    signal.signal(signum, _wrapper)
                except (OSError, ValueError, RuntimeError):
                    continue
                _originals[signum] = handler
    _users += 1
    return True


def release() -> None:
    """Undo one :func:`acquire`; the last one puts the original handlers back (those still ours) and then
    runs what was recorded, also inside memprof's code: the caller is the tracker's ``stop`` with its
    restoration done, and no free callback is left to drop an exception."""
    global _users
    if _users == 0:
        return
    _users -= 1
    if _users:
        return
    originals = dict(_originals)
    for signum, handler in originals.items():
        try:
            if signal.getsignal(signum) is _wrapper:
                signal.signal(signum, handler)
        except (OSError, ValueError):
            pass
    _originals.clear()
    deliver(skip=2, force=True)


def live_guards() -> int:
    """How many live trackers hold the wrapped handlers (0 when none is installed)."""
    return _users


def handler_state() -> dict:
    """The current handler of every signal, as comparable data (tests: nothing left installed)."""
    out = {}
    for signum in signal.valid_signals():
        try:
            out[int(signum)] = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
    return out
