"""Profiles for the report, plot and CLI tests: one real tracked GPT run, and edited copies of it.

The edits (``grown``, ``with_capacity``...) change one known quantity of a real profile, so a test can
assert the exact difference it must see.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import memprof
from memprof.zoo import GPT, GPTConfig, gpt_batch

TINY_GPT = GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=256)


def track_gpt(cfg: GPTConfig = TINY_GPT, batch: int = 2, steps: int = 2) -> memprof.Profile:
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    x, y = gpt_batch(cfg, batch)
    with memprof.track(model, opt) as tr:
        for _ in range(steps):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
    return tr.profile


def grown(prof: memprof.Profile, module: str, field: str, factor: float) -> memprof.Profile:
    """A copy of ``prof`` whose ``module`` has ``field`` (e.g. ``activation_bytes``) multiplied by ``factor``."""
    m = prof.modules[module]
    mods = dict(prof.modules)
    mods[module] = dataclasses.replace(m, **{field: int(round(getattr(m, field) * factor))})
    return dataclasses.replace(prof, modules=mods)


def with_peak(prof: memprof.Profile, peak_bytes: int) -> memprof.Profile:
    return dataclasses.replace(prof, peak=dataclasses.replace(prof.peak, bytes=peak_bytes))


def with_capacity(prof: memprof.Profile, capacity: int | None) -> memprof.Profile:
    env = dataclasses.replace(prof.environment, device_capacity_bytes=capacity)
    return dataclasses.replace(prof, environment=env)


@pytest.fixture(scope="session")
def gpt_profile() -> memprof.Profile:
    return track_gpt()


@pytest.fixture(scope="session")
def gpt_profile_path(gpt_profile, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "gpt.json"
    gpt_profile.save(path)
    return path
