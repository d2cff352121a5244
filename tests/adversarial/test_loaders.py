"""Issue "hardened", findings 5 and 9: loaders check types and ranges and raise only MemprofError (naming the
field); renderers draw what loads, module names with ``$`` included."""

import json

import pytest

import memprof
from memprof import plots
from memprof.errors import MemprofError, ProfileFormatError
from memprof.plans import PlanFormatError
from memprof.report import render


def _write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_deeply_nested_json_is_a_format_error(tmp_path):
    path = _write(tmp_path, '{"schema": "memprof.profile/1", "notes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ProfileFormatError, match="nested too deeply"):
        memprof.load(path)


def test_deeply_nested_toml_is_a_format_error(tmp_path):
    path = _write(tmp_path, 'schema = "memprof.plan/1"\nx = ' + "[" * 100_000 + "]" * 100_000 + "\n", "p.toml")
    with pytest.raises(PlanFormatError, match="nested too deeply"):
        memprof.load(path)


@pytest.mark.parametrize("field, value, message", [
    ("modules", [], "profile field modules: expected an object, got a JSON array"),
    ("timeline", "x", "profile field timeline: expected an object, got 'x'"),
    ("steps", {}, "profile field steps: expected an array, got a JSON object"),
    ("peak", 3, "profile field peak: expected an object, got 3"),
])
def test_wrong_types_name_the_field(profile_data, tmp_path, field, value, message):
    profile_data[field] = value
    with pytest.raises(ProfileFormatError, match=message.replace("[", r"\[").replace("(", r"\(")):
        memprof.load(_write(tmp_path, profile_data))


def test_a_negative_module_size_names_the_module_and_field(profile_data, tmp_path):
    name = list(profile_data["modules"])[3]
    profile_data["modules"][name]["forward_peak_bytes"] = -5
    with pytest.raises(ProfileFormatError) as e:
        memprof.load(_write(tmp_path, profile_data))
    assert f"profile field modules[{name!r}].forward_peak_bytes: expected a non-negative integer, got -5" in str(e.value)


def test_a_400_digit_number_is_a_format_error(profile_data, tmp_path):
    text = json.dumps(profile_data).replace(f'"bytes": {profile_data["peak"]["bytes"]}', '"bytes": ' + "9" * 400, 1)
    with pytest.raises(ProfileFormatError, match=r"peak.bytes: expected a non-negative integer, got an integer of "
                                                 r"400 digits"):
        memprof.load(_write(tmp_path, text))


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_infinite_sizes_and_times_are_format_errors(profile_data, tmp_path, value):
    text = json.dumps(profile_data)
    size = text.replace(f'"bytes": {profile_data["peak"]["bytes"]}', f'"bytes": {value}', 1)
    time = text.replace('"duration_ms": ', f'"duration_ms": {value}, "x": ', 1)
    for t, field in ((size, "peak.bytes"), (time, "steps[0].duration_ms")):
        with pytest.raises(ProfileFormatError, match=field.replace("[", r"\[")):
            memprof.load(_write(tmp_path, t))


def test_a_plan_with_a_400_digit_budget_is_a_format_error(real_files, tmp_path):
    text = real_files["plan.toml"].read_text()
    start = text.index("budget_bytes = ")
    end = text.index("\n", start)
    path = _write(tmp_path, text[:start] + "budget_bytes = " + "9" * 400 + text[end:], "p.toml")
    with pytest.raises(PlanFormatError, match="budget_bytes: must be below 2"):
        memprof.load(path)


def test_sizes_near_2_to_the_63_load_and_draw(profile_data, tmp_path):
    for m in profile_data["modules"].values():
        m["param_bytes"] = 2**63 - 1
    prof = memprof.load(_write(tmp_path, profile_data))
    plots.modules(prof, tmp_path / "modules.png")  # OverflowError in matplotlib before (ints summed in C long)
    assert "8,388,608.00 TiB" in render(prof, sections=["modules"])  # (2**63 - 1) / 2**40, rounded


@pytest.mark.parametrize("name", ["blocks.$x^$", "$a_b^2$", "$"])
def test_module_names_with_dollar_signs_are_drawn_as_written(profile_data, tmp_path, name):
    import matplotlib.text

    old = list(profile_data["modules"])[1]
    m = profile_data["modules"].pop(old)
    m["name"] = name
    m["param_bytes"] = 10**9  # the largest bar, so it is drawn
    profile_data["modules"][name] = m
    profile_data["peak"]["module"] = name
    prof = memprof.load(_write(tmp_path, profile_data))
    for draw in (plots.timeline, plots.modules, plots.html_report):
        draw(prof, tmp_path / "out")  # ValueError from math text ("$x^$") before
    fig = plots.modules_figure(plots.modules_data(prof))
    labels = [t for t in fig.axes[0].get_yticklabels()]
    shown = [matplotlib.text.Text._preprocess_math(t, t.get_text()) for t in labels]
    assert (name, False) in shown  # drawn as plain text, exactly as written


def test_every_loader_error_is_a_memprof_error(profile_data, tmp_path):
    """A few shapes that raised AttributeError/TypeError/KeyError from the loaders before."""
    cases = []
    for edit in (lambda d: d["modules"].update({"x": 1}), lambda d: d["peak"].update({"tensors": [1]}),
                 lambda d: d["timeline"].update({"samples": [[1, 2]]}), lambda d: d.update({"environment": []}),
                 lambda d: d["devices"].append({"device": 1}), lambda d: d["peak"].update({"by_category": []}),
                 lambda d: d["steps"].append({"index": "0"}), lambda d: d.update({"notes": "text"})):
        data = json.loads(json.dumps(profile_data))
        edit(data)
        cases.append(_write(tmp_path, data, f"case{len(cases)}.json"))
    for path in cases:
        with pytest.raises(MemprofError):
            memprof.load(path)
