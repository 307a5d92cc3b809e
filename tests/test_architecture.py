"""The package graph of ``lamina``: no cycle, and every import goes down the layering.

Every module's imports are read from its syntax tree, those at module level and those in
function bodies alike (a function-level import is a dependency that only waits for its
first call); imports under ``if TYPE_CHECKING:`` are left out (annotations only). A
"package" is a subpackage of ``lamina`` (``lamina.layer``) or a top-level module
(``lamina.errors``); the package itself (``lamina/__init__.py``) is ``lamina``.

Run as a script (``python tests/test_architecture.py``) it prints the measures of the
structure: the import edges between packages, the function-level imports that cross a
package boundary, and the modules over 350 lines.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# The layering, lowest first: a package imports only from packages of a lower tier, so
# packages of one tier know nothing of each other. A new package must be placed here.
TIERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("foundations", frozenset({"errors", "files", "logs", "_tuning", "units"})),
    ("names, locks, settings", frozenset({"names", "locks", "control", "settings", "lamina"})),
    ("chunk store, NBD protocol, TLS trust", frozenset({"store", "nbd", "trust"})),
    ("a home's folders, identities", frozenset({"home", "identity"})),
    ("images", frozenset({"image"})),
    ("machine deltas, file-tree layers, network boot", frozenset({"delta", "layer", "netboot"})),
    ("rebase, streaming endpoint", frozenset({"rebase", "stream"})),
    ("manager: database, services, API, console", frozenset({"manager"})),
    ("block server, guest agent", frozenset({"serve", "agent"})),
    ("demo", frozenset({"demo"})),
    ("guest kit, golden images", frozenset({"guest"})),
    ("command line", frozenset({"cli"})),
)
RANK = {pkg: rank for rank, (_, pkgs) in enumerate(TIERS) for pkg in pkgs}


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module, lamina.x.y
    target: str  # the imported module, lamina.z
    line: int
    in_function: bool

    @property
    def edge(self) -> tuple[str, str]:
        return package(self.module), package(self.target)

    def __str__(self) -> str:
        where = " (in a function)" if self.in_function else ""
        return f"{self.module}:{self.line} imports {self.target}{where}"


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def modules(src: Path = SRC) -> Iterator[tuple[str, Path]]:
    for path in sorted((src / "lamina").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join([*parts, node.module] if node.module else parts)
    else:
        base = node.module or ""
    # ``from lamina.x import y`` imports the module lamina.x.y when there is one
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def imports(module: str, path: Path, known: set[str]) -> Iterator[Import]:
    """The ``lamina`` imports of one module (``known``: every module's name),
    TYPE_CHECKING blocks left out."""
    is_package = path.name == "__init__.py"

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    yield from walk_one(other, in_function)
                continue
            yield from walk_one(child, in_function)

    def walk_one(node: ast.AST, in_function: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in sorted(_targets(node, module, is_package, known)):
                if target == "lamina" or target.startswith("lamina."):
                    yield Import(module, target, node.lineno, in_function)
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        yield from walk(node, inner)

    yield from walk(ast.parse(path.read_text(), str(path)), False)


def all_imports(src: Path = SRC) -> list[Import]:
    found = list(modules(src))
    known = {module for module, _ in found}
    return [imp for module, path in found for imp in imports(module, path, known)]


def package_graph(found: list[Import]) -> dict[str, dict[str, list[Import]]]:
    graph: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for imp in found:
        a, b = imp.edge
        if a != b:
            graph[a][b].append(imp)
    return graph


def cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The shortest cycle through each package of every strongly connected group of
    packages (Tarjan's algorithm finds the groups), each cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out: list[list[str]] = []
    for group in groups:
        seen: set[frozenset[str]] = set()
        for start in sorted(group):
            cycle = _cycle_through(graph, set(group), start)
            if frozenset(cycle) not in seen:
                seen.add(frozenset(cycle))
                out.append(cycle)
    return out


def _cycle_through(
    graph: dict[str, dict[str, list[Import]]], group: set[str], start: str
) -> list[str]:
    """A shortest cycle through ``start`` within its group (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, {})):
            if w == start:
                return [*paths[v], start]
            if w in group and w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return sorted(group)


