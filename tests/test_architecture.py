"""The shape of the code: one-way layers, no import cycle, no module over 500 lines, no private name borrowed.

The layers, bottom to top (docs/architecture.md draws them); a module may import its own layer and the ones
below, never one above, at the top of the file or inside a function:

    vocabulary   errors, units, categories, vocab, importer, files, hardware      (torch-free)
    data         profiles, plans and their schemas, loading                        (torch-free)
    render       report, plots, forensics and the words they use                   (torch-free)
    torch        helpers on models: structure, training, sharding, rng, zoo
    tracking     measuring a real step
    estimation   measuring a step of fake tensors (uses tracking)
    policy       deciding and applying (uses both)
    api          the package's names (lazy), the script runner
    cli          commands (on top)

The import graph is read from the source (``ast``), so a test of it cannot be fooled by what happens to be
imported already in this process; the torch-free claims are checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memprof"
MAX_LINES = 500

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("vocabulary", ("memprof._version", "memprof.errors", "memprof.units", "memprof.categories", "memprof.vocab",
                    "memprof.importer", "memprof.files", "memprof.hardware")),
    ("data", ("memprof.profiles", "memprof.profile_schema", "memprof.plans", "memprof.plan_schema", "memprof.plan_toml",
              "memprof.loading")),
    ("render", ("memprof.render", "memprof.report", "memprof.plots", "memprof.forensics", "memprof.peak_words",
                "memprof.advice")),
    ("torch", ("memprof.structure", "memprof.training", "memprof.sharding", "memprof.rng", "memprof.zoo",
               "memprof.activation_offload")),
    ("tracking", ("memprof.tracking",)),
    ("estimation", ("memprof.estimation",)),
    ("policy", ("memprof.policy",)),
    ("api", ("memprof", "memprof.runner")),
    ("cli", ("memprof.cli", "memprof.__main__")),
]
TORCH_FREE = ("vocabulary", "data", "render")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")
    return found


class _Import:
    def __init__(self, importer: str, target: str, line: int, lazy: bool, names: tuple[str, ...]) -> None:
        self.importer, self.target, self.line, self.lazy, self.names = importer, target, line, lazy, names

    def __repr__(self) -> str:
        kind = "lazy " if self.lazy else ""
        return f"{self.importer}:{self.line} {kind}imports {self.target}"


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[_Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[_Import] = []

    def visit(node, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("memprof"):
                        out.append(_Import(module, _known(a.name), child.lineno, lazy, ()))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                if not name.startswith("memprof"):
                    continue
                for a in child.names:
                    sub = f"{name}.{a.name}"
                    target = sub if sub in MODULES else _known(name)
                    names = () if sub in MODULES else (a.name,)
                    out.append(_Import(module, target, child.lineno, lazy, names))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
            else:
                visit(child, lazy)

    visit(ast.parse(path.read_text()), False)
    return [i for i in out if i.target and i.target != module]


ALL_IMPORTS = [i for m in MODULES for i in imports_of(m)]


def test_every_module_is_in_a_layer():
    for m in MODULES:
        layer_of(m)


def test_nothing_imports_a_layer_above_its_own():
    upward = [f"{i} ({LAYERS[layer_of(i.importer)][0]} -> {LAYERS[layer_of(i.target)][0]})"
              for i in ALL_IMPORTS if layer_of(i.target) > layer_of(i.importer)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_package_imports_nothing_heavy_when_imported():
    """``import memprof`` (which every submodule import runs first) binds its API names lazily."""
    eager = [i for i in imports_of("memprof") if not i.lazy and i.target not in ("memprof._version", "memprof.errors")]
    assert not eager, eager


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in ALL_IMPORTS:
        graph[i.importer].add(i.target)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer lives inside them.
        parts = i.target.split(".")
        for k in range(2, len(parts)):
            parent = ".".join(parts[:k])
            if parent in MODULES and not i.importer.startswith(parent + ".") and parent != i.importer:
                graph[i.importer].add(parent)
    graph["memprof"] = set()  # binds names lazily (checked above): running it imports nothing
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            strongconnect(v)
    return found


def test_no_import_cycle():
    assert not _cycles(_graph())


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_private_name_is_imported_from_another_module():
    borrowed = [f"{i}: {', '.join(n for n in i.names if n.startswith('_'))}" for i in ALL_IMPORTS
                if any(n.startswith("_") and not n.startswith("__") for n in i.names)]
    assert not borrowed, "\n".join(borrowed)


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip()


def test_the_torch_free_layers_import_without_torch():
    names = [m for m in MODULES if LAYERS[layer_of(m)][0] in TORCH_FREE]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in names) +
            "print(sorted(m for m in ('torch', 'memprof.tracking', 'memprof.estimation', 'memprof.policy') "
            "if m in sys.modules))")
    assert _fresh(code) == "[]"


@pytest.mark.parametrize("what", ["help", "render", "memprof report", "memprof diff"])
def test_reading_and_rendering_a_profile_does_not_import_torch(tmp_path, what):
    from tests.report_fixtures import track_gpt

    path = tmp_path / "p.json"
    track_gpt().save(path)
    if what != "render":
        args = {"help": ["--help"], "memprof report": ["report", str(path)],
                "memprof diff": ["diff", str(path), str(path)]}[what]
        code = ("import sys\nfrom click.testing import CliRunner\nfrom memprof.cli import main\n"
                f"r = CliRunner().invoke(main, {args!r})\nassert r.exit_code == 0, r.output\n")
    else:
        code = (f"import sys\nimport memprof\nprof = memprof.load({str(path)!r})\n"
                "from memprof.report import render\nassert 'peak' in render(prof).lower()\n")
    assert _fresh(code + "print('torch' in sys.modules)") == "False"
