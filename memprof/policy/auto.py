"""Plan and apply without touching the training code: ``@memprof.auto`` and the first-forward hook.

``@memprof.auto(budget="24GiB")`` on a training function:

1. at the root model's first forward with gradients on (evaluation forwards under ``no_grad`` are passed
   over), estimates the step on fake tensors from the real model and batch
   (:func:`memprof.estimation.live.estimate_live`); when the estimate does not fit the budget, it plans from
   the estimate and applies the plan right away, so the first step does not run out of memory;
2. otherwise it tracks the first two steps for real (the second is steady: optimizer state exists), plans
   from the measured profile, and applies the plan (if anything needs to change) before the third step;
3. writes the profile and the plan files and logs one line (logger ``memprof``) saying what it did.

Estimating and planning save and restore every global random generator (:mod:`memprof.rng`): with nothing
to apply, the training function computes what it computes without memprof. When the estimate before the
first step cannot run, ``notify`` (a warning on logger ``memprof`` by default; ``memprof run`` prints it on
stderr) says why, and the first step is measured unguarded.

Training goes on in the same function call. Levers are checkpointing and autocast precision: sharding and
bf16 parameters change the parameters the user's optimizer already holds, so they are not applied
mid-training (plan them with ``memprof plan`` and apply before building the optimizer).

The first forward is caught by :class:`memprof.tracking.first_forward.FirstRootForward`.
"""

from __future__ import annotations

import functools
import logging

from ..errors import MemprofError
from ..tracking.first_forward import FirstRootForward
from ..training import autocast

__all__ = ["auto", "AutoSession", "first_call_context"]

log = logging.getLogger("memprof")


def first_call_context(plan, model):
    """The precision context a freshly applied plan needs for the call already under way (or None)."""
    if plan.precision in ("bf16-autocast", "fp16-autocast"):
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        return autocast(plan.precision, device_type)
    return None


def auto(fn=None, *, budget, levers=("checkpoint", "precision"), optimizer: str = "adamw",
         profile_path: str | None = "memprof.json", plan_path: str | None = "memprof-plan.toml"):
    """Decorate a training function: fit it into ``budget`` by planning and applying on the fly."""
    if fn is None:
        return functools.partial(auto, budget=budget, levers=levers, optimizer=optimizer,
                                 profile_path=profile_path, plan_path=plan_path)
    from ..estimation.devices import resolve_capacity

    levers = tuple(levers)
    if "sharding" in levers:
        raise MemprofError("@memprof.auto cannot shard mid-training (FSDP replaces the parameters your optimizer "
                           "holds): plan with `memprof plan --levers sharding` and apply before the optimizer")
    _, budget_bytes = resolve_capacity(budget)
    if not budget_bytes:
        raise MemprofError(f"budget must be a positive size or a device name, got {budget!r}")
    state = {"done": False}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if state["done"]:
            return fn(*args, **kwargs)
        state["done"] = True
        session = AutoSession(budget_bytes, levers, optimizer, profile_path, plan_path)
        wrapper.session = session
        session.start()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            session.finish(quiet=True)  # the training function's own error is the one to see
            raise
        session.finish()
        return result

    wrapper.session = None
    return wrapper


