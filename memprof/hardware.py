"""Accelerators memprof knows by name: memory capacities for "will it fit?" and spec-sheet speeds for the time model.

Totals are what ``nvidia-smi`` reports as total memory (MiB) for these boards in public listings — a little
less than the marketing size (an "80GB" H100 shows 81559 MiB). Pass ``device_memory=`` (or
``--device-memory``) for anything else, or when your driver reports another total. :func:`host_spec`
measures this machine's CPU once per process, for estimates of CPU steps.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import MemprofError
from .units import parse_size

__all__ = ["DEVICES", "SPECS", "DeviceSpec", "device_capacity", "resolve_capacity", "device_spec", "host_spec"]

MiB = 1024**2


@dataclass(frozen=True)
class DeviceSpec:
    """Dense peak throughput (no sparsity) and memory bandwidth, from vendor spec sheets."""

    name: str
    bf16_tflops: float  # tensor-core bf16/fp16 with fp32 accumulation
    fp32_tflops: float  # plain fp32 (PyTorch does not use TF32 for matmuls by default)
    bandwidth_gbs: float  # memory bandwidth, GB/s


SPECS: dict[str, DeviceSpec] = {s.name: s for s in [
    DeviceSpec("H100-80GB", 989.0, 67.0, 3350.0),
    DeviceSpec("H200-141GB", 989.0, 67.0, 4800.0),
    DeviceSpec("A100-40GB", 312.0, 19.5, 1555.0),
    DeviceSpec("A100-80GB", 312.0, 19.5, 2039.0),
    DeviceSpec("L4-24GB", 121.0, 30.3, 300.0),
    DeviceSpec("L40S-48GB", 362.0, 91.6, 864.0),
    DeviceSpec("A10G-24GB", 70.0, 31.2, 600.0),
    DeviceSpec("RTX4090-24GB", 165.0, 82.6, 1008.0),
    DeviceSpec("RTX3090-24GB", 71.0, 35.6, 936.0),
    DeviceSpec("V100-16GB", 125.0, 15.7, 900.0),
    DeviceSpec("V100-32GB", 125.0, 15.7, 900.0),
]}


def device_spec(name: str) -> DeviceSpec:
    """Throughput of a named device (H100-80GB when the name is unknown or empty: a common default)."""
    for key, spec in SPECS.items():
        if key.lower() == (name or "").lower():
            return spec
    return SPECS["H100-80GB"]


_HOST: DeviceSpec | None = None


def host_spec() -> DeviceSpec:
    """This machine's CPU, measured once per process: a float32 matmul and a large copy (~0.2 s)."""
    global _HOST
    if _HOST is None:
        import time

        import torch

        a = torch.randn(512, 512)
        big = torch.empty(16 * MiB // 4)
        best_mm = best_copy = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ a
            best_mm = min(best_mm, (time.perf_counter() - t0) / 4)
            t0 = time.perf_counter()
            big.clone()
            best_copy = min(best_copy, time.perf_counter() - t0)
        tflops = 2 * 512**3 / best_mm / 1e12
        _HOST = DeviceSpec("cpu", bf16_tflops=tflops, fp32_tflops=tflops, bandwidth_gbs=2 * big.nbytes / best_copy / 1e9)
    return _HOST

DEVICES: dict[str, int] = {
    "H100-80GB": 81559 * MiB,
    "H200-141GB": 143771 * MiB,
    "A100-40GB": 40960 * MiB,
    "A100-80GB": 81920 * MiB,
    "L4-24GB": 23034 * MiB,
    "L40S-48GB": 46068 * MiB,
    "A10G-24GB": 23028 * MiB,
    "RTX4090-24GB": 24564 * MiB,
    "RTX3090-24GB": 24576 * MiB,
    "V100-16GB": 16384 * MiB,
    "V100-32GB": 32768 * MiB,
}


def device_capacity(name: str) -> int:
    for key, value in DEVICES.items():
        if key.lower() == name.lower():
            return value
    close = difflib.get_close_matches(name.upper(), list(DEVICES), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(DEVICES)}"
    raise MemprofError(f"unknown device {name!r}{hint} (or give a size such as --device-memory 24GiB)")


def resolve_capacity(device_memory) -> tuple[str, int | None]:
    """``(device name or "", capacity bytes)`` from a device name, a size string, bytes, or ``None``."""
    if device_memory is None:
        return "", None
    if isinstance(device_memory, str) and device_memory.strip() and device_memory.strip()[0].isalpha():
        return _canonical(device_memory), device_capacity(device_memory)
    return "", parse_size(device_memory)


def _canonical(name: str) -> str:
    for key in DEVICES:
        if key.lower() == name.lower():
            return key
    return name
