"""The package layout: subpackages in layers, imports only downward, no import cycles, no oversized modules.

lora_cli's subpackages are layers, lowest first (`LAYERS`, declared here and nowhere else). A module imports
from its own subpackage and from those below it, never from one above. Every import counts: at module level,
inside functions, under `if TYPE_CHECKING:`, relative or absolute, `from lora_cli.x import y`,
`from lora_cli import x`, `import lora_cli.x`. Between modules there is no cycle, in a layer or across.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_cli"

# Lowest first. A server will sit on top beside cli (its own layer after cli, or cli's peer: neither imports the
# other). A task besides classification adds its modules to tasks/ (and to data/ and evaluation/ as needed).
LAYERS = (
    "util",        # the error type, atomic files, the schema reader, HTTP downloads; no torch
    "runtime",     # how the compute runs: device, malloc settings, precision, a CPU batch as two halves
    "models",      # the family registry, GPT-2, the decoder Llama 3 and Qwen3 share, their Hugging Face mappings
    "lora",        # the LoRA settings type, the LoRA layers, fused autograd nodes and module surgery
    "data",        # table readers and label sets, tokenizers, SMS spam, where models and data sets live
    "formats",     # base checkpoints, the metadata schemas, run directories, `info`
    "hub",         # pretrained weights from Hugging Face: download, convert
    "evaluation",  # batched inference, metrics, calibration
    "tasks",       # what each task trains on top of a base: head, loss, its own metrics (classification)
    "adapters",    # adapter files (they carry a task's head and labels), PEFT directories, merging
    "training",    # the recipe, the run's setup, the loop, the resume state, data parallelism
    "api",         # the library's front door (Classifier, train), which the CLI and a server call
    "serve",       # many adapters on one base over HTTP: the mixed-batch model, the scheduler, the ASGI app
    "cli",         # the command line, its tables and plots
)
ROOT_MODULE = "lora_cli"  # __init__: __version__, and the front door re-exported lazily; any module may import it
FRONT_DOOR = {"lora_cli.api.classifier", "lora_cli.api.generator", "lora_cli.api.training"}  # what `lora_cli.__getattr__` imports
ENTRY = "lora_cli.__main__"  # `python -m lora_cli`: above every layer

LINE_LIMIT = 550  # "about 500": a module past it holds a second concern worth its own file
# Modules allowed over LINE_LIMIT, each with the reason and when that ends (none today).
OVER_LIMIT: set[str] = set()
# Over 500 lines today (under the limit, to watch): lora/layers.py, training/loop.py.


@dataclass(frozen=True)
class Edge:
    source: str  # module that imports
    target: str  # module imported
    path: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root.parent)}:{self.line}"


def modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module and package of `package` (a package is its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def is_package(name: str, known: dict[str, Path]) -> bool:
    return known[name].name == "__init__.py"


def imports(name: str, path: Path, known: dict[str, Path], root: Path) -> tuple[list[Edge], list[str]]:
    """The lora_cli modules `name` imports, anywhere in it; and problems (imports of modules that do not exist)."""
    top = name.split(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    edges, problems = [], []

    def add(target: str, line: int) -> None:
        if target.split(".")[0] != top:
            return
        if target not in known:
            problems.append(f"{path.relative_to(root.parent)}:{line}: {name} imports {target}, which does not exist")
            return
        if target != name:
            edges.append(Edge(name, target, path, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if is_package(name, known) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                module = f"{package}.{node.module}" if node.module else package
            else:
                module = node.module or ""
            if module.split(".")[0] != top:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in known else module, node.lineno)
    return edges, problems


def layer(name: str) -> int | None:
    """Position in LAYERS; -1 for the root package, len(LAYERS) for __main__; None for a module outside them."""
    if name == ROOT_MODULE:
        return -1
    if name == ENTRY:
        return len(LAYERS)
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def graph(package: Path) -> tuple[dict[str, Path], list[Edge], list[str]]:
    known = modules(package)
    edges, problems = [], []
    for name, path in known.items():
        e, p = imports(name, path, known, package)
        edges += e
        problems += p
    return known, edges, problems


def upward(edges: list[Edge], root: Path, rank=layer, names: tuple[str, ...] = LAYERS) -> list[str]:
    out = []
    for e in edges:
        src, dst = rank(e.source), rank(e.target)
        if src is not None and dst is not None and dst > src:
            what = "the entry point" if dst == len(names) else f"{names[dst]} is above {names[src]}" \
                if src >= 0 else f"{ROOT_MODULE} imports nothing of its own"
            out.append(f"{e.where(root)}: {e.source} imports {e.target} ({what} in LAYERS)")
    return out


def cycles(edges: list[Edge], root: Path) -> list[str]:
    """One message per strongly connected group of modules (Tarjan), naming a cycle in it edge by edge."""
    succ: dict[str, dict[str, Edge]] = {}
    for e in edges:
        succ.setdefault(e.source, {}).setdefault(e.target, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        start = min(group)
        path = _path_back(start, group, succ)
        hops = " -> ".join(f"{e.source} ({e.where(root)}: imports {e.target})" for e in path)
        out.append(f"import cycle among {', '.join(sorted(group))}: {hops}")
    return out


def _path_back(start: str, group: set[str], succ: dict[str, dict[str, Edge]]) -> list[Edge]:
    """Edges of a shortest cycle through `start`, inside `group` (breadth first)."""
    previous: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, e in sorted(succ.get(v, {}).items()):
                if w not in group:
                    continue
                if w == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, previous[path[0].source])
                    return path
                if w not in previous:
                    previous[w] = e
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def lazy_front_door(e: Edge) -> bool:
    """The root package's re-export of the front door: imported inside `lora_cli.__getattr__`, on first use."""
    return e.source == ROOT_MODULE and e.target in FRONT_DOOR


