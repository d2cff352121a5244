"""``torchrun ... -m memprof run SCRIPT`` on 2 gloo ranks: one profile per rank, and rank 0 sums them up.

The script (``tests/fixtures/ddp_script.py``) is plain DDP that knows nothing about memprof and destroys
its process group before it ends, so each rank's rank and world size must come from torchrun's
environment. Its ranks train on different batch sizes, so their peaks differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import memprof
from memprof.units import format_bytes
from tests.distributed.launch import free_port

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
DDP_SCRIPT = REPO / "tests" / "fixtures" / "ddp_script.py"


def test_torchrun_writes_a_profile_per_rank_and_rank0_prints_all_ranks(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", KINETO_LOG_LEVEL="6")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "memprof", "run", "--out", str(tmp_path / "p.json"),
           str(DDP_SCRIPT)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # The script's own output (two processes share stdout: lines may interleave).
    assert "rank 0: trained" in proc.stdout and "rank 1: trained" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.rank0.json", "p.rank1.json"]
    profiles = [memprof.load(tmp_path / f"p.rank{r}.json") for r in range(2)]
    for rank, prof in enumerate(profiles):
        assert (prof.environment.rank, prof.environment.world_size) == (rank, 2)
        assert len(prof.steps) == 2
    # rank 1's batch is twice rank 0's: more input memory (the same parameters on both)
    assert profiles[1].modules[""].param_bytes == profiles[0].modules[""].param_bytes
    assert profiles[1].peak.by_category["input"] > profiles[0].peak.by_category["input"]

    err = proc.stderr
    assert err.count("Peak per rank (2 ranks)") == 1  # only rank 0 prints it
    table = err[err.index("Peak per rank"):].splitlines()
    for rank, prof in enumerate(profiles):
        row = next(line for line in table if line.split()[:1] == [str(rank)])
        assert format_bytes(prof.peak_bytes) in row and f" {prof.peak.phase} " in row
    assert f"memprof: profiles written to {tmp_path / 'p.rank0.json'}, {tmp_path / 'p.rank1.json'}" in err
