"""``@memprof.profile``: track the first optimizer steps of any training function, then get out of the way.

    @memprof.profile(steps=2, output="memprof.json")
    def train():
        for batch in loader:
            ...

Tracking starts when the function is first called and ends after ``steps`` optimizer steps — from inside
``optimizer.step()``, so every hook and the dispatch mode are gone before the next step begins — or when
the call returns or raises, whichever comes first. The profile is then written atomically to ``output``
(also after an exception, for forensics) and kept on ``train.profile``. Later calls run untracked.

Known limit: a function that performs one step per call (``train_step(batch)``) is tracked for its first
call only; wrap several calls in ``memprof.track()`` instead.
"""

from __future__ import annotations

import functools
import warnings

from ..errors import TrackingError
from .tracker import Tracker

__all__ = ["profile"]


def profile(fn=None, *, steps: int = 2, output: str | None = "memprof.json", model=None, optimizer=None,
            **tracker_kwargs):
    """Decorate a training function so its first ``steps`` optimizer steps are tracked (also bare)."""
    if fn is None:
        return functools.partial(profile, steps=steps, output=output, model=model, optimizer=optimizer,
                                 **tracker_kwargs)
    if not callable(fn):
        raise TrackingError(f"@memprof.profile decorates a function, got {type(fn).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise TrackingError(f"steps must be a positive integer, got {steps!r}")

    state = {"tracker": None, "done": False}

    def finished(tracker: Tracker) -> None:
        state["done"] = True
        wrapper.profile = tracker.profile
        if output is not None:
            try:
                tracker.profile.save(output)
            except OSError as e:
                warnings.warn(f"memprof: could not write the profile to {output}: {e}", RuntimeWarning,
                              stacklevel=3)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if state["done"] or state["tracker"] is not None:  # finished, or a recursive call while tracking
            return fn(*args, **kwargs)
        tracker = Tracker(model, optimizer, steps=steps, on_stop=finished, **tracker_kwargs)
        state["tracker"] = tracker
        tracker.start()
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.stop()  # no-op when the step limit already stopped it
            state["done"] = True

    wrapper.profile = None
    return wrapper
