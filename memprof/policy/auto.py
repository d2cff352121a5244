"""Plan and apply without touching the training code: ``@memprof.auto`` and the first-forward hook.

``@memprof.auto(budget="24GiB")`` on a training function:

1. at the root model's first forward with gradients on (evaluation forwards under ``no_grad`` are passed
   over), estimates the step on fake tensors from the real model and batch
   (:func:`memprof.estimation.live.estimate_live`); when the estimate does not fit the budget, it plans from
   the estimate and applies the plan right away, so the first step does not run out of memory;
2. otherwise it tracks the first two steps for real (the second is steady: optimizer state exists), plans
   from the measured profile, and applies the plan (if anything needs to change) before the third step;
3. where the plain step may run on this device (a CPU, or a plain peak that fits the device), it does not
   stop at that first plan: it measures the loop's own steps first
   (:mod:`memprof.policy.calibrate`: tracked plain steps and steps in each other precision and with the loss
   head chunked, untracked steps of each checkpoint mode, precision and the chunked head paired with plain
   ones) and plans again from them, so the plan's
   peak is the real loop's (its loss outside the model, what it drops before backward) and its step time
   this machine's; the plan made before step 1 stays applied meanwhile (on a CPU the plain and timed
   steps may exceed the budget, which is not the device's limit);
4. writes the profile and the plan files and logs one line (logger ``memprof``) saying what it did;
5. once a plan is applied, checks it in the running loop (:class:`memprof.policy.live_check.LiveCheck`):
   the applied steps' peak (tracked) and step time (untracked, interleaved with plain steps where those may
   run), and moves to another plan, or back to the plain step, when it is over budget or slower than
   predicted; the figures go into the plan file and :attr:`AutoSession.verification`.

Before a plan may change precision, the model's forward is timed in each candidate precision on this device
(:mod:`memprof.policy.precision_timing`): a CPU without bf16 units never gets a "faster" bf16 plan.

Estimating and planning save and restore every global random generator (:mod:`memprof.rng`): with nothing
to apply, the training function computes what it computes without memprof. When the estimate before the
first step cannot run, ``notify`` (a warning on logger ``memprof`` by default; ``memprof run`` prints it on
stderr) says why, and the first step is measured unguarded.

Training goes on in the same function call. When it returns or raises, the plan is removed
(:meth:`memprof.ApplyHandle.remove`: the model's forwards, hooks and dtypes as before the call) and every hook
and tracker of the session is gone. Levers are checkpointing, autocast precision and loss-head chunking,
all three by default (:mod:`memprof.policy.live_levers` says why each may be applied to a running loop and
why the others are refused: sharding and bf16 parameters change the parameters the user's optimizer already
holds, micro-batches belong to the loop, the optimizer levers to the optimizer). The loss-head chunk is
:func:`~memprof.policy.loss_head.chunk_tokens_for` of the estimate: one value for planning, calibrating
and applying.

The first forward is caught by :class:`memprof.tracking.first_forward.FirstRootForward`.
"""

from __future__ import annotations

import functools
import logging

from ..errors import MemprofError
from ..estimation.live import live_source
from ..hardware import resolve_capacity
from ..tracking.first_forward import FirstRootForward
from ..tracking.tracker import Tracker
from ..training import autocast
from ..units import format_bytes
from ..vocab import AUTOCAST_PRECISIONS, CHECKPOINT_MODES
from .apply import apply
from .calibrate import AUTOCAST as _AUTOCAST
from .calibrate import CalibratingSession
from .chain_problem import InfeasibleBudget
from .engine import plan
from .live_check import LiveCheck, plan_words
from .live_levers import DEFAULT_LIVE_LEVERS, LIVE_LEVERS, check_live_levers
from .loss_head import DEFAULT_CHUNK_TOKENS, chunk_tokens_for
from .precision_timing import measure_precision_ratios

__all__ = ["auto", "AutoSession", "first_call_context"]

log = logging.getLogger("memprof")


