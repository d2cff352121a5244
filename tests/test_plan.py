"""The plan file: exact round trips through TOML, and a clear error naming the key for every bad file."""

import re
import sys
from datetime import timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memprof
from memprof.errors import MemprofError, ProfileFormatError
from memprof.plans import (
    CheckpointChoice,
    FrontierPoint,
    Plan,
    PlanFormatError,
    PlanValueError,
    Sharding,
    Source,
    load_plan,
)
from memprof.vocab import CHECKPOINT_MODES, LEVERS, PRECISIONS, SHARDING_STRATEGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GiB = 1 << 30


def _plan(**changes) -> Plan:
    fields = dict(
        created="2026-05-01T12:00:00+00:00",
        budget_bytes=24 * GiB,
        world_size=8,
        device="H100-80GB",
        levers=("checkpoint", "precision", "sharding"),
        predicted_peak_bytes=23 * GiB + 12345,
        baseline_step_ms=100.0,
        predicted_step_ms=112.5,
        predicted_overhead=0.125,
        precision="bf16-autocast",
        sharding=Sharding("hybrid", reshard_after_forward=False, offload_optimizer=True, shard_group_size=4),
        checkpoint=(
            CheckpointChoice("blocks.0", "full"),
            CheckpointChoice("blocks.1", "selective"),
            CheckpointChoice("blocks.2", "keep"),
            CheckpointChoice("blocks.3", "full"),
        ),
        source=Source("sha256:0123abcd", "GPT-2 124M", estimated=True),
        assumptions={"batch_size": "8", "sequence length": "1024"},
        explanation=("Checkpoint blocks 0 and 3 in full: they hold 41% of the activations.", "Then selective."),
        frontier=(FrontierPoint(20 * GiB, 140.0, "checkpoint every block"), FrontierPoint(23 * GiB, 0.1, "x")),
    )
    fields.update(changes)
    return Plan(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_through_a_file(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "policies" / "gpt2.toml")
    assert load_plan(path) == plan
    assert memprof.load(path) == plan  # through memprof.loading.load
    assert plan.checkpoint_modes() == {"blocks.0": "full", "blocks.1": "selective", "blocks.2": "keep",
                                       "blocks.3": "full"}
    assert (plan.budget_bytes, plan.predicted_peak_bytes, plan.predicted_overhead) == (24 * GiB,
                                                                                        23 * GiB + 12345, 0.125)


def test_round_trip_of_awkward_values(tmp_path):
    plan = _plan(
        levers=(),
        checkpoint=(),
        assumptions={},
        explanation=("ünïcødé → ✓ \"quoted\" \\ back\\slash\ttab\nnewline \x00 \x7f", ""),
        frontier=(FrontierPoint(0, 1e-7, "tiny"), FrontierPoint(1, 0.1, ""), FrontierPoint(2, 1e300, "huge"),
                  FrontierPoint(2**62, 5e-324, "subnormal")),
        predicted_step_ms=100.00000000000001,
        predicted_overhead=100.00000000000001 / 100.0 - 1,
        sharding=Sharding("full", shard_group_size=8),
    )
    path = plan.save(tmp_path / "odd.toml")
    assert load_plan(path) == plan
    assert load_plan(path).frontier[0].step_ms == 1e-7


def test_defaults_give_a_valid_single_device_plan(tmp_path):
    plan = Plan(budget_bytes=GiB, predicted_peak_bytes=GiB // 2, baseline_step_ms=0.0, predicted_step_ms=0.0,
                predicted_overhead=0.0, source=Source("", "", False))
    assert plan.schema == "memprof.plan/1" and plan.memprof_version == memprof.__version__
    assert plan.sharding == Sharding() and plan.world_size == 1 and plan.precision == "fp32"
    assert load_plan(plan.save(tmp_path / "p.toml")) == plan


_floats = st.one_of(st.sampled_from([0.0, 0.1, 1e-7, 1 / 3, 2.5e-300]),
                    st.floats(min_value=0, max_value=1e12, allow_nan=False))
_text = st.text(max_size=30)


@st.composite
def plans(draw):
    world = draw(st.sampled_from([1, 2, 8, 64]))
    strategy = draw(st.sampled_from(SHARDING_STRATEGIES))
    group = draw(st.sampled_from([g for g in (1, 2, 4, 8, 64) if world % g == 0])) if strategy == "hybrid" else world
    baseline = draw(st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e6)))
    predicted = draw(st.floats(min_value=0, max_value=1e7))
    overhead = predicted / baseline - 1 if baseline > 0 else draw(st.floats(-1, 10))
    units = draw(st.lists(st.text(min_size=1, max_size=20), unique=True, max_size=6))
    return Plan(
        created=draw(st.datetimes(timezones=st.just(timezone.utc))).isoformat(),
        memprof_version=draw(st.text(min_size=1, max_size=10)),
        budget_bytes=draw(st.integers(1, 2**63 - 1)),
        world_size=world,
        device=draw(_text),
        levers=tuple(draw(st.lists(st.sampled_from(LEVERS), unique=True))),
        predicted_peak_bytes=draw(st.integers(0, 2**63 - 1)),
        baseline_step_ms=baseline,
        predicted_step_ms=predicted,
        predicted_overhead=overhead,
        precision=draw(st.sampled_from(PRECISIONS)),
        sharding=Sharding(strategy, draw(st.booleans()), strategy != "none" and draw(st.booleans()), group),
        checkpoint=tuple(CheckpointChoice(u, draw(st.sampled_from(CHECKPOINT_MODES))) for u in units),
        source=Source(draw(_text), draw(_text), draw(st.booleans())),
        assumptions=draw(st.dictionaries(st.text(min_size=1, max_size=15), _text, max_size=4)),
        explanation=tuple(draw(st.lists(_text, max_size=4))),
        frontier=tuple(FrontierPoint(draw(st.integers(0, 2**63 - 1)), draw(_floats), draw(_text))
                       for _ in range(draw(st.integers(0, 3)))),
    )


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_random_plans_round_trip_exactly(plan):
    text = plan.to_toml()
    assert tomllib.loads(text) == plan.to_dict()
    assert Plan.from_dict(tomllib.loads(text)) == plan
    assert Plan.from_dict(plan.to_dict()) == plan


