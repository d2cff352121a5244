"""Activation offload in the estimator: saved tensors of offloaded units counted on the host, not the device.

:mod:`memprof.activation_offload` copies an offloaded unit's saved tensors to the host in forward and
back to the device in backward. On a PyTorch build without CUDA the estimator emulates CUDA on CPU tensors,
where both copies would be no-ops (the tensors are already "on the host"), so the device would keep them all.
:class:`HostActivations` is the copies the estimator uses instead (:func:`~memprof.activation_offload.
copies_used`, for every estimate of a CUDA device):

* every saved tensor that is not a parameter or buffer moves (all tensors of the emulated device are the
  device's);
* the host copy is a real copy, set aside from the device's count as it is made
  (:meth:`memprof.tracking.ledger.Ledger.set_aside`) and counted on device ``"cpu"``; the device's storage it
  was copied from is freed when the step drops it, as in a real run;
* the copy back in backward is a real copy: a device allocation of the tensor's size.

Host bytes: ``peak_bytes``, the most that offloaded activations held on the host at once (pinned memory's
rounding by the CUDA host allocator is not modelled). The copies are ops of the fake step, so the modelled
clock prices them as device memory traffic; the planner prices the host link apart
(:mod:`memprof.policy.chain`).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from ..activation_offload import HostCopies, copies_used

__all__ = ["HostActivations"]


class HostActivations(HostCopies):
    """The estimator's copies: ``bind(tracker)`` once the tracker runs. ``emulated``: CUDA on CPU kernels
    (the host copy is a clone); else fake CUDA tensors (the host copy is ``.to("cpu")``)."""

    def __init__(self, emulated: bool) -> None:
        self.emulated = emulated
        self.live_bytes = 0  # offloaded activations on the host now
        self.peak_bytes = 0  # ... at their most
        self.copied_bytes = 0  # bytes copied to the host (each comes back once in backward)
        self._ledger = None

    @classmethod
    def installed(cls, stack, emulated: bool) -> HostActivations:
        """Copies for every offloaded unit of an estimate, until ``stack`` (an ExitStack) closes."""
        copies = cls(emulated=emulated)
        stack.enter_context(copies_used(copies))
        return copies

    def noted(self, prof, extra: dict, steps: int, host_counted: bool):
        """``prof`` with the host's peak on its ``cpu`` device (unless FSDP's offload counts the host:
        ``host_counted``), and the assumptions in ``extra``; as it was if nothing was offloaded."""
        if not self.copied_bytes:
            return prof
        extra["activation_host_peak_bytes"] = str(self.peak_bytes)
        extra["activation_host_copied_bytes"] = str(self.copied_bytes)
        extra["activation_offload"] = (
            f"saved tensors of offloaded units on the host: {self.peak_bytes} bytes at their most, "
            f"{self.copied_bytes} copied each way per run of {steps} step(s); not counted on the device"
            + ("; host-device copies emulated as copies on the CPU kernels" if self.emulated else ""))
        if host_counted:
            return prof
        return dataclasses.replace(prof, devices=tuple(
            dataclasses.replace(d, peak_bytes=self.peak_bytes) if d.device == "cpu" else d for d in prof.devices))

    def bind(self, tracker) -> None:
        self._ledger = tracker.ledger

    def unbind(self) -> None:
        self._ledger = None

    def moves(self, t: torch.Tensor) -> bool:
        return True if self.emulated else t.device.type != "cpu"

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        led = self._ledger
        start = len(led.events) if led is not None else 0
        with torch.no_grad():
            host = t.clone(memory_format=torch.contiguous_format) if self.emulated else t.to("cpu")
        s = host.untyped_storage()
        nbytes = s.nbytes()
        if led is not None:
            rec = led.live.get(id(s))
            if rec is not None:
                led.set_aside([rec], since=start)
        self.copied_bytes += nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(s, self._freed, nbytes)
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            return host.clone() if self.emulated else host.to(device)

    def _freed(self, nbytes: int) -> None:
        self.live_bytes -= nbytes
