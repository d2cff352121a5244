"""Reading profiles: every bad file is a MemprofError that names the file and the problem."""

import pytest

import memprof
from memprof.errors import ProfileFormatError
from memprof.units import format_bytes, parse_size


@pytest.fixture
def good_profile(tmp_path):
    import torch

    with memprof.track() as tracker:
        torch.ones(10).add_(1)
    path = tmp_path / "good.json"
    tracker.profile.save(path)
    return path


def test_load_missing_file(tmp_path):
    with pytest.raises(ProfileFormatError, match=r"nope\.json: no such file"):
        memprof.load(tmp_path / "nope.json")


def test_load_truncated_file(tmp_path, good_profile):
    bad = tmp_path / "truncated.json"
    bad.write_text(good_profile.read_text()[:200])
    with pytest.raises(ProfileFormatError, match=r"truncated\.json: truncated JSON"):
        memprof.load(bad)


def test_load_non_json_file(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text("peak was high\n")
    with pytest.raises(ProfileFormatError, match=r"notes\.json: not valid JSON"):
        memprof.load(bad)


def test_load_other_schema(tmp_path, good_profile):
    other = tmp_path / "other.json"
    other.write_text(good_profile.read_text().replace("memprof.profile/1", "memprof.profile/9"))
    with pytest.raises(ProfileFormatError, match=r"schema 'memprof.profile/9' is not supported"):
        memprof.load(other)
    no_schema = tmp_path / "plain.json"
    no_schema.write_text('{"peak": 1}')
    with pytest.raises(ProfileFormatError, match="not a memprof profile"):
        memprof.load(no_schema)


def test_load_malformed_profile_names_the_missing_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "memprof.profile/1", "environment": {}}')
    with pytest.raises(ProfileFormatError, match="malformed profile"):
        memprof.load(bad)


def test_load_a_folder_or_empty_file(tmp_path):
    with pytest.raises(ProfileFormatError, match="is a folder"):
        memprof.load(tmp_path)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ProfileFormatError, match="empty file"):
        memprof.load(empty)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, good_profile):
    prof = memprof.load(good_profile)
    target = tmp_path / "sub" / "again.json"
    prof.save(target)
    assert memprof.load(target) == prof
    assert sorted(p.name for p in target.parent.iterdir()) == ["again.json"]


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 1024**3), ("80GB", 80 * 10**9), ("1.5 GiB", 1536 * 1024**2), ("512mib", 512 * 1024**2),
    ("123", 123), (4096, 4096), ("2K", 2048),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "-1GB", "12 parsecs", None, True, "1e9"])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(memprof.MemprofError):
        parse_size(bad)


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(1000, "B") == "1,000 B"
    assert format_bytes(2 * 1024**2, "MiB") == "2.00 MiB"
