"""Shared bits of the experiments: where results go and the environment every result file records."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's per-session log lines

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def environment() -> dict:
    from memprof._version import __version__
    from memprof.tracking.devices import cpu_name, cuda_available

    env = {
        "memprof_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cuda_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=1) + "\n")
    return path
