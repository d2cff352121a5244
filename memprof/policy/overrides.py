"""Instance-attribute overrides that several levers may stack on one object and take off in any order.

A lever that replaces a method of an object it does not own (``optimizer.step``, a module's ``forward``)
pushes its replacement with :func:`push`; the object's attribute is always the most recent replacement
still pushed, and :func:`pop` of any of them (first, last or between) leaves the attribute as if that one
had never been pushed; the last pop restores the object as it was (the attribute deleted again when it was
the class's, or the earlier instance attribute put back). The stack lives on the object under
``_memprof_overrides``. Known limit: a replacement made by someone else over a pushed one (an LR
scheduler's wrapper of ``step``) is dropped when the stack changes under it.
"""

from __future__ import annotations

__all__ = ["push", "pop", "Undoable", "CallAfter"]

_KEY = "_memprof_overrides"
_MISSING = object()


def push(obj, attr: str, owner, value) -> None:
    """Make ``value`` the object's ``attr``, on top of what is there, on behalf of ``owner``."""
    stacks = obj.__dict__.setdefault(_KEY, {})
    stack = stacks.get(attr)
    if stack is None:
        stack = stacks[attr] = [(None, obj.__dict__.get(attr, _MISSING))]  # the object's own, first
    stack.append((owner, value))
    setattr(obj, attr, value)


def pop(obj, attr: str, owner) -> None:
    """Take ``owner``'s replacement of ``attr`` off, wherever it is in the stack; a no-op if it is not there."""
    stacks = obj.__dict__.get(_KEY, {})
    stack = stacks.get(attr)
    if not stack:
        return
    kept = [entry for entry in stack[1:] if entry[0] is not owner]
    if len(kept) == len(stack) - 1:
        return
    stack[1:] = kept
    if kept:
        setattr(obj, attr, kept[-1][1])
        return
    original = stack[0][1]
    del stacks[attr]
    if not stacks:
        del obj.__dict__[_KEY]
    if original is _MISSING:
        obj.__dict__.pop(attr, None)
    else:
        setattr(obj, attr, original)


class CallAfter:
    """``obj.attr(...)`` followed by ``after()`` on each call (the result returned as it was), until
    :meth:`remove`. Used by memprof's loop observers on ``optimizer.step`` (calibration, the live check):
    ``after`` is theirs to keep from raising. :meth:`remove` unwraps only while the wrapper is still the
    object's attribute (a wrapper someone else put over it stays, and keeps calling through)."""

    def __init__(self, obj, attr: str, after) -> None:
        self.obj, self.attr = obj, attr
        self._had_attr = attr in obj.__dict__
        original = self._original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            after()
            return out

        self._wrapped = wrapped
        setattr(obj, attr, wrapped)

    def remove(self) -> None:
        obj, self.obj = self.obj, None
        if obj is not None and obj.__dict__.get(self.attr) is self._wrapped:
            if self._had_attr:
                setattr(obj, self.attr, self._original)
            else:
                delattr(obj, self.attr)


class Undoable:
    """A lever's handle: ``remove()`` undoes what the lever changed; ``with handle:`` removes it on leaving."""

    def remove(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
