"""Device facts: CUDA caching-allocator counters, NVML (the driver's view), and host memory for CPU runs.

Everything here degrades cleanly: without CUDA the CUDA helpers return nothing, and without an NVIDIA driver
:func:`nvml_devices` raises :class:`DeviceUnavailableError` with a one-line reason (``nvmlInit`` raises
``NVMLError_LibraryNotFound`` there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import DeviceUnavailableError

__all__ = [
    "cuda_available",
    "CudaPeakFolder",
    "host_memory_bytes",
    "cpu_name",
    "NvmlDevice",
    "nvml_devices",
    "cuda_device_facts",
]

_PEAK_KEYS = {
    "allocated_peak": "allocated_bytes.all.peak",
    "reserved_peak": "reserved_bytes.all.peak",
    "active_peak": "active_bytes.all.peak",
    "inactive_split_peak": "inactive_split_bytes.all.peak",
}


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # broken driver installs raise here instead of returning False
        return False


class CudaPeakFolder:
    """Keeps the true allocator peaks of a run while ops are calibrated with ``reset_peak_memory_stats``."""

    def __init__(self) -> None:
        self.peaks: dict[int, dict[str, int]] = {}

    def start(self, index: int) -> None:
        torch.cuda.reset_peak_memory_stats(index)
        self.peaks.setdefault(index, dict.fromkeys(_PEAK_KEYS, 0))

    def fold(self, index: int) -> None:
        stats = torch.cuda.memory_stats(index)
        mine = self.peaks.setdefault(index, dict.fromkeys(_PEAK_KEYS, 0))
        for k, key in _PEAK_KEYS.items():
            mine[k] = max(mine[k], int(stats.get(key, 0)))

    def measure(self, func, args, kwargs, device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.fold(index)
        torch.cuda.reset_peak_memory_stats(index)
        before = torch.cuda.memory_allocated(index)
        out = func(*args, **kwargs)
        after = torch.cuda.memory_allocated(index)
        peak = torch.cuda.max_memory_allocated(index)
        self.fold(index)
        return out, max(0, (peak - before) - (after - before))

    def summary(self, index: int) -> dict[str, int]:
        self.fold(index)
        return dict(self.peaks[index])


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class NvmlDevice:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[tuple[int, int | None], ...]  # (pid, used bytes or None when the driver hides it)


_NVML: list = []  # [pynvml] once initialised, or [why not] once it could not be


def _nvml():
    """pynvml, initialised once per process: ``nvmlInit`` takes tens of milliseconds, and the tracker asks
    NVML at the end of every tracked block on a GPU."""
    if not _NVML:
        try:
            import pynvml
        except ImportError:
            _NVML.append("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
        else:
            try:
                pynvml.nvmlInit()
                _NVML.append(pynvml)
            except pynvml.NVMLError as e:
                _NVML.append(f"no NVIDIA driver available (NVML: {e})")
    if isinstance(_NVML[0], str):
        raise DeviceUnavailableError(_NVML[0])
    return _NVML[0]


def nvml_devices() -> list[NvmlDevice]:
    """Every GPU the driver sees, with memory in use and the processes using it."""
    pynvml = _nvml()
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                procs = tuple((p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h))
            except pynvml.NVMLError:
                procs = ()
            out.append(NvmlDevice(i, name, int(mem.total), int(mem.used), int(mem.free), procs))
    except pynvml.NVMLError as e:
        raise DeviceUnavailableError(f"NVML could not read the devices: {e}") from None
    return out


def cuda_device_facts(index: int) -> dict:
    """Name and capacity of a CUDA device, plus NVML's total/used where a driver answers."""
    props = torch.cuda.get_device_properties(index)
    facts = {"name": props.name, "capacity_bytes": int(props.total_memory)}
    try:
        pynvml = _nvml()
        mem = pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(pynvml, props, index))
        facts["nvml_total_bytes"] = int(mem.total)
        facts["nvml_used_bytes"] = int(mem.used)
    except Exception:  # DeviceUnavailableError, pynvml.NVMLError: the facts stay without NVML's view
        pass
    return facts


def _nvml_handle(pynvml, props, index: int):
    """NVML's handle of CUDA device ``index``: by PCI bus id where torch gives it (CUDA_VISIBLE_DEVICES
    renumbers CUDA's devices, not NVML's), else by index."""
    try:
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except (AttributeError, pynvml.NVMLError):
        return pynvml.nvmlDeviceGetHandleByIndex(index)
