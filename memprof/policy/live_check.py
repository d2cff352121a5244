"""Proof inside the user's loop: a plan applied mid-training is measured, and replaced when it does not hold.

``@memprof.auto`` and ``memprof run --budget`` apply a plan to a training loop they do not own. A
:class:`LiveCheck` then watches the loop's optimizer steps (it wraps the optimizer's ``step`` on the instance,
so its work runs between steps, never inside torch's hook loops) and, step by step:

1. **peak** — tracks two applied steps (a :class:`~memprof.tracking.Tracker`, as the first steps were);
   skipped when the steps that were tracked first already ran with the plan;
2. **time** — times untracked steps, ``pairs`` pairs of one plain and one planned step in alternating order
   (the plan removed and applied again between steps), when the plain step may run (its peak, measured or
   estimated, fits the device); otherwise planned steps only, against the tracked steps before;
3. **decide** — the plan holds when the measured peak is within the budget and the measured overhead is at
   most ``max(25% of the predicted overhead, 5 points)`` above the predicted one, beyond twice its standard
   error. If the peak is over, the plan is made again for a budget lowered by the excess (and without the
   loss-head lever when the loop needed the chunked head's full logits after all, so chunking saved
   nothing); if the time is over and the plan changed precision, again without that precision, else without
   loss-head chunking if it chunks the head, else without the checkpoint mode it uses most; each new plan is
   checked the same way (at most ``max_attempts``). When nothing untried is
   left, the fastest plan measured within the budget is kept; when none was, the plain step is restored.
   Every move is reported through ``notify`` (stderr under ``memprof run``).

What was measured is kept in :attr:`LiveCheck.result` (a :class:`LiveResult`).

Known limits: steps are timed whole, from one optimizer step's end to the next (data loading, logging and
evaluation inside the loop add noise; the median of the pairs keeps it down); a loop that ends before the
check does leaves it unfinished (the result says so); one optimizer (the first that steps) sets the pace.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from .overrides import CallAfter

__all__ = ["LiveCheck", "LiveResult", "time_tolerance", "describe_plan", "plan_words"]


def time_tolerance(predicted_overhead: float) -> float:
    """How far above its predicted overhead a plan's measured overhead may be: max(25% of it, 5 points)."""
    return max(0.25 * abs(predicted_overhead), 0.05)


@dataclass
class LiveResult:
    """Predicted and measured figures of the plan finally kept, and what happened on the way."""

    budget_bytes: int
    predicted_peak_bytes: int = 0
    measured_peak_bytes: int | None = None
    predicted_overhead: float = 0.0
    measured_overhead: float | None = None
    overhead_stderr: float | None = None
    timed_pairs: int = 0
    interleaved: bool = False  # plain and planned steps alternated (else: against the steps tracked before)
    plain_step_ms: float | None = None
    planned_step_ms: float | None = None
    predicted_step_ms: float | None = None  # the plan's (its baseline x (1 + predicted overhead))
    moves: list = field(default_factory=list)  # one sentence per fallback
    finished: bool = False
    held: bool = False  # within the budget and the time tolerance
    reverted: bool = False  # no plan held: the plain step was restored

    def within_budget(self) -> bool:
        return self.measured_peak_bytes is not None and self.measured_peak_bytes <= self.budget_bytes

    def describe(self) -> str:
        """One line for the plan file and the profile."""
        if self.measured_peak_bytes is None and not self.finished:
            return "not verified: the loop ended before the applied steps were measured"
        words = [f"measured peak {self.measured_peak_bytes} bytes (predicted {self.predicted_peak_bytes})"
                 if self.measured_peak_bytes is not None else "applied peak not measured"]
        if self.measured_overhead is not None:
            how = "interleaved with plain steps" if self.interleaved else "against the tracked steps before"
            words.append(f"step-time overhead {self.measured_overhead:+.1%} (predicted {self.predicted_overhead:+.1%};"
                         f" {self.timed_pairs} untracked steps {how})")
        if self.reverted:
            words.append("no plan held: plain step restored")
        return "; ".join(words) + ("" if self.finished else " (unfinished)")


