"""Stacked instance-attribute overrides (memprof.policy.overrides) taken off in every order."""

import itertools

import pytest

from memprof.policy import overrides


class Thing:
    def go(self):
        return "class"


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_every_removal_order_leaves_the_top_remaining_override_and_finally_the_original(order, own):
    t = Thing()
    if own:
        t.go = lambda: "instance"
    owners = [object() for _ in range(3)]
    for i, o in enumerate(owners):
        overrides.push(t, "go", o, lambda i=i: f"lever {i}")
    assert t.go() == "lever 2"
    remaining = [0, 1, 2]
    for i in order:
        overrides.pop(t, "go", owners[i])
        remaining.remove(i)
        want = f"lever {remaining[-1]}" if remaining else ("instance" if own else "class")
        assert t.go() == want
    assert ("go" in t.__dict__) == own and "_memprof_overrides" not in t.__dict__
    overrides.pop(t, "go", owners[0])  # popping again is a no-op
    assert t.go() == ("instance" if own else "class")
