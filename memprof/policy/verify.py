"""Proof that a plan worked: apply it, measure again, and put prediction and measurement side by side."""

from __future__ import annotations

from dataclasses import dataclass

from ..tracking.tracker import Tracker
from ..units import format_bytes
from .apply import apply
from .timing import measure_overhead

__all__ = ["Verification", "verify"]


@dataclass(frozen=True)
class Verification:
    """A plan's predictions against what was measured with it applied (peak: tracker; time: untracked)."""

    budget_bytes: int
    predicted_peak_bytes: int
    measured_peak_bytes: int
    predicted_overhead: float
    measured_overhead: float | None  # None when not timed
    profile: object  # the profile measured with the plan applied

    @property
    def within_budget(self) -> bool:
        return self.measured_peak_bytes <= self.budget_bytes

    @property
    def peak_error(self) -> float:
        return self.measured_peak_bytes / self.predicted_peak_bytes - 1

    def rows(self) -> list[tuple[str, str, str]]:

        rows = [("peak", format_bytes(self.predicted_peak_bytes), format_bytes(self.measured_peak_bytes))]
        if self.measured_overhead is not None:
            rows.append(("step-time overhead", f"{self.predicted_overhead:+.1%}", f"{self.measured_overhead:+.1%}"))
        return rows


def verify(model, step, plan, *, optimizer=None, steps: int = 2, time_reps: int = 0) -> Verification:
    """Apply ``plan`` to ``model``, track ``steps`` calls of ``step()``, and (``time_reps`` > 0) time steps with
    and without the plan, interleaved and untracked. The model is left as it was."""

    with apply(model, plan, optimizer=optimizer):
        with Tracker(model, optimizer) as tracker:
            for _ in range(steps):
                step()
    overhead = measure_overhead(model, step, plan, reps=time_reps) if time_reps > 0 else None
    prof = tracker.profile
    return Verification(plan.budget_bytes, plan.predicted_peak_bytes, prof.peak_bytes, plan.predicted_overhead,
                        overhead, prof)
