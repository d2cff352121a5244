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

from memprof.policy.timing import CACHING_MALLOC_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


# By default glibc returns every large block to the kernel at once (mmap/munmap), and the kernel zeroes each
# page again on its first touch next step: on the GPT-2-small CPU step that is ~330k page faults and a third
# of the step, in system time that varies with how much memory a configuration touches. Checkpointing a block
# then changes the page faults as well as adding a recomputation, and block costs stop adding up
# (results/checkpoint-costs-default-malloc.json). The timing experiments run with CACHING_MALLOC instead.
CACHING_MALLOC = CACHING_MALLOC_ENV
MALLOC_HELP = "time under glibc's default malloc (default: re-run with CACHING_MALLOC, see experiments/_common.py)"


def _glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def _caching() -> bool:
    return all(os.environ.get(k) == v for k, v in CACHING_MALLOC.items())


def use_caching_malloc(default_malloc: bool = False) -> None:
    """Re-run this experiment with :data:`CACHING_MALLOC` in its environment (glibc reads it at start), unless
    it is already there, the C library is not glibc, or the experiment was asked for the default allocator."""
    if default_malloc or not _glibc() or _caching():
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CACHING_MALLOC})


def malloc_setting() -> str:
    if not _glibc():
        return "not glibc"
    if _caching():
        return "glibc, caching: " + " ".join(f"{k}={v}" for k, v in CACHING_MALLOC.items())
    return "glibc, default"


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
        "malloc": malloc_setting(),
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


def gpt2_small_step():
    """The timing experiments' step: a GPT-2-small-shaped model (12 layers, d=768, 12 heads, vocab 50257,
    sequence 256, batch 2) with AdamW on CPU; returns ``(model, optimizer, (x, y), step)``."""
    from memprof.zoo import GPT, GPTConfig, gpt_batch

    cfg = GPTConfig(n_layer=12, n_embd=768, n_head=12, block_size=256, vocab_size=50257)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = gpt_batch(cfg, batch_size=2)

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, (x, y), step