@pytest.fixture(scope="module")
def package_graph() -> tuple[dict[str, Path], list[Edge], list[str]]:
    """The import graph, without the root package's lazy re-export of the front door (no cycle: it runs later)."""
    known, edges, problems = graph(PACKAGE)
    return known, [e for e in edges if not lazy_front_door(e)], problems


def test_the_root_package_imports_only_the_front_door():
    _, edges, _ = graph(PACKAGE)
    root = {e.target for e in edges if e.source == ROOT_MODULE}
    assert root == FRONT_DOOR, f"lora_cli/__init__.py imports {sorted(root)}; it re-exports only {sorted(FRONT_DOOR)}"


def test_every_module_is_in_a_layer(package_graph):
    known, _, _ = package_graph
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages == set(LAYERS), f"subpackages not in LAYERS: {sorted(subpackages - set(LAYERS))}; " \
                                       f"LAYERS without a subpackage: {sorted(set(LAYERS) - subpackages)}"
    outside = [str(p.relative_to(ROOT)) for n, p in known.items() if layer(n) is None]
    assert not outside, f"modules outside the subpackages of LAYERS (move them into one): {outside}"
    stray = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"
             and not (p / "__init__.py").exists()]
    assert not stray, f"folders in lora_cli without an __init__.py: {stray}"


def test_imports_name_existing_modules(package_graph):
    _, _, problems = package_graph
    assert not problems, "\n".join(problems)


def test_imports_only_go_down(package_graph):
    _, edges, _ = package_graph
    bad = upward(edges, PACKAGE)
    assert not bad, "imports from a layer above (LAYERS in tests/test_layout.py):\n" + "\n".join(bad)


def test_no_import_cycles(package_graph):
    _, edges, _ = package_graph
    bad = cycles(edges, PACKAGE)
    assert not bad, "\n".join(bad)


def test_package_inits_import_nothing(package_graph):
    """A subpackage's __init__ is its docstring: importing `lora_cli.cli.commands` (for `--help`) must not pull in
    the rest of cli, nor any layer through it."""
    known, edges, _ = package_graph
    bad = [f"{e.where(PACKAGE)}: {e.source} imports {e.target}" for e in edges
           if e.source != ENTRY and is_package(e.source, known)]
    assert not bad, "\n".join(bad)


def test_module_size():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    over = {p: n for p, n in sizes.items() if n > LINE_LIMIT and p not in OVER_LIMIT}
    assert not over, f"modules over {LINE_LIMIT} lines (split them): {over}"
    stale = {p: sizes.get(p) for p in OVER_LIMIT if sizes.get(p, 0) <= LINE_LIMIT}
    assert not stale, f"OVER_LIMIT entries no longer over {LINE_LIMIT} lines (or gone); remove them: {stale}"


def test_pyproject_lists_every_subpackage():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    wanted = {f"lora_cli.{p.parent.relative_to(PACKAGE).as_posix().replace('/', '.')}"
              for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert wanted <= listed, f"subpackages missing from pyproject.toml's [tool.setuptools] packages: {sorted(wanted - listed)}"
    assert {"lora_cli", "lora_cli.configs"} <= listed


def test_checker_sees_every_import_form(tmp_path):
    """The checks above on a made-up package: each import form is an edge, an upward one and a cycle are named."""
    pkg = tmp_path / "lora_cli"
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from lora_cli.high.b import B\n",
        "low/c.py": "def f():\n    from . import a\n    from .a import x\n",
        "low/d.py": "from lora_cli import __version__\nimport lora_cli.low.c\nfrom lora_cli.low import c as cc\n",
        "high/__init__.py": "",
        "high/b.py": "from ..low import d\nfrom lora_cli.low.a import thing\nfrom lora_cli.gone import x\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    known, edges, problems = graph(pkg)
    seen = {(e.source, e.target, e.line) for e in edges}
    assert seen == {
        ("lora_cli.low.a", "lora_cli.high.b", 3),
        ("lora_cli.low.c", "lora_cli.low.a", 2), ("lora_cli.low.c", "lora_cli.low.a", 3),
        ("lora_cli.low.d", "lora_cli", 1), ("lora_cli.low.d", "lora_cli.low.c", 2), ("lora_cli.low.d", "lora_cli.low.c", 3),
        ("lora_cli.high.b", "lora_cli.low.d", 1), ("lora_cli.high.b", "lora_cli.low.a", 2),
    }
    assert problems == ["lora_cli/high/b.py:3: lora_cli.high.b imports lora_cli.gone, which does not exist"]

    def rank(name: str) -> int | None:
        return -1 if name == "lora_cli" else {"low": 0, "high": 1}[name.split(".")[1]]

    up = upward(edges, pkg, rank, ("low", "high"))
    assert up == ["lora_cli/low/a.py:3: lora_cli.low.a imports lora_cli.high.b (high is above low in LAYERS)"]
    loop = cycles(edges, pkg)
    assert len(loop) == 1 and "lora_cli.high.b (lora_cli/high/b.py:2: imports lora_cli.low.a)" in loop[0] \
        and "lora_cli.low.a (lora_cli/low/a.py:3: imports lora_cli.high.b)" in loop[0]


def test_the_slow_modules_exist():
    """conftest.SLOW_MODULES names test modules that exist: a renamed one would silently join the fast lane."""
    from conftest import SLOW_MODULES

    missing = sorted(m for m in SLOW_MODULES if not (ROOT / "tests" / f"{m}.py").is_file())
    assert not missing, f"conftest.SLOW_MODULES names modules that are not there: {missing}"
