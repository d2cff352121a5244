"""The tracker's peak against the CPU allocator's own allocation events (an independent code path)."""

import pytest

import memprof
from tests.common import CASES, allocator_step_peak, make_optimizer, train_step, twin


@pytest.mark.parametrize("opt_name", ["adamw", "sgd-momentum"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_peak_matches_allocator_first_and_steady_step(case_name, opt_name):
    if case_name == "hf-llama":
        pytest.importorskip("transformers")
    case = CASES[case_name]()
    model, opt = case.model, make_optimizer(opt_name, case.model.parameters())
    ref_model, ref_opt = twin(case, opt_name)
    # The third step's optimizer phase is replayed from the pattern the second recorded (optpattern).
    for step in ("first", "steady", "replayed"):
        expected = allocator_step_peak(case, ref_model, ref_opt)
        with memprof.track(model, opt) as tracker:
            train_step(case, model, opt)
        got = tracker.profile.peak_bytes
        assert abs(got - expected) <= 0.001 * expected, f"{step} step: tracker {got} vs allocator {expected}"
        assert any("replayed" in n for n in tracker.profile.notes) == (step == "replayed")
