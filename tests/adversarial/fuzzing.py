"""Real profiles and plans, mutations of them, and every renderer run on what loads (issue "hardened").

Shared by ``tests/adversarial/test_fuzzed_files.py`` (CI: a few thousand examples) and
``experiments/robustness.py`` (more). ``corpus()`` makes the files once per process from small real runs:
a tracked tiny GPT, a fake-tensor estimate of it and a plan made from the tracked profile. ``mutate`` edits
the parsed JSON/TOML data (wrong types, negative, huge, infinite and 400-digit numbers, deep nesting, removed
keys, ``$`` and markup in names) or the text itself (truncation, byte flips). ``check_file`` loads a file with
``memprof.load`` and renders what loads through report (text and HTML), plot (figure data, and the drawn
figure when ``draw``), diff and plan; it returns ``None`` when nothing but a ``MemprofError`` was raised, else
the traceback's last line.
"""

from __future__ import annotations

import functools
import json
import random
import traceback
from pathlib import Path

import torch

import memprof
from memprof.errors import MemprofError

ODD_VALUES = (-5, -1, 0, 1, 2**62, 2**63 - 1, 2**63, 10**400, 1e308, float("inf"), float("nan"), -0.5, 0.5, "", "x", "$a_b^2$",
              "<b>&</b>", "$", None, True, [], {}, [1, 2], {"a": 1}, "blocks.0", "forward", "nan")


@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, str]:
    """name -> file text of three real files: a tracked profile, an estimated profile and a plan."""
    from memprof.policy.engine import plan
    from memprof.zoo import GPT, GPTConfig, gpt_batch

    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    x, y = gpt_batch(cfg, 2)
    with memprof.track(model, opt) as tr:
        for _ in range(2):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
    tracked = tr.profile
    est = memprof.estimate(lambda: GPT(cfg), lambda: gpt_batch(cfg, 2), device="cpu")
    the_plan = plan(tracked, int(tracked.peak_bytes * 0.99), levers=("checkpoint",))
    return {"tracked.json": tracked.to_json(), "estimated.json": est.to_json(), "plan.toml": the_plan.to_toml()}