def first_call_context(plan, model):
    """The precision context a freshly applied plan needs for the call already under way (or None)."""
    if plan.precision in AUTOCAST_PRECISIONS:
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        return autocast(plan.precision, device_type)
    return None


def auto(fn=None, *, budget, levers=DEFAULT_LIVE_LEVERS, optimizer: str = "adamw",
         profile_path: str | None = "memprof.json", plan_path: str | None = "memprof-plan.toml"):
    """Decorate a training function: fit it into ``budget`` by planning and applying on the fly."""
    if fn is None:
        return functools.partial(auto, budget=budget, levers=levers, optimizer=optimizer,
                                 profile_path=profile_path, plan_path=plan_path)

    levers = check_live_levers(levers, "@memprof.auto")
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


class AutoSession(CalibratingSession):
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
        self.precision_timing = None  # measured at the first forward when the precision lever is on
        self.base_precision = "fp32"
        self.check = None  # the LiveCheck of the applied plan
        self.verification = None  # its LiveResult once finished (or when the loop ended)
        self.optimizer_seen = None
        self._step_watch = None
        self.replan_refusal = ""  # why the last replan found nothing (the planner's words)
        self.plan_saved = False
        self.calibration = None  # the Calibration measuring the loop before the plan is made
        self.costs = None  # checkpoint costs timed in the loop (OptionCosts)
        self.measured_profiles: dict = {}  # (precision, "none") -> the loop's tracked steps in it
        self.step_timing = None  # whole-step precision ratios timed in the loop (PrecisionTiming)
        self.plan_profile = None  # the tracked plain profile the plan was made from, once calibrated
        self.loss_head_chunk_tokens = DEFAULT_CHUNK_TOKENS  # set from the estimate (chunk_tokens_for)
        self.variant_ratios: dict = {}  # StepVariant -> whole-step time ratio timed in the loop
        self.head_materialised = 0  # head calls whose full logits the loop needed while the head was chunked
        self._head = None  # the LossHeadHandle of the applied plan, if it chunks the head

    def start(self) -> None:
        """Own hooks and tracker (the decorator); ``memprof run --budget`` wires the two callbacks itself."""

        self._first = FirstRootForward(self.first_forward, grad_only=True).install()
        self.watch_steps()
        # Two steps: the second is steady (optimizer state exists), which is what the plan must fit.
        self.tracker = Tracker(steps=2, on_stop=lambda tracker: self.first_steps_done(tracker.profile))
        self.tracker.start()

    def watch_steps(self) -> None:
        """Note the first optimizer that steps (the loop's pace for the live check); before the loop runs."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        def seen(opt, args, kwargs):
            if self.optimizer_seen is None and not _estimators(opt):
                self.optimizer_seen = opt

        self._step_watch = register_optimizer_step_pre_hook(seen)

    def close(self) -> None:
        """After the loop: remove the step watch and the live check's wrapper (the plan stays applied)."""
        if self._step_watch is not None:
            self._step_watch.remove()
            self._step_watch = None
        if self.calibration is not None and not self.calibration.done:
            self._calibration_unfinished()
        if self.check is not None:
            if not self.check.done:  # the loop ended during the check: record what was measured, said so
                self.verified(self.check.result)
                if self.handle is None and self.plan is not None:  # it ended on a plain step: the plan stays
                    self.apply_plan(self.plan)
            self.check.remove()

    def finish(self, quiet: bool = False) -> None:
        """The decorated function returned (or raised, ``quiet``): stop, remove the plan and every hook."""
        try:
            self.close()
            if self._first is not None:
                self._first.remove()
            if self.tracker is not None:
                self.failed = self.failed or quiet
                try:
                    self.tracker.stop()
                except Exception:
                    if not quiet:
                        raise
        finally:
            try:
                self.remove_plan()
            except Exception:
                if not quiet:
                    raise

    # -- before the first step ---------------------------------------------------------------------------
    def first_forward(self, model, args, kwargs):

        self.model = model
        self.source = live_source(model, args, kwargs, optimizer=self.optimizer)
        self.base_precision = _script_precision(model)  # the script's own autocast is part of the baseline
        if self.tracker is not None:
            self.tracker.pause()
        try:
            self.estimate = self.source.profile(self.base_precision)
        except Exception as e:  # cannot estimate: fall back to measuring the first step (never fail training)
            why = str(e) if isinstance(e, MemprofError) else f"{type(e).__name__}: {e}"
            lost = [w for lv, w in (("precision", "other precisions"), ("loss-head", "the chunked loss head"))
                    if lv in self.levers]
            dropped = f"; {' and '.join(lost)} cannot be weighed either" if lost else ""
            self.notify(f"could not estimate the first step before it runs ({why}); measuring it "
                        f"unguarded{dropped}")
            # they are weighed on estimates
            self.levers = tuple(lv for lv in self.levers if lv not in ("precision", "loss-head"))
            self.source = None
            return None
        finally:
            if self.tracker is not None:
                self.tracker.resume()
        self.loss_head_chunk_tokens = chunk_tokens_for(self.estimate)
        if "precision" in self.levers and self.base_precision == "fp32":
            self._time_precisions(model, args, kwargs)
        if self.estimate.peak_bytes <= self.budget_bytes:
            return None

        try:
            self.plan = self._plan(self.estimate)
        except InfeasibleBudget as e:  # an estimate is no reason to refuse: measure what the script does
            self.notify(f"by the estimate of the first step, {e}; measuring the first steps before deciding")
            return None
        return self._apply(f"estimated {_gib(self.estimate.peak_bytes)} > budget: applied before the first step")

    # -- after the first step ----------------------------------------------------------------------------
    def first_steps_done(self, profile) -> None:

        self.profile = profile
        if self.profile_path:
            try:
                self.profile.save(self.profile_path)
            except OSError as e:
                self.notify(f"could not write the profile to {self.profile_path}: {e.strerror or e}")
        if self.failed or not any(s.micro_batches for s in self.profile.steps):
            return  # the first step did not complete: nothing to plan from
        if self.plan is None and self.model is not None:
            if self.profile.peak_bytes <= self.budget_bytes:  # it fits: change nothing (no precision switch)
                self.action = f"measured {_gib(self.profile.peak_bytes)}: fits {_gib(self.budget_bytes)}, nothing to change"
                try:  # the plan file records the decision (a model without repeated blocks has none to write)
                    self.plan = plan(self.profile, self.budget_bytes, levers=("checkpoint",),
                                     precision=self.base_precision)
                except MemprofError as e:
                    self.action += f" (no plan file: {e})"
            else:
                self.plan = self._plan(self.profile)  # refuses now when nothing fits (before calibrating)
                if self._calibrate(self.profile):
                    self.action = (f"measured {_gib(self.profile.peak_bytes)} > budget: measuring the loop's steps "
                                   "before planning")
                else:
                    self._apply(f"measured {_gib(self.profile.peak_bytes)} > budget: applied from step 3")
        elif self.plan is not None and self.handle is not None and self._calibrate(None):
            pass  # the plan applied before step 1 stays until the loop's own steps are measured
        if self.plan is not None and self.handle is not None and self.calibration is None:
            self._check_live(peak_known=self.profile.peak_bytes if self.estimate_applied else None)
        if self.plan is not None and self.plan_path:
            try:
                self.plan.save(self.plan_path)
                self.plan_saved = True
            except OSError as e:  # memprof's file, not the script's failure: say so, train on
                self.notify(f"could not write the plan to {self.plan_path}: {e.strerror or e}")
        log.info("memprof.auto: %s; plan %s, predicted peak %s, %+.1f%% step time; profile %s", self.action,
                 self.plan_path or "-", _gib(self.plan.predicted_peak_bytes) if self.plan else "-",
                 100 * (self.plan.predicted_overhead if self.plan else 0.0), self.profile_path or "-")

    def _time_precisions(self, model, args, kwargs) -> None:

        running = self.tracker is not None and self.tracker.active
        if running:
            self.tracker.pause()
        try:
            self.precision_timing = measure_precision_ratios(model, args, kwargs, base=self.base_precision,
                                                             precisions=_AUTOCAST)
        except Exception as e:  # an untimed precision is not weighed: never a guess on this device
            self.notify(f"could not time other precisions on this device ({type(e).__name__}: {e}); "
                        "planning in fp32 only")
            self.levers = tuple(lv for lv in self.levers if lv != "precision")
        finally:
            if running:
                self.tracker.resume()

    def _plan(self, prof, budget_bytes: int | None = None, precisions=None, without_modes=(), without_levers=()):

        running = self.tracker is not None and self.tracker.active
        if running:
            self.tracker.pause()  # estimating other precisions runs fake ops
        try:
            allowed = precisions or (_AUTOCAST if self.base_precision == "fp32" else (self.base_precision,))
            calibrated = prof is self.plan_profile
            levers = tuple(lv for lv in self.levers if lv not in without_levers)
            try:
                made = plan(prof, budget_bytes or self.budget_bytes, levers=levers, precisions=allowed,
                            source=self.source, precision=self.base_precision,
                            precision_timing=self.step_timing if calibrated and self.step_timing
                            else self.precision_timing, applicable=LIVE_LEVERS,
                            modes=tuple(m for m in CHECKPOINT_MODES if m not in without_modes),
                            costs=self.costs if calibrated else None,
                            profiles=self.measured_profiles if calibrated else None,
                            loss_head_chunk_tokens=self.loss_head_chunk_tokens,
                            variant_ratios=self.variant_ratios if calibrated else None)
            except InfeasibleBudget:
                raise
            except Exception as e:  # a default lever must never fail the script: plan again without it
                if "loss-head" not in levers:
                    raise
                why = str(e) if isinstance(e, MemprofError) else f"{type(e).__name__}: {e}"
                self.notify(f"loss-head chunking left out: the step with the head chunked could not be planned "
                            f"({why})")
                self.levers = tuple(lv for lv in self.levers if lv != "loss-head")
                return self._plan(prof, budget_bytes, precisions, without_modes, without_levers)
            if calibrated and self.calibration is not None:
                import dataclasses

                made = dataclasses.replace(made, assumptions={**made.assumptions,
                                                              "calibration": self.calibration.describe()})
            return made
        finally:
            if running:
                self.tracker.resume()

    @property
    def estimate_applied(self) -> bool:
        """Whether the plan was applied before the first step (so the tracked steps ran with it)."""
        return self.action.startswith("estimated")

    def _apply(self, action: str):
        self.apply_plan(self.plan)
        self.action = f"{action} ({plan_words(self.plan)})"
        return first_call_context(self.plan, self.model)

    # -- the live check's side ------------------------------------------------------------------------------
    def apply_plan(self, plan) -> None:

        self.handle = apply(self.model, plan)
        self._head = self.handle.loss_head  # counts the calls whose full logits the loop needed

    def remove_plan(self) -> None:
        if self.handle is not None:
            if self._head is not None:
                self.head_materialised += self._head.materialised
                self._head = None
            self.handle.remove()
            self.handle = None

    def loss_head_materialised(self) -> int:
        """How many head calls needed the full logits while the head was chunked (so chunking saved nothing)."""
        return self.head_materialised + (self._head.materialised if self._head is not None else 0)

    def replan(self, budget_bytes: int, precisions, without_modes=(), without_levers=()):
        """A plan for a lower budget, fewer precisions, checkpoint modes or levers, from what the plan was made
        from; None if none fits."""

        base = self.plan_profile or (self.estimate if self.estimate_applied else self.profile)
        if budget_bytes <= 0:
            return None
        if all(lv in without_levers for lv in self.levers):
            self.replan_refusal = f"no lever left to try without {', '.join(without_levers)}"
            return None
        try:
            return self._plan(base, budget_bytes, precisions, without_modes, without_levers)
        except InfeasibleBudget as e:
            self.replan_refusal = str(e)
            return None

    def _plain_may_run(self) -> bool:
        """Whether the plain step may run on this device: its peak (measured, else estimated) fits it (on a CPU
        without a capacity set: always)."""
        plain_peak = self.estimate.peak_bytes if self.estimate_applied else self.profile.peak_bytes
        capacity = self.profile.capacity_bytes
        on_cpu = self.profile.environment.device == "cpu"
        return (capacity is not None and plain_peak <= capacity) or (capacity is None and on_cpu)

    def _check_live(self, peak_known: int | None) -> None:

        if self.optimizer_seen is None:
            return
        self.check = LiveCheck(self, self.optimizer_seen, notify=self.notify, plain_may_run=self._plain_may_run(),
                               peak_known=peak_known, tracked_step_ms=self.plan.baseline_step_ms).install()

    def _set_profile(self, prof) -> None:
        self.profile = prof
        if self.profile_path:
            try:
                prof.save(self.profile_path)
            except OSError as e:
                self.notify(f"could not write the profile to {self.profile_path}: {e.strerror or e}")

    def _save_plan(self) -> None:
        if self.plan is not None and self.plan_path:
            try:
                self.plan.save(self.plan_path)
                self.plan_saved = True
            except OSError as e:
                self.notify(f"could not write the plan to {self.plan_path}: {e.strerror or e}")

    def verified(self, result) -> None:
        """The live check is done: keep its figures, in the plan file too."""
        import dataclasses

        self.verification = result
        if self.profile is not None and self.profile_path:
            self.profile = dataclasses.replace(self.profile, assumptions={**self.profile.assumptions,
                                                                          "plan_verified": result.describe()})
            try:
                self.profile.save(self.profile_path)
            except OSError as e:
                self.notify(f"could not write the profile to {self.profile_path}: {e.strerror or e}")
        if self.plan is not None:
            self.plan = dataclasses.replace(self.plan, assumptions={**self.plan.assumptions,
                                                                    "verified": result.describe()})
            if self.plan_path:
                try:
                    self.plan.save(self.plan_path)
                except OSError as e:
                    self.notify(f"could not write the plan to {self.plan_path}: {e.strerror or e}")