def _explain(graph: dict[str, dict[str, list[Import]]], cycle: list[str]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in pairwise(cycle):
        lines.append(f"  {a} -> {b}: {graph[a][b][0]}")
    return "\n".join(lines)


# -- the tests --------------------------------------------------------------------------------


def test_no_cycle_between_packages() -> None:
    graph = package_graph(all_imports())
    found = cycles(graph)
    assert not found, "import cycles between lamina packages:\n" + "\n".join(
        _explain(graph, c) for c in found
    )


def test_every_package_is_placed_in_the_layering() -> None:
    unplaced = sorted({package(m) for m, _ in modules()} - set(RANK))
    assert not unplaced, f"packages missing from TIERS: {unplaced}"


def test_imports_go_down_the_layering() -> None:
    upward = [imp for imp in all_imports() if imp.edge[0] != imp.edge[1] and _upward(*imp.edge)]
    assert not upward, "imports against the layering (TIERS):\n" + "\n".join(
        f"  {imp}  [{_tier(imp.edge[0])} -> {_tier(imp.edge[1])}]" for imp in upward
    )


def _upward(a: str, b: str) -> bool:
    return RANK.get(a, len(TIERS)) <= RANK.get(b, len(TIERS))


def _tier(pkg: str) -> str:
    return TIERS[RANK[pkg]][0] if pkg in RANK else "unplaced"


def test_every_package_maps_its_modules() -> None:
    """Each package's docstring has a line per module and subpackage, starting with its
    name (``name.py``, ``name/``, or names joined by commas), then two spaces or more."""
    missing = []
    for init in sorted((SRC / "lamina").rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        mapped = set()
        for line in doc.splitlines():
            head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            mapped |= {n.strip().removesuffix(".py").removesuffix("/") for n in head.split(",")}
        for child in sorted(init.parent.iterdir()):
            is_module = child.suffix == ".py" and child.name != "__init__.py"
            is_package = child.is_dir() and (child / "__init__.py").exists()
            if (is_module or is_package) and child.stem not in mapped:
                missing.append(f"{init.relative_to(SRC)}: {child.name}")
    assert not missing, "modules missing from their package's docstring map:\n" + "\n".join(missing)


def test_the_checks_see_function_level_imports(tmp_path: Path) -> None:
    """A cycle hidden in a function body is found; a TYPE_CHECKING import is not one."""
    pkg = tmp_path / "lamina"
    for name, text in {
        "__init__.py": "",
        "low/__init__.py": "def f():\n    from lamina.high import x\n",
        "high/__init__.py": "from lamina.low import f\n",
        "other/__init__.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lamina.high import x\n"
        ),
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = package_graph(all_imports(tmp_path))
    assert cycles(graph) == [["high", "low", "high"]]
    assert "other" not in graph


# -- measures ---------------------------------------------------------------------------------


def main() -> None:
    found = all_imports()
    graph = package_graph(found)
    crossing = [imp for imp in found if imp.in_function and imp.edge[0] != imp.edge[1]]
    print(f"cross-package function-level imports: {len(crossing)}")
    for (a, b), n in Counter(imp.edge for imp in crossing).most_common():
        print(f"  {a} -> {b}: {n}")
    print("cycles:", cycles(graph) or "none")
    print("package edges:")
    for a in sorted(graph):
        print(f"  {a} -> {', '.join(sorted(graph[a]))}")
    long = [(len(p.read_text().splitlines()), m) for m, p in modules()]
    over = sorted((n, m) for n, m in long if n > 350)
    print(f"modules over 350 lines: {len(over)}")
    for n, m in over:
        print(f"  {n:5d} {m}")


if __name__ == "__main__":
    sys.exit(main())
