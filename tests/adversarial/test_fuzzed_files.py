"""Acceptance 2 of issue "hardened": mutated real profiles and plans load or fail with a MemprofError, and
whatever loads renders through report (text, markdown, csv, json, HTML), plot, diff and plan.

The files are made once per session from small real runs (``tests.adversarial.fuzzing.corpus``); each example
is a file name and a seed of ``fuzzing.mutate_text`` (a failure names both, to replay it). The example
count is ``MEMPROF_FUZZ_EXAMPLES`` (default 2,000; the drawn-figure test uses a twentieth of it, as drawing a
figure costs ~0.5 s); experiments/robustness.py runs more.
"""

import functools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memprof
from tests.adversarial import fuzzing

EXAMPLES = int(os.environ.get("MEMPROF_FUZZ_EXAMPLES", "2000"))
NAMES = ("tracked.json", "estimated.json", "plan.toml")
_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@functools.lru_cache(maxsize=1)
def _good(path):
    return memprof.load(path)


def _mutated(real_files, tmp_path_factory, name, rnd):
    folder = tmp_path_factory.getbasetemp() / "fuzzed"
    folder.mkdir(exist_ok=True)
    path = folder / f"m{os.path.splitext(name)[1]}"
    path.write_text(fuzzing.mutate_text(name, real_files[name].read_text(), rnd), encoding="utf-8")
    return path, folder


@pytest.mark.slow
@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32 - 1))
def test_mutated_files_load_or_fail_cleanly_and_render_everywhere(real_files, tmp_path_factory, name, seed):
    path, folder = _mutated(real_files, tmp_path_factory, name, random.Random(seed))
    problem = fuzzing.check_file(path, _good(real_files["tracked.json"]), folder, draw=False)
    assert problem is None, f"{name}, seed {seed}: {problem}"


@pytest.mark.slow
@settings(max_examples=max(EXAMPLES // 20, 20), **_SETTINGS)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32 - 1))
def test_mutated_files_that_load_are_drawn_as_png_and_html(real_files, tmp_path_factory, name, seed):
    path, folder = _mutated(real_files, tmp_path_factory, name, random.Random(seed))
    problem = fuzzing.check_file(path, _good(real_files["tracked.json"]), folder, draw=True)
    assert problem is None, f"{name}, seed {seed}: {problem}"


def test_the_unmutated_real_files_render_everywhere(real_files, tmp_path):
    for name in NAMES:
        assert fuzzing.check_file(real_files[name], _good(real_files["tracked.json"]), tmp_path, draw=True) is None
