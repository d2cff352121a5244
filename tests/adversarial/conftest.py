import json

import pytest

from tests.adversarial import fuzzing


@pytest.fixture(scope="session")
def real_files(tmp_path_factory):
    """A tracked profile, an estimated profile and a plan, made once per session from small real runs."""
    folder = tmp_path_factory.mktemp("real-files")
    paths = {}
    for name, text in fuzzing.corpus().items():
        paths[name] = folder / name
        paths[name].write_text(text)
    return paths


@pytest.fixture
def profile_data(real_files):
    """The tracked profile's JSON, parsed (a fresh copy to edit)."""
    return json.loads(real_files["tracked.json"].read_text())