def _toml_inline(v) -> str:
    from memprof.plan_toml import _toml_key, _toml_str

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(v), repr(v))
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_inline(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_inline(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(type(v).__name__)


def _toml_text(data) -> str | None:
    """``data`` (a mutated plan dict) written back as TOML, or None when TOML cannot hold it."""
    import tomllib

    from memprof.plan_toml import _toml_key

    try:
        lines, tables = [], []
        for k, v in data.items():
            if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
                tables.append((k, v))
            elif v is not None:
                lines.append(f"{_toml_key(str(k))} = {_toml_inline(v)}")
        for k, v in tables:
            for item in [v] if isinstance(v, dict) else v:
                lines.append(f"[{_toml_key(str(k))}]" if isinstance(v, dict) else f"[[{_toml_key(str(k))}]]")
                lines.extend(f"{_toml_key(str(kk))} = {_toml_inline(vv)}" for kk, vv in item.items() if vv is not None)
        text = "\n".join(lines) + "\n"
        tomllib.loads(text)
        return text
    except Exception:
        return None


def _paths(data, prefix=()):
    """Every (path, value) in nested dicts/lists."""
    yield prefix, data
    if len(prefix) > 12:
        return
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data[:6]):
            yield from _paths(v, prefix + (i,))


def _set(data, path, value):
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _delete(data, path):
    node = data
    for k in path[:-1]:
        node = node[k]
    if isinstance(node, dict):
        del node[path[-1]]
    else:
        node.pop(path[-1])


def mutate_data(data, rnd: random.Random, n: int = 1):
    """``data`` with ``n`` random edits (in place; returns it)."""
    for _ in range(n):
        paths = [p for p, _ in _paths(data) if p]
        if not paths:
            return data
        path = rnd.choice(paths)
        what = rnd.random()
        _, value = next((q, v) for q, v in _paths(data) if q == path)
        if what < 0.15 and isinstance(value, (list, dict)):  # empty a list or object (no steps, no modules)
            _set(data, path, type(value)())
        elif what < 0.55:
            _set(data, path, rnd.choice(ODD_VALUES))
        elif what < 0.7:
            _delete(data, path)
        elif what < 0.8:
            deep = 0
            for _ in range(rnd.choice((5, 3000))):
                deep = [deep]
            _set(data, path, deep)
        elif what < 0.9 and isinstance(path[-1], str):  # rename a key, e.g. a module to "$x$"
            node = data
            for k in path[:-1]:
                node = node[k]
            node[rnd.choice(("$", "$a$", "<i>", "a.b.c", "", "blocks.0.x"))] = node.pop(path[-1])
        else:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _set(data, path, rnd.choice((-value, value * 10**6, value + 0.5, -1)))
            else:
                _set(data, path, rnd.choice(ODD_VALUES))
    return data


def mutate_text(name: str, text: str, rnd: random.Random) -> str:
    """A mutated copy of a corpus file: its data edited (most often) or its bytes cut or flipped."""
    what = rnd.random()
    if what < 0.1:
        return text[: rnd.randrange(len(text))]
    if what < 0.2:
        i = rnd.randrange(len(text))
        return text[:i] + rnd.choice("{}[]\",:=0-9e\x00$") + text[i + 1:]
    if name.endswith(".json"):
        data = mutate_data(json.loads(text), rnd, rnd.choice((1, 1, 2, 3)))
        try:
            return json.dumps(data)
        except (ValueError, RecursionError):
            return json.dumps(data, allow_nan=True, check_circular=False) if _shallow(data) else text[:-2]
    import tomllib

    data = mutate_data(tomllib.loads(text), rnd, rnd.choice((1, 1, 2)))
    return _toml_text(data) or text[: rnd.randrange(len(text))]


def _shallow(data, depth=0) -> bool:
    if depth > 200:
        return False
    if isinstance(data, dict):
        return all(_shallow(v, depth + 1) for v in data.values())
    if isinstance(data, list):
        return all(_shallow(v, depth + 1) for v in data)
    return True


def _tail(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1][:300]


def render_all(obj, other, tmp: Path, draw: bool) -> None:
    """Every renderer on a loaded file; ``other``: a good profile to diff against."""
    from memprof import plots
    from memprof.cli.plan_cmds import _echo_plan
    from memprof.plans import Plan
    from memprof.policy.engine import plan
    from memprof.report import diff, render, render_diff

    if isinstance(obj, Plan):
        obj.to_toml()
        with _quiet():
            _echo_plan(obj)
        plots.frontier_data(obj)
        if draw:
            plots.frontier(obj, tmp / "frontier.png")
        return
    for fmt in ("table", "markdown", "csv", "json"):
        render(obj, format=fmt)
    render(obj, format="html")
    plots.timeline_data(obj)
    plots.modules_data(obj)
    if draw:
        plots.timeline(obj, tmp / "timeline.png")
        plots.modules(obj, tmp / "modules.png")
        plots.html_report(obj, tmp / "report.html")
    for a, b in ((obj, other), (other, obj), (obj, obj)):
        d = diff(a, b)
        render_diff(d, fail_over=5.0)
        render_diff(d, format="json", fail_over=5.0)
        d.exceeds(5.0)
    try:
        plan(obj, max(obj.peak_bytes // 2, 1), levers=("checkpoint",))
    except MemprofError:
        pass


class _quiet:
    def __enter__(self):
        import contextlib
        import io

        self._cm = contextlib.redirect_stdout(io.StringIO())
        self._cm.__enter__()

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def check_file(path: Path, other, tmp: Path, draw: bool = False) -> str | None:
    """None if loading and rendering ``path`` raised nothing but MemprofError; else what else was raised."""
    try:
        obj = memprof.load(path)
    except MemprofError:
        return None
    except BaseException as e:  # noqa: BLE001 - this is what the check looks for
        return f"load: {_tail(e)}"
    try:
        render_all(obj, other, tmp, draw)
    except MemprofError:
        return None
    except BaseException as e:  # noqa: BLE001
        return f"render: {_tail(e)}"
    return None
