import os

# Kineto (the profiler behind the CPU ground truth and the scratch calibrator) prints a line per session at
# its default log level; the level is read once per process.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    from memprof.tracking.devices import cuda_available

    if not cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
