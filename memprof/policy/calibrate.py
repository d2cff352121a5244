"""Measure, inside the user's loop, what a plan for it must be made from, before the plan is made.

A plan made before the first step can only come from the fake-tensor estimate of the model's forward, and
its step times from the tracked steps (whose per-op overhead inflates small ops) or from a roofline. Both
miss what a real loop does around the model: Lightning computes the loss in ``training_step``, outside the
forward the estimate sees; HF ``Trainer`` drops the model's output before backward; a checkpointed unit
costs its recomputation plus checkpointing's own machinery, which no profile shows. So when the plain step
may run on this device (CPU, or its peak fits the device), ``run --budget`` and ``@memprof.auto`` calibrate
over the next optimizer steps of the loop, between steps (the optimizer's ``step`` is wrapped on the
instance, as :class:`~memprof.policy.live_check.LiveCheck` does):

1. **profiles** — track two plain steps (when the first tracked steps ran with a plan applied before step 1),
   two steps in each other candidate precision (autocast applied as a plan), and two with each step variant
   asked for in each of these precisions (the loss head chunked, applied as a plan;
   :class:`~memprof.policy.variants.StepVariant`): the
   real loop's peaks, the memory the planner then works from, for every configuration it weighs;
2. **costs** — time untracked steps of each checkpoint mode on every unit, of each other precision with
   nothing checkpointed, and of each variant, against plain steps exactly as the live check will time the
   plan (one warm-up step, then ``rounds`` pairs in the order plain, planned, planned, plain, ...; the median
   ratio): the per-unit checkpoint costs (each mode's measured extra time shared over the units in
   proportion to the profile's recomputed work), the whole-step ratio of each precision (forward, backward
   and optimizer step together) and of each variant on this machine;
3. the session plans from these (``on_done``), applies, and the live check verifies the new plan over the
   steps that follow.

Known limits: about ``3 x tracked + (2 x rounds + 1) x timed`` configurations' steps pass before the plan is
made (nanoGPT with checkpoint, precision and loss-head: 5 tracked, 4 timed, ~52 steps; the plain and planned
steps meanwhile run over the budget only where the device allows it); a loop that ends first
leaves the plan applied before step 1 in place (the session records it unfinished); step times include
whatever the loop does between steps (medians of pairs keep that down).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from ..tracking.devices import cpu_name
from ..units import format_bytes
from ..vocab import RECOMPUTE_MODES
from .chain_problem import InfeasibleBudget
from .live_check import LiveResult, plan_words
from .overrides import CallAfter
from .precision_timing import PrecisionTiming
from .timing import OptionCosts, config_name, cost_configurations, median_stderr, uniform_plan
from .variant_timing import priced_ratio
from .variants import StepVariant

__all__ = ["AUTOCAST", "Calibration", "CalibratingSession", "variant_plan"]

# The precisions run --budget and @memprof.auto may switch to: fp16 needs the optimizer for loss scaling,
# bf16 parameters break the optimizer state the loop already holds.
AUTOCAST = ("fp32", "bf16-autocast")


class Calibration:
    """Track and time the loop's next steps; then ``on_done(calibration)``.

    ``session`` provides ``model``, ``plan``/``handle`` (the plan applied, if any), ``apply_plan(plan)`` and
    ``remove_plan()``. ``plain_profile``: the tracked plain profile when the first steps ran plain (else two
    plain steps are tracked first). ``precisions``: other precisions to profile and time; ``modes``: the
    checkpoint modes to time; ``variants``: the step variants to profile in every precision and time in the
    base one (the loss head chunked; the plan applying one is :func:`variant_plan`). Results:
    :attr:`plain_profile`, :attr:`profiles` (precision -> profile), :attr:`variant_profiles` ((precision,
    StepVariant) -> profile), :attr:`costs`
    (:class:`~memprof.policy.timing.OptionCosts` or None), :attr:`precision_ratios`, :attr:`variant_ratios`.
    """

    def __init__(self, session, optimizer, *, plain_profile, base_precision: str, precisions=(), modes=(),
                 variants=(), rounds: int = 4, on_done, notify) -> None:
        self.session = session
        self.optimizer = optimizer
        self.plain_profile = plain_profile
        self.base_precision = base_precision
        self.precisions = tuple(p for p in precisions if p != base_precision)
        self.modes = tuple(modes)
        self.variants = tuple(v for v in variants if not v.plain)
        self.rounds = rounds
        self.on_done = on_done
        self.notify = notify
        self.profiles: dict = {}
        self.costs = None
        self.precision_ratios: dict = {base_precision: 1.0}
        self.variant_profiles: dict = {}
        self.variant_ratios: dict = {}
        self.done = False
        self.error: str = ""
        self._tasks: list = []
        self._task = None
        self._tracker = None
        self._tracked = None
        self._t_last: float | None = None
        self._times: dict = {}
        self._step_hook: CallAfter | None = None
        self._timing_built = False
        self._current = object()  # the configuration applied by this calibration (none yet)

    # -- wiring ----------------------------------------------------------------------------------------------
    def install(self) -> Calibration:
        def after_step():
            if not self.done:
                try:
                    self._after_step()
                except Exception as e:  # never break the user's training: stop calibrating, say why
                    self._fail(f"{type(e).__name__}: {e}")

        self._step_hook = CallAfter(self.optimizer, "step", after_step)
        if self.plain_profile is None:
            self._tasks.append(("track", self.base_precision, None))
        for p in self.precisions:
            self._tasks.append(("track", p, _precision_plan(self.session, p)))
        for v in self.variants:
            for p in (self.base_precision, *self.precisions):
                self._tasks.append(("track", (p, v), variant_plan(v, p)))
        return self

    def remove(self) -> None:
        """Unwrap the optimizer's ``step`` and stop a tracker still running (idempotent)."""
        if self._tracker is not None:
            try:
                self._tracker.stop()
            finally:
                self._tracker = None
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self.optimizer = None

    def describe(self) -> str:
        """What was timed, in one line (for the plan file)."""
        words = []
        if self.costs is not None:
            for mode, per_unit in self.costs.extra_ms.items():
                total = sum(per_unit.values())
                words.append(f"{mode} on every unit {total / self.costs.base_step_ms:+.1%}")
        words += [f"{p} {r:.2f}x" for p, r in self.precision_ratios.items() if p != self.base_precision]
        words += [f"{v.describe()} {r:.3f}x" for v, r in self.variant_ratios.items()]
        base = f"{self.base_step_ms:.1f} ms" if getattr(self, "base_step_ms", 0) else "not timed"
        return (f"timed in the loop's untracked steps against the plain step ({base}; median of {self.rounds} "
                f"pairs each): " + (", ".join(words) or "nothing"))

    # -- the state machine, between steps --------------------------------------------------------------------
    def _after_step(self) -> None:
        now = time.perf_counter()
        task = self._task
        if task is not None and task[0] == "track":
            if self._tracker is not None and self._tracked is None:
                return  # the tracker stops itself after its second step (_profiled)
            self._tracker = None
            prof, self._tracked = self._tracked, None
            if isinstance(task[1], tuple):  # (precision, StepVariant)
                self.variant_profiles[task[1]] = prof
            elif task[1] == self.base_precision:
                self.plain_profile = prof
            else:
                self.profiles[task[1]] = prof
        elif task is not None and task[0] == "time":
            self._times.setdefault(task[1], []).append(now - self._t_last)
        if not self._tasks and not self._timing_built:
            self._build_timing()
        if not self._tasks:
            self._finish()
            return
        self._task = task = self._tasks.pop(0)
        if task[0] == "track":
            from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

            if _get_current_dispatch_mode_stack():  # another tracker (the user's own) sees this step
                self._fail("another tracker is running in the loop")
                return
        self._set(task[2])
        if task[0] == "track":
            from ..tracking.tracker import Tracker

            self._tracker = Tracker(steps=2, on_stop=self._profiled)
            try:
                self._tracker.start()
            except Exception as e:  # e.g. the user's own tracker is running
                self._tracker = None
                self._fail(f"could not track the loop's steps ({e})")
                return
        self._t_last = time.perf_counter()

    def _profiled(self, tracker) -> None:  # inside the tracker's stop: only record
        self._tracked = tracker.profile

    def _set(self, plan) -> None:
        if plan is self._current and (self.session.handle is not None) == (plan is not None):
            return  # the same configuration again (planned after planned): no switch, as in the live check
        if self.session.handle is not None:
            self.session.remove_plan()
        if plan is not None:
            self.session.apply_plan(plan)
        self._current = plan

    def _build_timing(self) -> None:
        """The timing tasks, once the plain profile (which names the units) is in hand."""

        self._timing_built = True
        configs: dict = {}
        self._names = self._model_costs = None
        if self.modes:
            try:
                self._names, self._model_costs, ck = cost_configurations(self.plain_profile, None, self.modes,
                                                                           self.base_precision)
                configs.update({m: ck[m] for m in self.modes})  # every unit in each mode
            except Exception as e:  # e.g. no repeated units: nothing to checkpoint, nothing to time for it
                self.notify(f"checkpoint costs not measured ({type(e).__name__}: {e})")
                self.modes = ()
        for p in self.precisions:
            configs[("precision", p)] = _precision_plan(self.session, p)
        for v in self.variants:
            configs[("variant", v)] = variant_plan(v, self.base_precision)
        self._configs_timed = configs
        # Each configuration as the live check will time a plan: one warm-up step (kernel choice, caches; not
        # counted), then plain and planned steps in the order plain, planned, planned, plain, ... (ABBA), so
        # a step after a switch and one after a step of its own kind weigh alike in both.
        for k, plan in configs.items():
            self._tasks.append(("warm", k, plan))
            order = (["plain", "planned", "planned", "plain"] * ((self.rounds + 1) // 2))[: 2 * self.rounds]
            self._tasks.extend(("time", ("plain", k), None) if kind == "plain" else ("time", k, plan)
                               for kind in order)

    def _finish(self) -> None:

        self._set(None)
        ratios, plain = {}, []
        for k in self._configs_timed:
            mine, theirs = self._times.get(k, []), self._times.get(("plain", k), [])
            ratios[k] = [a / b for a, b in zip(mine, theirs)]
            plain += theirs
        base_ms = statistics.median(plain) * 1e3 if plain else 0.0
        ck = {k: v for k, v in ratios.items() if not (isinstance(k, tuple) and k[0] in ("precision", "variant"))}
        if ck and base_ms:
            pairs = {config_name(k): (len(v), median_stderr(v)) for k, v in ck.items()}
            self.costs = _fit_uniform(self._names, self._model_costs, ck, base_ms, self.rounds, pairs)
        elif base_ms:
            self.costs = OptionCosts(base_ms, {}, self.rounds)
        for p in self.precisions:
            rs = ratios.get(("precision", p))
            if rs:
                self.precision_ratios[p] = statistics.median(rs)
        for v in self.variants:
            rs = ratios.get(("variant", v))
            if rs and (self.base_precision, v) in self.variant_profiles:  # priced with its measured memory beside it
                self.variant_ratios[v] = priced_ratio(statistics.median(rs), median_stderr(rs))
        self.base_step_ms = base_ms
        self._finished(None)

    def _fail(self, why: str) -> None:
        self.error = why
        self._finished(why)

    def _finished(self, error) -> None:
        self.done = True
        self.remove()
        self.on_done(self)

    def precision_timing(self):
        """The measured whole-step ratios as a :class:`~memprof.policy.precision_timing.PrecisionTiming`."""

        if len(self.precision_ratios) < 2:
            return None
        device = self.plain_profile.environment.device if self.plain_profile is not None else "cpu"
        label = f"CPU ({cpu_name()})" if device == "cpu" else device
        forward = getattr(self.session, "precision_timing", None)  # the forward alone, timed at the first one
        return PrecisionTiming(self.base_precision, dict(self.precision_ratios), self.base_step_ms, self.rounds,
                               label, what="the loop's untracked training step",
                               forward=dict(forward.ratios) if forward is not None else {})


class CalibratingSession:
    """The :class:`~memprof.policy.auto.AutoSession` side of calibration: start it, plan from what it measured,
    apply and check the plan live; keep the first plan when it cannot finish."""

    def _calibrate(self, plain_profile) -> bool:
        """Start measuring the loop (:mod:`memprof.policy.calibrate`) when the plain step may run; False if not."""
        if self.optimizer_seen is None or self.model is None or not self._plain_may_run():
            return False
        precisions = tuple(p for p in AUTOCAST if p != self.base_precision) if "precision" in self.levers else ()
        modes = RECOMPUTE_MODES if "checkpoint" in self.levers else ()
        self.calibration = Calibration(self, self.optimizer_seen, plain_profile=plain_profile,
                                       base_precision=self.base_precision, precisions=precisions, modes=modes,
                                       variants=self._variants_to_measure(), on_done=self._calibrated,
                                       notify=self.notify).install()
        return True

    def _variants_to_measure(self) -> tuple:
        """The chunked loss head, when the lever is weighed and the model has a head to chunk (else the planner
        leaves the lever out and says why)."""
        if "loss-head" not in self.levers or self.source is None:
            return ()
        from .loss_head import LossHeadError, find_head

        try:
            find_head(self.model)
        except LossHeadError:
            return ()
        return (StepVariant(loss_head_chunk_tokens=self.loss_head_chunk_tokens),)

    def _calibrated(self, cal) -> None:
        """The loop's steps are measured: plan from them, apply, and check the plan live."""

        estimated = self.estimate_applied
        if cal.error:
            self.notify(f"could not measure the loop before planning ({cal.error}); keeping the plan made from "
                        f"the {'estimate' if estimated else 'first steps'}")
            self._restore_first_plan()
            self._check_live(peak_known=self.profile.peak_bytes if estimated else None)
            return
        prof = cal.plain_profile
        self.plan_profile = prof
        self.measured_profiles = {(p, "none"): q for p, q in cal.profiles.items()}
        self.measured_profiles.update({(p, "none", False, v): q for (p, v), q in cal.variant_profiles.items()})
        self.variant_ratios = dict(cal.variant_ratios)
        self.costs = cal.costs
        self.step_timing = cal.precision_timing()
        self._set_profile(prof)
        self.notify(f"measured {_size(prof.peak_bytes)} in the loop's plain steps; {cal.describe()}")
        if prof.peak_bytes <= self.budget_bytes:  # the estimate was high: the plain step fits
            from .engine import plan

            self.remove_plan()
            self.action = (f"measured {_size(prof.peak_bytes)} in the loop: fits {_size(self.budget_bytes)}, nothing "
                           "to change")
            try:
                self.plan = plan(prof, self.budget_bytes, levers=("checkpoint",), precision=self.base_precision)
            except Exception as e:
                self.action += f" (no plan file: {e})"
                self.plan = None
            self._save_plan()
            return
        try:
            new = self._plan(prof)
        except InfeasibleBudget as e:
            self.notify(f"by the loop's measured steps, {e}; keeping the plan made from the "
                        f"{'estimate' if estimated else 'first steps'}")
            self._restore_first_plan()
            self._check_live(peak_known=None)
            return
        self.remove_plan()
        self.plan = new
        self.apply_plan(new)
        self.action = (f"{self.action}; then measured {_size(prof.peak_bytes)} and timed the levers in the "
                       f"loop's own steps: applied the plan made from them ({plan_words(new)})")
        self._save_plan()
        self._check_live(peak_known=None)

    def _restore_first_plan(self) -> None:
        if self.handle is None and self.plan is not None:
            self.apply_plan(self.plan)

    def _calibration_unfinished(self) -> None:
        """The loop ended while it was being measured: the first plan stays, recorded as not verified."""

        self.calibration.remove()
        self._restore_first_plan()
        if self.plan is not None and self.check is None:
            r = LiveResult(self.budget_bytes, self.plan.predicted_peak_bytes,
                           self.profile.peak_bytes if self.estimate_applied else None, self.plan.predicted_overhead)
            r.moves.append("the loop ended while its steps were measured for planning")
            self.verified(r)



def _size(n: int) -> str:

    return format_bytes(n)


def _fit_uniform(names, model_costs, ratios: dict, base_ms: float, reps: int, pairs: dict):
    """Each mode's per-unit costs from its every-unit configuration: the measured extra time shared among the
    units in proportion to the profile's modelled costs (recomputed forward work), equally if none."""

    extra: dict = {}
    for mode, rs in ratios.items():
        total = max(0.0, (statistics.median(rs) - 1) * base_ms)
        weights = {u: model_costs[u].get(mode, 0.0) for u in names}
        wsum = sum(weights.values())
        extra[mode] = {u: total * (weights[u] / wsum if wsum else 1.0 / len(names)) for u in names}
    return OptionCosts(base_ms, extra, reps, pairs)


def _precision_plan(session, precision: str):
    """A plan that changes only the precision (nothing checkpointed)."""

    return replace(uniform_plan([], "keep"), precision=precision)


def variant_plan(v: StepVariant, precision: str):
    """A plan that runs the step as ``v`` in ``precision`` (nothing checkpointed): the loss head chunked."""

    return replace(uniform_plan([], "keep"), precision=precision, levers=("checkpoint", *v.levers),
                   loss_head_chunk_tokens=v.loss_head_chunk_tokens)
