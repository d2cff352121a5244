"""Allocator advice (memprof.advice) from a profile's CUDA allocator peaks, against hand counts."""

import dataclasses

import pytest

from memprof.advice import EXPANDABLE, allocator_advice
from memprof.profiles import DeviceStats
from tests.report_fixtures import track_gpt

GiB = 2**30


@pytest.fixture(scope="module")
def cpu_profile():
    return track_gpt()


def _with_devices(prof, *devices):
    return dataclasses.replace(prof, devices=tuple(devices))


def _cuda(i, reserved, allocated):
    return DeviceStats(device=f"cuda:{i}", peak_bytes=allocated,
                       allocator={"reserved_peak": reserved, "allocated_peak": allocated})


def test_a_device_with_slack_gets_the_expandable_segments_setting_with_its_bytes(cpu_profile):
    prof = _with_devices(cpu_profile, _cuda(0, 40 * GiB, 30 * GiB), _cuda(1, 40 * GiB, 40 * GiB - 100 * 2**20))
    advice = allocator_advice(prof)
    assert [a.device for a in advice] == ["cuda:0"]  # cuda:1: 100 MiB, under the 256 MiB floor
    assert advice[0].slack_bytes == 10 * GiB and advice[0].setting == EXPANDABLE
    assert "returns up to 10.00 GiB (25% of reserved)" in advice[0].sentence()


def test_no_advice_for_small_relative_slack_cpu_only_profiles_or_when_already_set(cpu_profile):
    assert allocator_advice(cpu_profile) == []  # the CPU profile has no CUDA device
    big = _with_devices(cpu_profile, _cuda(0, 100 * GiB, 96 * GiB))  # 4 GiB but 4% of reserved
    assert allocator_advice(big) == []
    slack = _with_devices(cpu_profile, _cuda(0, 40 * GiB, 30 * GiB))
    assert allocator_advice(slack, alloc_conf="max_split_size_mb:128, expandable_segments:True") == []
    assert len(allocator_advice(slack, alloc_conf="max_split_size_mb:128")) == 1
    missing = _with_devices(cpu_profile, DeviceStats(device="cuda:0", peak_bytes=1))
    assert allocator_advice(missing) == []


def test_the_report_prints_the_advice_of_a_profile_with_allocator_slack(cpu_profile):
    from memprof.report import render, summary

    prof = _with_devices(cpu_profile, _cuda(0, 40 * GiB, 30 * GiB))
    assert summary(prof).advice == (allocator_advice(prof)[0].sentence(),)
    text = render(prof, "table")
    assert "Advice       cuda:0: the CUDA caching allocator reserved 40.00 GiB" in text
    assert "Advice" not in render(cpu_profile, "table")


def test_a_plan_of_a_profile_with_allocator_slack_says_the_setting_and_one_without_does_not(cpu_profile):
    from memprof.policy.engine import plan

    budget = cpu_profile.peak_bytes  # fits as it is: the advice is said whatever the plan
    slack = _with_devices(cpu_profile, *cpu_profile.devices, _cuda(0, 40 * GiB, 30 * GiB))
    said = [line for line in plan(slack, budget).explanation if EXPANDABLE in line]
    assert len(said) == 1 and "returns up to 10.00 GiB" in said[0] and "not applied by this plan" in said[0]
    assert not [line for line in plan(cpu_profile, budget).explanation if EXPANDABLE in line]