def _script_precision(model) -> str:
    """The precision the script's own forward runs in: its autocast, when it is on at the first forward or
    wraps the model's ``forward`` (accelerate's native AMP, as HF ``Trainer`` and TRL apply it)."""
    import torch

    words = {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    if torch.is_autocast_enabled(device_type):
        return words.get(torch.get_autocast_dtype(device_type), "fp32")
    ctx = _forward_autocast(model.__dict__.get("forward"))
    return words.get(ctx.fast_dtype, "fp32") if ctx is not None and ctx._enabled else "fp32"


def _forward_autocast(fn, depth: int = 0):
    """A ``torch.autocast`` an instance-level ``forward`` wrapper closes over (``torch.autocast`` used as a
    decorator keeps itself in the wrapper's closure), followed through ``__func__``/``__wrapped__``."""
    import torch

    if fn is None or depth > 6:
        return None
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, torch.amp.autocast):
            return value
        if callable(value) and not isinstance(value, type):
            found = _forward_autocast(value, depth + 1)
            if found is not None:
                return found
    for attr in ("__func__", "__wrapped__", "model_forward"):
        found = _forward_autocast(getattr(fn, attr, None), depth + 1)
        if found is not None:
            return found
    return None


def _estimators(opt) -> bool:
    """Whether ``opt`` is the estimator's (its parameters are fake tensors), not the loop's."""
    from torch._subclasses.fake_tensor import FakeTensor

    for group in opt.param_groups:
        for p in group["params"]:
            return isinstance(p, FakeTensor)
    return False




def _gib(n: int) -> str:

    return format_bytes(n)
