import os

# Kineto (the profiler behind the CPU ground truth and the scratch calibrator) prints a line per session at
# its default log level; the level is read once per process.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def gpt():
    """A 6-block GPT (tests.common.POLICY_GPT), its AdamW, its step and a 3-step profile of it."""
    import memprof
    from memprof.zoo import GPT, gpt_batch
    from tests.common import POLICY_GPT

    torch.manual_seed(0)
    model = GPT(POLICY_GPT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = gpt_batch(POLICY_GPT, 4)

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with memprof.track(model, opt) as tracker:
        for _ in range(3):
            step()
    return model, opt, step, tracker.profile


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