class AutoSession:
    """One auto-planning run: estimate at the first forward, track the first step, plan, apply, report."""

    def __init__(self, budget_bytes: int, levers, optimizer: str, profile_path, plan_path, notify=None) -> None:
        self.notify = notify or (lambda message: log.warning("memprof.auto: %s", message))
        self.budget_bytes = budget_bytes
        self.levers = levers
        self.optimizer = optimizer
        self.profile_path = profile_path
        self.plan_path = plan_path
        self.model = None
        self.estimate = None
        self.profile = None
        self.plan = None
        self.handle = None
        self.action = ""
        self.tracker = None  # paused while estimating: the estimate's fake ops are not the real step's
        self.source = None
        self._first = None
        self.failed = False

    def start(self) -> None:
        """Own hooks and tracker (the decorator); ``memprof run --budget`` wires the two callbacks itself."""
        from ..tracking.tracker import Tracker

        self._first = FirstRootForward(self.first_forward, grad_only=True).install()
        # Two steps: the second is steady (optimizer state exists), which is what the plan must fit.
        self.tracker = Tracker(steps=2, on_stop=lambda tracker: self.first_steps_done(tracker.profile))
        self.tracker.start()

    def finish(self, quiet: bool = False) -> None:
        if self._first is not None:
            self._first.remove()
        if self.tracker is not None:
            self.failed = self.failed or quiet
            try:
                self.tracker.stop()
            except Exception:
                if not quiet:
                    raise

    # -- before the first step ---------------------------------------------------------------------------
    def first_forward(self, model, args, kwargs):
        from ..estimation.live import live_source

        self.model = model
        self.source = live_source(model, args, kwargs, optimizer=self.optimizer)
        if self.tracker is not None:
            self.tracker.pause()
        try:
            self.estimate = self.source.profile("fp32")
        except Exception as e:  # cannot estimate: fall back to measuring the first step (never fail training)
            why = str(e) if isinstance(e, MemprofError) else f"{type(e).__name__}: {e}"
            self.notify(f"could not estimate the first step before it runs ({why}); measuring it unguarded")
            return None
        finally:
            if self.tracker is not None:
                self.tracker.resume()
        if self.estimate.peak_bytes <= self.budget_bytes:
            return None
        try:
            self.plan = self._plan(self.estimate)
        except MemprofError:
            self.failed = True  # e.g. no plan fits: stop here, before the step runs out of memory
            raise
        return self._apply(f"estimated {_gib(self.estimate.peak_bytes)} > budget: applied before the first step")

    # -- after the first step ----------------------------------------------------------------------------
    def first_steps_done(self, profile) -> None:
        from .engine import plan

        self.profile = profile
        if self.profile_path:
            self.profile.save(self.profile_path)
        if self.failed or not any(s.micro_batches for s in self.profile.steps):
            return  # the first step did not complete: nothing to plan from
        if self.plan is None and self.model is not None:
            if self.profile.peak_bytes <= self.budget_bytes:  # it fits: change nothing (no precision switch)
                self.plan = plan(self.profile, self.budget_bytes, levers=("checkpoint",))
                self.action = f"measured {_gib(self.profile.peak_bytes)}: fits {_gib(self.budget_bytes)}, nothing to change"
            else:
                self.plan = self._plan(self.profile)
                self._apply(f"measured {_gib(self.profile.peak_bytes)} > budget: applied from step 3")
        if self.plan is not None and self.plan_path:
            self.plan.save(self.plan_path)
        log.info("memprof.auto: %s; plan %s, predicted peak %s, %+.1f%% step time; profile %s", self.action,
                 self.plan_path or "-", _gib(self.plan.predicted_peak_bytes) if self.plan else "-",
                 100 * (self.plan.predicted_overhead if self.plan else 0.0), self.profile_path or "-")

    def _plan(self, prof):
        from .engine import plan

        running = self.tracker is not None and self.tracker.active
        if running:
            self.tracker.pause()  # estimating other precisions runs fake ops
        try:
            return plan(prof, self.budget_bytes, levers=self.levers, precisions=_AUTOCAST, source=self.source)
        finally:
            if running:
                self.tracker.resume()

    def _apply(self, action: str):
        from .apply import apply

        self.handle = apply(self.model, self.plan)
        modes = [c.mode for c in self.plan.checkpoint]
        self.action = (f"{action} ({modes.count('full')} full, {modes.count('selective')} selective checkpoints, "
                       f"{self.plan.precision})")
        return first_call_context(self.plan, self.model)


_AUTOCAST = ("fp32", "bf16-autocast")  # fp16 needs the optimizer for loss scaling; bf16 params break its state


def _gib(n: int) -> str:
    from ..units import format_bytes

    return format_bytes(n)
