"""Several configurations of one model estimated at once, in worker processes (one per core, at most two).

The planner weighs up to twenty configurations of a model (precision x sharding x offload), each an estimate
of its own that runs on one core. :func:`prefetch` estimates the ones a source has not yet made in forked
worker processes and stores them in the source, so that the planner's own calls find them. A forked worker
starts from the planner's process as it is (imports, caches), and an estimate depends only on its model and
configuration, so its profile is the one the planner would have made itself (the test compares them).

Used only where forking is safe and pays: Linux, at least two usable cores, at least three estimates to make,
CUDA not initialised in this process, no ``torch.distributed`` job running, estimates of a CUDA device emulated
on CPU kernels (a CPU estimate measures op scratch on the real kernels: left to the planner's process).
Two workers by default when a core is free (the 1-minute load average below the usable cores less a half,
the planner's own process included), else none; ``MEMPROF_WORKERS=1`` turns them off and ``=2`` on whatever
the load. Measured on this project's 2-core host (results/estimate-speed.json): the README's plan example took
25.1 s with two workers against 40.5 s one after the other at a load of 1 (the experiment's own); at a load
of 3 it took 49.0 s against 37.5 s (each worker warms its own caches, and no core was free). A worker that fails gives nothing back: the planner then estimates that
configuration itself (and reports its error, if any).
"""

from __future__ import annotations

import os
import sys

from ..profiles import Profile

__all__ = ["prefetch", "workers_for"]

_SOURCE = None  # the source being prefetched, read by the forked workers
MAX_WORKERS = 2


def _default_workers(cores: int) -> int:
    """Two when a core is free (see the module's docstring), else one (none in parallel)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1
    return MAX_WORKERS if load < cores - 0.5 else 1


def workers_for(source, missing: int) -> int:
    """How many worker processes to use for ``missing`` estimates of ``source`` (0: none)."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        wanted = int(os.environ["MEMPROF_WORKERS"])
    except (KeyError, ValueError):
        wanted = _default_workers(cores)
    n = min(wanted, cores, MAX_WORKERS)
    if (n < 2 or missing < 3 or not sys.platform.startswith("linux") or source.device != "cuda"
            or torch.cuda.is_available() or torch.cuda.is_initialized()):
        return 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return 0
    return n


def _work(key):
    import torch

    torch.set_num_threads(1)  # fake tensors need no intra-op threads (and a forked OpenMP pool is not safe)
    try:
        return key, _SOURCE._estimate(*key).to_dict()
    except Exception:  # the planner estimates it again itself and reports the error
        return key, None


def prefetch(source, keys: list[tuple]) -> int:
    """Estimate the configurations ``keys`` (arguments of :meth:`EstimateSource.profile`) that ``source``
    has not made yet, one here and the rest in worker processes where that is safe (see the module);
    returns how many the workers made."""
    import multiprocessing


    global _SOURCE
    missing = [k for k in dict.fromkeys(keys) if not source.has(*k)]
    n = workers_for(source, len(missing) - 1)
    if not n:
        return 0
    # One sharded estimate here first: the workers start from its imports and caches instead of each
    # warming up on its own.
    first = next((k for k in missing if k[1] != "none"), missing[0])
    source.profile(*first)
    missing.remove(first)
    made = 0
    _SOURCE = source
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            for key, data in pool.imap_unordered(_work, missing):
                if data is not None:
                    source.store(key, Profile.from_dict(data))
                    made += 1
    except (OSError, multiprocessing.ProcessError):  # no workers: the planner estimates them itself
        return made
    finally:
        _SOURCE = None
    return made