def test_the_file_is_readable_and_says_how_to_apply_it():
    text = _plan().to_toml()
    head = [line for line in text.splitlines() if line.startswith("#")]
    assert any("memprof run --policy FILE SCRIPT" in line for line in head)
    assert any("memprof.apply(model, memprof.load(FILE))" in line for line in head)
    assert "budget_bytes = 25769803776  # 24.00 GiB" in text
    assert "predicted_overhead = 0.125  # +12.5% step time" in text
    # top-level values first, then tables, then arrays of tables
    first_table = text.index("\n[")
    assert text.index("precision = ") < first_table and text.index("explanation = [") < first_table
    assert text.index("[sharding]") < text.index("[[checkpoint]]") < text.index("[[frontier]]")
    assert text.count("[[checkpoint]]") == 4
    assert '"sequence length" = "1024"' in text


# ---------------------------------------------------------------------------------------------------------------
# Bad files


@pytest.fixture
def good_text():
    return _plan().to_toml()


def _load_text(tmp_path, text, name="plan.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_plan(path)


def test_missing_file(tmp_path):
    with pytest.raises(PlanFormatError, match=r"nope\.toml: no such file"):
        load_plan(tmp_path / "nope.toml")
    with pytest.raises(PlanFormatError, match=r"nope\.toml: no such file"):
        memprof.load(tmp_path / "nope.toml")


def test_not_toml(tmp_path):
    with pytest.raises(PlanFormatError, match=r"notes\.toml: not valid TOML: .*line 1"):
        _load_text(tmp_path, "checkpoint every block please\n", "notes.toml")
    with pytest.raises(PlanFormatError, match="empty file"):
        _load_text(tmp_path, "\n")


def test_other_schema(tmp_path, good_text):
    with pytest.raises(PlanFormatError, match=r"schema 'memprof.plan/9' is not supported \(expected 'memprof.plan/1'\)"):
        _load_text(tmp_path, good_text.replace('"memprof.plan/1"', '"memprof.plan/9"'))
    with pytest.raises(PlanFormatError, match="not a memprof plan"):
        _load_text(tmp_path, 'title = "pyproject"\n')


def _nth(text, old, new, n):
    """Replace the n-th (0-based) occurrence of ``old``."""
    parts = text.split(old)
    assert len(parts) > n + 1, f"fewer than {n + 1} occurrences of {old!r}"
    return old.join(parts[: n + 1]) + new + old.join(parts[n + 1:])


BAD = [
    # unknown keys, at every level
    ("unknown-top", lambda t: t.replace("world_size = 8", "world_size = 8\nbudget = 3"), "budget", "unknown key"),
    ("unknown-table", lambda t: t.replace('strategy = "hybrid"', 'stratgy = "hybrid"\nstrategy = "hybrid"'),
     "sharding.stratgy", "unknown key"),
    ("unknown-array", lambda t: _nth(t, 'mode = "full"', 'mode = "full"\nmodes = "x"', 1),
     r"checkpoint\[3\].modes", "unknown key"),
    ("unknown-frontier", lambda t: t.replace('description = "x"', 'description = "x"\nnote = 1'),
     r"frontier\[1\].note", "unknown key"),
    # missing keys
    ("missing-top", lambda t: t.replace("world_size = 8\n", ""), "world_size", r"missing \(required\)"),
    ("missing-table-key", lambda t: t.replace('strategy = "hybrid"\n', ""), "sharding.strategy", "missing"),
    ("missing-table", lambda t: re.sub(r"\[source\]\n(.*\n){3}", "", t), "source", "missing"),
    ("missing-array-key", lambda t: _nth(t, 'mode = "selective"\n', "", 0), r"checkpoint\[1\].mode", "missing"),
    # wrong types
    ("str-for-int", lambda t: re.sub(r"budget_bytes = \d+", 'budget_bytes = "24GiB"', t), "budget_bytes",
     r"expected an integer, got a string \('24GiB'\)"),
    ("bool-for-int", lambda t: t.replace("world_size = 8", "world_size = true"), "world_size",
     r"expected an integer, got a boolean"),
    ("float-for-int", lambda t: re.sub(r"predicted_peak_bytes = \d+", "predicted_peak_bytes = 2.5e10", t),
     "predicted_peak_bytes", "expected an integer, got a float"),
    ("str-for-float", lambda t: t.replace("baseline_step_ms = 100.0", 'baseline_step_ms = "fast"'),
     "baseline_step_ms", "expected a number, got a string"),
    ("int-for-bool", lambda t: t.replace("offload_optimizer = true", "offload_optimizer = 1"),
     "sharding.offload_optimizer", "expected true or false, got an integer"),
    ("str-for-array", lambda t: re.sub(r"levers = \[.*\]", 'levers = "checkpoint"', t), "levers",
     "expected an array"),
    ("table-for-str", lambda t: t.replace('device = "H100-80GB"', "device = {name = 'H100'}"), "device",
     "expected a string, got a table"),
    ("int-in-array", lambda t: t.replace("explanation = [\n", "explanation = [\n    7,\n"), r"explanation\[0\]",
     "expected a string, got an integer"),
    ("date-for-str", lambda t: t.replace('created = "2026-05-01T12:00:00+00:00"', "created = 2026-05-01T12:00:00Z"),
     "created", "expected a string, got a date-time"),
    ("str-for-table", lambda t: re.sub(r"\[source\]\n(.*\n){3}", "", t).replace("world_size = 8",
     'world_size = 8\nsource = "GPT-2"'), "source", "expected a table, got a string"),
    # bad values
    ("bad-strategy", lambda t: t.replace('strategy = "hybrid"', 'strategy = "zero3"'), "sharding.strategy",
     "'zero3' is not one of 'none', 'full', 'shard-grad-op', 'hybrid'"),
    ("bad-mode", lambda t: _nth(t, 'mode = "full"', 'mode = "half"', 1), r"checkpoint\[3\].mode",
     "'half' is not one of 'keep', 'full', 'selective'"),
    ("bad-precision", lambda t: t.replace('precision = "bf16-autocast"', 'precision = "int8"'), "precision",
     "'int8' is not one of"),
    ("bad-lever", lambda t: t.replace('"precision", "sharding"]', '"quantize", "sharding"]'), r"levers\[1\]",
     "'quantize' is not one of"),
    ("twice-lever", lambda t: t.replace('"precision", "sharding"]', '"checkpoint", "sharding"]'), r"levers\[1\]",
     "listed twice"),
    ("twice-unit", lambda t: t.replace('unit = "blocks.2"', 'unit = "blocks.0"'), r"checkpoint\[2\].unit",
     "'blocks.0' is listed twice"),
    ("empty-unit", lambda t: t.replace('unit = "blocks.2"', 'unit = ""'), r"checkpoint\[2\].unit", "must not be empty"),
    ("bad-date", lambda t: t.replace('"2026-05-01T12:00:00+00:00"', '"yesterday"'), "created", "not an ISO 8601"),
    ("zero-world", lambda t: t.replace("world_size = 8", "world_size = 0"), "world_size", "must be at least 1"),
    ("negative-peak", lambda t: re.sub(r"predicted_peak_bytes = \d+", "predicted_peak_bytes = -1", t),
     "predicted_peak_bytes", "must be at least 0"),
    ("nan-ms", lambda t: t.replace("predicted_step_ms = 112.5", "predicted_step_ms = nan"), "predicted_step_ms",
     "must be finite"),
    ("overhead-mismatch", lambda t: t.replace("predicted_step_ms = 112.5", "predicted_step_ms = 150.0"),
     "predicted_overhead", "does not match predicted_step_ms / baseline_step_ms - 1 = 0.5"),
    ("group-size", lambda t: t.replace("shard_group_size = 4", "shard_group_size = 3"), "sharding.shard_group_size",
     "3 does not divide the world size 8"),
    ("group-size-non-hybrid", lambda t: t.replace('strategy = "hybrid"', 'strategy = "full"'),
     "sharding.shard_group_size", r"must equal the world size \(8\)"),
    ("offload-without-fsdp", lambda t: t.replace('strategy = "hybrid"', 'strategy = "none"'),
     "sharding.offload_optimizer", "CPU offload needs FSDP"),
]


@pytest.mark.parametrize("edit, key, problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_names_the_key(tmp_path, good_text, edit, key, problem):
    assert _load_text(tmp_path, good_text) == _plan()
    text = edit(good_text)
    assert text != good_text
    with pytest.raises(PlanFormatError) as info:
        _load_text(tmp_path, text)
    e = info.value
    assert isinstance(e, ProfileFormatError) and isinstance(e, MemprofError)
    assert re.fullmatch(key, e.key), (e.key, str(e))
    assert str(e).startswith(f"{tmp_path / 'plan.toml'}: {e.key}: ")
    assert re.search(problem, str(e)), str(e)


def test_bad_values_in_code_name_the_key():
    with pytest.raises(PlanValueError, match=r"^strategy: 'zero3' is not one of"):
        Sharding("zero3")
    with pytest.raises(PlanValueError, match=r"^mode: 'half' is not one of"):
        CheckpointChoice("blocks.0", "half")
    with pytest.raises(PlanValueError, match=r"^sharding.shard_group_size: 3 does not divide the world size 8"):
        _plan(sharding=Sharding("hybrid", shard_group_size=3))
    with pytest.raises(PlanValueError, match=r"^checkpoint\[1\]: expected a CheckpointChoice"):
        _plan(checkpoint=(CheckpointChoice("a", "full"), ("b", "full")))
    with pytest.raises(PlanValueError, match=r"^budget_bytes: expected an integer, got a boolean"):
        _plan(budget_bytes=True)
    with pytest.raises(PlanValueError, match=r"^schema: 'memprof.plan/2' is not supported"):
        _plan(schema="memprof.plan/2")
    assert isinstance(PlanValueError("k", "p"), ValueError)


def test_from_dict_reports_the_origin():
    d = _plan().to_dict()
    d["sharding"]["strategy"] = "ddp"
    with pytest.raises(PlanFormatError, match=r"^<plan>: sharding.strategy: 'ddp' is not one of"):
        Plan.from_dict(d)


def test_plan_errors_survive_pickling():
    import pickle

    e = PlanFormatError("p.toml", "'x' is not one of 'none'", "sharding.strategy")
    again = pickle.loads(pickle.dumps(e))
    assert (str(again), again.key, again.path) == (str(e), "sharding.strategy", "p.toml")
    v = pickle.loads(pickle.dumps(PlanValueError("levers[1]", "listed twice")))
    assert (str(v), v.key) == ("levers[1]: listed twice", "levers[1]")
