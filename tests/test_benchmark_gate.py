"""The benchmark gate fails on a regression: pytest-benchmark's compare against a stored baseline, as the
README's benchmark command runs it (tests/benchmarks against tests/benchmarks/baseline)."""

import os
import subprocess
import sys

import pytest

BENCH = """
import os, time

def test_sleep(benchmark):
    benchmark.pedantic(time.sleep, args=(float(os.environ["NAP"]),), rounds=3, iterations=1)
"""


def _run(tmp_path, nap: float, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "test_bench.py",
         "--benchmark-only", f"--benchmark-storage=file://{tmp_path / 'store'}", *extra],
        cwd=tmp_path, env={**os.environ, "NAP": str(nap)}, capture_output=True, text=True)


@pytest.mark.slow
def test_a_step_slower_than_the_stored_baseline_fails_the_comparison_and_an_equal_one_passes(tmp_path):
    (tmp_path / "test_bench.py").write_text(BENCH)
    saved = _run(tmp_path, 0.02, "--benchmark-save=baseline")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    gate = ("--benchmark-compare", "--benchmark-compare-fail=median:25%")
    slower = _run(tmp_path, 0.2, *gate)
    assert slower.returncode != 0 and "Performance has regressed" in slower.stdout + slower.stderr
    same = _run(tmp_path, 0.02, *gate)
    assert same.returncode == 0, same.stdout + same.stderr