class LiveCheck:
    """Measure the applied plan over the next optimizer steps and fall back when it does not hold.

    ``session`` provides ``model``, ``plan``, ``handle`` (the applied plan), ``budget_bytes``, ``replan(budget,
    precisions)`` (a new plan or None), ``apply_plan(plan)``, ``remove_plan()``; ``plain_may_run`` says whether
    plain steps may be timed; ``peak_known`` is the applied peak already measured (or None).
    """

    def __init__(self, session, optimizer, *, notify, plain_may_run: bool, peak_known: int | None = None,
                 tracked_step_ms: float | None = None, pairs: int = 5, max_attempts: int = 3) -> None:
        self.session = session
        self.optimizer = optimizer
        self.notify = notify
        self.plain_may_run = plain_may_run
        self.pairs = pairs
        self.max_attempts = max_attempts
        self.attempts = 1
        self.tracked_step_ms = tracked_step_ms
        self.result = self._fresh_result()
        self.result.measured_peak_bytes = peak_known
        self._phase = "time" if peak_known is not None else "warm"
        self._tracker = None
        self._times: dict[str, list[float]] = {"plain": [], "planned": []}
        self._order: list[str] = []
        self._t_last: float | None = None
        self._step_hook: CallAfter | None = None
        self.tried: list = []  # (plan, its LiveResult) measured so far
        self.excluded_modes: set = set()
        self.excluded_levers: set = set()  # "loss-head" once a chunked head failed

    # -- wiring ----------------------------------------------------------------------------------------------
    def install(self) -> LiveCheck:
        def after_step():
            try:
                self._after_step()
            except Exception as e:  # the check must never break the user's training: stop checking, say why
                self.result.moves.append(f"live check stopped: {type(e).__name__}: {e}")
                self.result.finished = True
                self.notify(self.result.moves[-1])

        self._step_hook = CallAfter(self.optimizer, "step", after_step)
        return self

    def remove(self) -> None:
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self.optimizer = None

    @property
    def done(self) -> bool:
        return self.result.finished

    def _fresh_result(self) -> LiveResult:
        plan = self.session.plan
        moves = self.result.moves if hasattr(self, "result") else []
        return LiveResult(self.session.budget_bytes, plan.predicted_peak_bytes, None, plan.predicted_overhead,
                          moves=moves, predicted_step_ms=plan.predicted_step_ms or None)

    # -- the state machine, between steps --------------------------------------------------------------------
    def _after_step(self) -> None:
        now = time.perf_counter()
        if self.result.finished:
            return
        if self._phase == "warm":  # the first applied step (untracked) ran; track the next two
            from ..tracking.tracker import Tracker

            self._tracker = Tracker(steps=2, on_stop=self._peak_measured)
            self._phase = "peak"
            try:
                self._tracker.start()
            except Exception as e:  # e.g. the user's own tracker is running: time the plan, peak unmeasured
                self._tracker = None
                self.result.moves.append(f"applied peak not measured ({e})")
                self.notify(self.result.moves[-1])
                self._phase = "time"
        elif self._phase == "peak":
            return  # the tracker stops itself after two steps (_peak_measured)
        elif self._phase == "peaked":
            self._tracker = None
            if not self.result.within_budget():
                self._over_budget()
                return
            self._phase = "time"
            self._start_timing(now)
        elif self._phase == "time":
            if self._t_last is None:  # the applied peak came with the check (the tracked steps ran planned)
                if self.result.measured_peak_bytes is not None and not self.result.within_budget():
                    self._over_budget()
                    return
                self._start_timing(now)
                return
            kind = self._order[len(self._times["plain"]) + len(self._times["planned"])]
            self._times[kind].append(now - self._t_last)
            n = len(self._times["plain"]) + len(self._times["planned"])
            if n >= len(self._order):
                self._decide()
                return
            self._set(self._order[n])
            self._t_last = time.perf_counter()

    def _peak_measured(self, tracker) -> None:  # inside the tracker's stop: only record
        prof = tracker.profile
        steps = [s for s in prof.steps if s.micro_batches]
        self.result.measured_peak_bytes = max((s.peak_bytes for s in steps), default=prof.peak_bytes)
        self._phase = "peaked"

    def _start_timing(self, now: float) -> None:
        if self.plain_may_run:
            base = ["plain", "planned", "planned", "plain"]
            self._order = (base * ((self.pairs + 1) // 2))[: 2 * self.pairs]
        else:
            self._order = ["planned"] * self.pairs
        self._times = {"plain": [], "planned": []}
        self._set(self._order[0])
        self._t_last = time.perf_counter()

    def _set(self, kind: str) -> None:
        applied = self.session.handle is not None
        if kind == "plain" and applied:
            self.session.remove_plan()
        elif kind == "planned" and not applied:
            self.session.apply_plan(self.session.plan)

    def _decide(self) -> None:
        self._set("planned")
        r = self.result
        planned = self._times["planned"]
        r.planned_step_ms = statistics.median(planned) * 1e3
        if self.plain_may_run and self._times["plain"]:
            plain = self._times["plain"]
            ratios = [a / b for a, b in zip(planned, plain)]
            r.measured_overhead = statistics.median(ratios) - 1
            r.plain_step_ms = statistics.median(plain) * 1e3
            r.interleaved = True
            r.timed_pairs = len(ratios)
            if len(ratios) > 1:
                from .timing import median_stderr

                r.overhead_stderr = median_stderr(ratios)
        elif self.tracked_step_ms:
            r.measured_overhead = r.planned_step_ms / self.tracked_step_ms - 1
            r.timed_pairs = len(planned)
        plan = self.session.plan
        self.tried.append((plan, r))
        margin = 2 * r.overhead_stderr if r.overhead_stderr is not None else 0.0  # slower beyond the noise
        if r.measured_overhead is not None and r.measured_overhead - margin - plan.predicted_overhead > \
                time_tolerance(plan.predicted_overhead):
            self._too_slow()
            return
        r.held = True
        r.finished = True
        self.session.verified(r)

    # -- fallbacks -------------------------------------------------------------------------------------------
    def _over_budget(self) -> None:
        r = self.result
        excess = r.measured_peak_bytes - r.predicted_peak_bytes
        lower = self.session.plan.budget_bytes - max(excess, 1)
        why = (f"measured peak {r.measured_peak_bytes} bytes is over the budget of {r.budget_bytes} "
               f"(predicted {r.predicted_peak_bytes})")
        materialised = getattr(self.session, "loss_head_materialised", lambda: 0)()
        if self.session.plan.loss_head_chunk_tokens and materialised:  # chunking saved nothing: plan without it
            self.excluded_levers.add("loss-head")
            why += f" (the loop needed the chunked head's full logits in {materialised} call(s))"
        self._move(why, lower, None, precision_failed=False)

    def _too_slow(self) -> None:
        r, plan = self.result, self.session.plan
        words = (f"measured step-time overhead {r.measured_overhead:+.1%} is above the predicted "
                 f"{plan.predicted_overhead:+.1%} by more than {time_tolerance(plan.predicted_overhead):.0%}")
        base = self.session.base_precision
        if plan.precision != base:
            self._move(words + f" ({plan.precision} is slow on this device)", plan.budget_bytes, (base,))
            return
        if plan.loss_head_chunk_tokens and "loss-head" not in self.excluded_levers and \
                self.attempts < self.max_attempts:
            self.excluded_levers.add("loss-head")
            self._move(words + " (the chunked loss head costs more here than measured before)", plan.budget_bytes,
                       None, precision_failed=False)
            return
        modes = [c.mode for c in plan.checkpoint if c.mode != "keep"]
        slow = max(set(modes), key=modes.count) if modes else None
        if slow is not None and slow not in self.excluded_modes and self.attempts < self.max_attempts:
            self.excluded_modes.add(slow)
            self._move(words + f" ({slow} checkpointing costs more here than modelled)", plan.budget_bytes, None,
                       precision_failed=False)
            return
        self._keep_fastest(words, held_only=False)

    def _keep_fastest(self, why: str, held_only: bool) -> None:
        """No untried plan is left: keep the fastest measured one within the budget (that held, if asked)."""
        fits = [(p, r) for p, r in self.tried if r.within_budget() and r.planned_step_ms is not None
                and (r.held or not held_only)]
        plan, best = min(fits, key=lambda pr: pr[1].planned_step_ms) if fits else (self.session.plan, self.result)
        best.moves = self.result.moves
        if plan is not self.session.plan:
            self.session.remove_plan()
            self.session.apply_plan(plan)
            self.session.plan = plan
            best.moves.append(f"{why}; kept the fastest plan measured: {describe_plan(plan)}")
        else:
            best.moves.append(f"{why}; no faster plan fits the budget: kept")
        self.notify(best.moves[-1])
        best.finished = True
        self.result = best
        self.session.verified(best)

    def _move(self, why: str, budget_bytes: int, precisions, precision_failed: bool = True) -> None:
        """Plan again and check the new plan; with nothing left, keep the fastest plan that held (or, when
        only a precision's time failed, any within the budget), else restore the plain step."""
        r = self.result
        without = {"without_levers": tuple(sorted(self.excluded_levers))} if self.excluded_levers else {}
        new = (self.session.replan(budget_bytes, precisions, tuple(self.excluded_modes), **without)
               if self.attempts < self.max_attempts else None)
        if new is None and any(t.within_budget() and (t.held or not precision_failed) for _, t in self.tried):
            self._keep_fastest(why, held_only=precision_failed)
            return
        if new is None:
            self.session.remove_plan()  # session.plan stays: the record of what was tried, marked reverted
            refusal = getattr(self.session, "replan_refusal", "")
            r.moves.append(f"{why}; no other plan fits ({refusal or 'no attempts left'}): reverted to the plain "
                           "step")
            r.reverted = True
            r.finished = True
            self.notify(r.moves[-1])
            self.session.verified(r)
            return
        self.attempts += 1
        self.session.remove_plan()
        self.session.apply_plan(new)
        self.session.plan = new
        r.moves.append(f"{why}; moved to: {describe_plan(new)}")
        self.notify(r.moves[-1])
        self.result = self._fresh_result()
        self._phase = "warm"
        self._t_last = None


def describe_plan(plan) -> str:
    modes = [c.mode for c in plan.checkpoint]
    head = f", loss head chunked by {plan.loss_head_chunk_tokens} tokens" if plan.loss_head_chunk_tokens else ""
    return (f"{plan.precision}, {modes.count('full')} full and {modes.count('selective')} selective checkpoints"
            f"{head}, predicted peak {plan.predicted_peak_bytes} bytes, {plan.predicted_overhead:+.1%} step time")


def plan_words(plan) -> str:
    """What a plan applies, in a few words (the session's action line)."""
    modes = [c.mode for c in plan.checkpoint]
    head = f", loss head chunked by {plan.loss_head_chunk_tokens} tokens" if plan.loss_head_chunk_tokens else ""
    return f"{modes.count('full')} full, {modes.count('selective')} selective checkpoints, {plan.precision}{head}"
