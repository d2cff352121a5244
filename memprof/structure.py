"""Model structure: structural hashes of modules and detection of repeated units (transformer blocks).

A *unit* is a module that the planner can checkpoint and FSDP can shard on its own. By default units are
the children of a ``ModuleList``/``Sequential`` that are structurally identical to at least one sibling
(same classes and parameter shapes all the way down) — the repeated blocks of a transformer. Users can
name units instead, by class name or by FQN glob pattern (``"blocks.*"``, ``"LlamaDecoderLayer"``).
"""

from __future__ import annotations

import fnmatch
import hashlib

import torch.nn as nn

from .errors import MemprofError

__all__ = ["structure_hashes", "repeated_units", "select_units"]


def structure_hashes(mod: nn.Module) -> dict[int, str]:
    """A short hash per module (keyed by ``id``) of its class names and parameter shapes/dtypes, subtree included."""
    memo: dict[int, str] = {}

    def visit(m):
        if id(m) in memo:
            return memo[id(m)]
        h = hashlib.sha1(type(m).__qualname__.encode())
        for name, p in m.named_parameters(recurse=False):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}".encode())
        for name, b in m.named_buffers(recurse=False):
            h.update(f"{name}:{tuple(b.shape)}:{b.dtype}".encode())
        for name, c in m.named_children():
            h.update(f"{name}={visit(c)}".encode())
        memo[id(m)] = h.hexdigest()[:12]
        return memo[id(m)]

    visit(mod)
    return memo


def repeated_units(model: nn.Module) -> list[str]:
    """FQNs of the repeated blocks: children of containers with a structurally identical sibling."""
    hashes = structure_hashes(model)
    units: list[str] = []
    for fqn, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.named_children())
        counts: dict[str, int] = {}
        for _, c in children:
            counts[hashes[id(c)]] = counts.get(hashes[id(c)], 0) + 1
        for name, c in children:
            if counts[hashes[id(c)]] >= 2 and any(p.requires_grad for p in c.parameters()):
                units.append(f"{fqn}.{name}" if fqn else name)
    # A unit inside another unit is not a unit of its own (keep the outermost).
    return [u for u in units if not any(u.startswith(v + ".") for v in units if v != u)]


def select_units(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Units named by class name or FQN glob; ``None`` means the repeated blocks."""
    if not patterns:
        return repeated_units(model)
    names = [(fqn, type(m).__name__) for fqn, m in model.named_modules() if fqn]
    chosen = [fqn for fqn, cls in names if any(cls == p or fnmatch.fnmatchcase(fqn, p) for p in patterns)]
    if not chosen:
        raise MemprofError(f"no module matches the unit patterns {patterns}")
    return [u for u in chosen if not any(u.startswith(v + ".") for v in chosen if v != u)]
