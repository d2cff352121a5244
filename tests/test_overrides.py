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


def test_call_after_runs_after_each_call_and_unwraps_only_while_it_is_on_top():
    from memprof.policy.overrides import CallAfter

    class Opt:
        def step(self, x):
            return x + 1

    seen = []
    opt = Opt()
    hook = CallAfter(opt, "step", lambda: seen.append("after"))
    assert opt.step(1) == 2 and seen == ["after"]
    hook.remove()
    assert "step" not in opt.__dict__ and opt.step(1) == 2 and seen == ["after"]

    hook = CallAfter(opt, "step", lambda: seen.append("again"))
    inner = opt.step
    opt.step = lambda x: inner(x) * 10  # someone wraps over memprof's wrapper
    hook.remove()
    assert opt.step(1) == 20 and seen == ["after", "again"]  # their wrapper stays and still calls through
