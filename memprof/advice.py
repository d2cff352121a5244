"""Advice read off a profile that no lever applies: the CUDA caching allocator's setting.

When a CUDA profile shows the caching allocator holding much more than the tensors need at its peak
(``reserved - allocated``, from ``torch.cuda.memory_stats`` peaks the tracker records per device),
:func:`allocator_advice` recommends ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, which maps memory
in growable segments instead of fixed blocks and so returns most of that slack (public reports: -24% to
-34% reserved). The bytes are an upper bound: the allocated and reserved peaks need not be simultaneous,
and expandable segments still round to 2 MiB pages. Torch-free: it reads the profile's numbers only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .units import format_bytes

__all__ = ["AllocatorAdvice", "allocator_advice", "EXPANDABLE", "MIN_SLACK_BYTES", "MIN_SLACK_FRACTION"]

EXPANDABLE = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
MIN_SLACK_BYTES = 256 * 2**20  # below this the setting is not worth a line
MIN_SLACK_FRACTION = 0.05  # of the reserved peak


@dataclass(frozen=True)
class AllocatorAdvice:
    """One device's allocator slack and the setting that returns it."""

    device: str
    reserved_peak_bytes: int
    allocated_peak_bytes: int
    setting: str = EXPANDABLE

    @property
    def slack_bytes(self) -> int:
        """Reserved but not allocated at the peaks: at most what the setting returns."""
        return self.reserved_peak_bytes - self.allocated_peak_bytes

    def sentence(self) -> str:
        share = self.slack_bytes / self.reserved_peak_bytes
        return (f"{self.device}: the CUDA caching allocator reserved {format_bytes(self.reserved_peak_bytes)} "
                f"for a peak of {format_bytes(self.allocated_peak_bytes)} allocated; setting {self.setting} "
                f"returns up to {format_bytes(self.slack_bytes)} ({share:.0%} of reserved)")


def allocator_advice(profile, *, alloc_conf: str | None = None, min_bytes: int = MIN_SLACK_BYTES,
                     min_fraction: float = MIN_SLACK_FRACTION) -> list[AllocatorAdvice]:
    """Advice for each CUDA device of ``profile`` whose allocator slack is at least ``min_bytes`` and
    ``min_fraction`` of its reserved peak; none where ``alloc_conf`` (the run's ``PYTORCH_CUDA_ALLOC_CONF``,
    when known) already enables expandable segments."""
    if alloc_conf and "expandable_segments:true" in alloc_conf.replace(" ", "").lower():
        return []
    out = []
    for dev in profile.devices:
        if not dev.device.startswith("cuda"):
            continue
        reserved = dev.allocator.get("reserved_peak")
        allocated = dev.allocator.get("allocated_peak")
        if not isinstance(reserved, int) or not isinstance(allocated, int) or reserved <= 0:
            continue
        advice = AllocatorAdvice(dev.device, reserved, allocated)
        if advice.slack_bytes >= min_bytes and advice.slack_bytes >= min_fraction * reserved:
            out.append(advice)
    return out
