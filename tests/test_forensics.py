"""Out-of-memory forensics: a rehearsal stops exactly where the real run peaks, and both a rehearsed and a
(simulated) CUDA out-of-memory error print what was live instead of a bare traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import memprof
from memprof import runner
from memprof.cli import main
from memprof.errors import DeviceMemoryExceeded
from memprof.forensics import failure_moment, find_oom, module_totals, render_oom
from memprof.profiles import TensorInfo
from memprof.units import format_bytes

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN_SCRIPT = FIXTURES / "train_script.py"
FAILING_SCRIPT = FIXTURES / "failing_script.py"

# batch 256 peaks in the first optimizer step (state is created); batch 2048 in the forward (activations)
BATCHES = {"optimizer-peak": "256", "activation-peak": "2048"}


def cli(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


@pytest.fixture(scope="module", params=list(BATCHES))
def real_and_rehearsed(request, tmp_path_factory):
    """The real run's profile, then the same run rehearsed on a device 1 byte smaller than its peak."""
    folder = tmp_path_factory.mktemp(request.param)
    args = ["--steps", "2", "--batch-size", BATCHES[request.param]]
    real = runner.run(str(TRAIN_SCRIPT), args, out=folder / "real.json").profile
    out = folder / "oom.json"
    result = cli("--device-memory", real.peak_bytes - 1, "--out", out, TRAIN_SCRIPT, *args)
    return real, result, memprof.load(out), out


def test_rehearsal_stops_at_the_real_peak(real_and_rehearsed):
    real, result, partial, _ = real_and_rehearsed
    assert result.exit_code == 1
    assert partial.peak_bytes == real.peak_bytes  # the allocation that would not fit is in it
    assert (partial.peak.step, partial.peak.phase, partial.peak.module) == (
        real.peak.step, real.peak.phase, real.peak.module)
    # Labels given after the moment (a grad once accumulated, state once its step ends) are not in the
    # partial profile; what was known then is.
    for category in ("param", "input"):
        assert partial.peak.by_category[category] == real.peak.by_category[category]


def test_rehearsal_report_names_what_was_live(real_and_rehearsed):
    real, result, partial, out = real_and_rehearsed
    err = result.stderr
    assert "Traceback" not in err and result.stdout.startswith("argv: ")
    title = f"Out of memory (rehearsed device memory of {format_bytes(real.peak_bytes - 1)})"
    assert err.startswith(title + "\n" + "=" * len(title))
    assert f"step {real.peak.step}, {real.peak.phase} phase" in err and "(op aten." in err
    assert f"over by {format_bytes(1)})" in err
    largest = real.peak.tensors[0]
    shape = "×".join(map(str, largest.shape))
    row = [line for line in err.splitlines() if line.lstrip().startswith(format_bytes(largest.bytes))
           and f" {shape} " in line]
    assert row and f" {largest.module or '(root)'} " in row[0] and f" {largest.category} " in row[0]
    assert "memprof: DeviceMemoryExceeded raised at tests/fixtures/train_script.py:" in err
    assert err.rstrip().endswith(f"memprof: partial profile written to {out}")


def test_simulated_cuda_oom_prints_the_report_not_a_traceback(tmp_path):
    out = tmp_path / "p.json"
    result = cli("--out", out, FAILING_SCRIPT, "--fail", "oom")
    assert result.exit_code == 1
    err = result.stderr
    assert "Traceback" not in err
    assert err.startswith("Out of memory (CUDA)\n")
    partial = memprof.load(out)
    moment = failure_moment(partial, find_oom(_cuda_oom()))
    assert (moment.step, moment.phase) == (1, "forward")  # raised in the second forward
    assert "Where        step 1, forward phase, in (root)\n" in err
    assert "Error        CUDA out of memory. Tried to allocate 2.00 GiB." in err
    assert "Requested    2.00 GiB more" in err
    assert f"Live         {format_bytes(moment.total_bytes)} tracked\n" in err
    assert f"Peak before  {format_bytes(partial.peak_bytes)} at step 0, backward phase" in err
    assert "Largest live tensors at the peak before" in err and "256×256" in err and "fc2.weight" in err
    assert "OutOfMemoryError raised at tests/fixtures/failing_script.py:29 in _maybe_oom" in err
    assert err.rstrip().endswith(f"memprof: partial profile written to {out}")


def _cuda_oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_find_oom_takes_the_innermost_error_of_the_chain():
    first = DeviceMemoryExceeded("tracked memory would reach 2 MiB, ... at aten.mm.default in module 'fc2', ...",
                                 op="aten.mm.default", capacity_bytes=1 << 20)
    again = DeviceMemoryExceeded("... at profiler._record_function_exit._RecordFunction ...")  # while unwinding
    again.__context__ = first
    wrapped = RuntimeError("training failed")
    wrapped.__cause__ = again
    assert find_oom(wrapped) == find_oom(first)
    assert find_oom(wrapped).error is first and find_oom(wrapped).kind == "rehearsal"
    assert find_oom(_cuda_oom()).kind == "cuda"
    assert find_oom(ValueError("x")) is None


def test_module_totals_sum_the_largest_tensors():
    def t(module, n):
        return TensorInfo(bytes=n, category="activation", module=module, phase="forward", shape=(n,),
                          dtype="uint8", device="cpu")

    assert module_totals((t("a", 5), t("b", 7), t("a", 4), t("", 1))) == [("a", 9, 2), ("b", 7, 1), ("", 1, 1)]


def test_render_oom_without_an_error_explains_the_peak(real_and_rehearsed):
    real = real_and_rehearsed[0]
    text = render_oom(real, capacity_bytes=real.peak_bytes // 2)
    assert text.startswith("Out of memory\n=============\n")
    assert f"of {format_bytes(real.peak_bytes // 2)} capacity (200.0%" in text
    assert "Live by category" in text and "Largest live tensors at that moment" in text
