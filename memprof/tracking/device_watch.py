"""The devices a tracker watches (:class:`DeviceWatch`): which one is "the device", its allocator's peak
counters, the rehearsed device-memory limit, and the facts a profile built later takes as of the stop.

* Where CUDA runs at start, the caching allocator's peaks are folded per op from the start (the
  :class:`~.devices.CudaPeakFolder`); a CUDA storage seen first inside the block (a script that initialises
  CUDA there, as under ``memprof run``) starts them then, and CUDA op workspaces are measured from then on
  (noted: module times stay host wall-clock times).
* On a machine with a GPU the rehearsed device is the GPU, also before the block's first CUDA tensor (a model
  built on the host and moved): host storages never count against the limit there.
* Going over the rehearsed limit raises :class:`~memprof.errors.DeviceMemoryExceeded` once, saying where.
* At stop each CUDA device's name, capacity, NVML's view and the allocator's peaks are read
  (:meth:`DeviceWatch.read_cuda_facts`).

Limits: estimated runs and runs on a given clock never read a real device; without a GPU (or a driver) the
CUDA facts are empty.
"""

from __future__ import annotations

import torch

from ..categories import PHASES
from ..errors import DeviceMemoryExceeded
from ..units import format_bytes
from .devices import CudaPeakFolder, cuda_available, cuda_device_facts
from .scratch import ScratchCalibrator

__all__ = ["DeviceWatch", "cuda_in_use", "start_peak_counters"]


def cuda_in_use(clock=None) -> bool:
    """Whether CUDA runs now (and times are not taken from a given clock): module times are CUDA events and
    the allocator's peaks are read from the start."""
    return clock is None and cuda_available() and torch.cuda.is_initialized()


def start_peak_counters() -> CudaPeakFolder:
    folder = CudaPeakFolder()
    for i in range(torch.cuda.device_count()):
        folder.start(i)
    return folder


class DeviceWatch:
    """The devices of one tracker. ``cuda_folder``: the allocator's peak counters started at start (None:
    CUDA did not run then); ``device_memory``: the rehearsed limit in bytes (None: none); ``phases``: the
    phase machine (the step a limit is reached in)."""

    def __init__(self, ledger, notes: set, phases, *, cuda_folder, device_memory: int | None, clock,
                 estimated: bool) -> None:
        self.ledger = ledger
        self.notes = notes
        self.phases = phases
        self.cuda_folder = cuda_folder
        self.device_memory = device_memory
        self.clock = clock
        self.estimated = estimated
        self.limit_exc: DeviceMemoryExceeded | None = None
        # On a machine with a GPU the rehearsed device is the GPU, also before the block's first CUDA tensor
        # (a model built on the host and moved): host storages never count against the limit there.
        ledger.accel = clock is None and not estimated and cuda_available()

    def disconnect(self) -> None:
        """Drop the references that tie a finished tracker's parts into cycles."""
        self.phases = None

    def new_device(self, name: str) -> None:
        """A CUDA storage seen while CUDA was not initialised at start (a script that initialises it inside
        the block, as under ``memprof run``): read the caching allocator's peaks, and measure CUDA ops'
        workspaces, from now on. Module times stay host wall-clock times."""
        if (not name.startswith("cuda") or self.cuda_folder is not None or self.clock is not None
                or self.estimated or not cuda_available()):
            return
        self.cuda_folder = start_peak_counters()
        if isinstance(self.ledger.calibrator, ScratchCalibrator):
            self.ledger.calibrator.use_cuda(self.cuda_folder)
        self.notes.add("CUDA was initialised inside the tracked block: the allocator's peaks count from its "
                       "first tensor, and module times are host wall-clock times, not CUDA events")

    def over_limit(self, func) -> None:
        led = self.ledger
        led.limit_bytes = None  # raise once: unwinding the step runs more ops while memory is still over
        cur = led.cur.name if led.cur is not None else ""
        where = f"module {cur!r}" if cur else "outside any module"
        self.limit_exc = DeviceMemoryExceeded(
            f"tracked memory would reach {format_bytes(led.limited_total())}, over the device memory of "
            f"{format_bytes(self.device_memory)}, at {func} in {where}, {PHASES[led.phase]} phase of step "
            f"{self.phases.step_index}", op=str(func), capacity_bytes=self.device_memory
        )
        raise self.limit_exc

    def read_cuda_facts(self) -> dict:
        """What a profile built later must take as of now: each CUDA device's name and capacity, NVML's view,
        and the caching allocator's peaks over the tracked block."""
        facts = {}
        if not cuda_available():
            return facts
        for name in self.ledger.devices:
            if name.startswith("cuda"):
                index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
                f = cuda_device_facts(index)
                if self.cuda_folder is not None and not self.estimated:
                    f["allocator"] = self.cuda_folder.summary(index)
                facts[name] = f
        return facts
