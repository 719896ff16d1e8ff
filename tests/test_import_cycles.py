"""No import circle inside ``gpconv/``, and the core's modules import in the order docs/architecture.md
writes ("Import order in the core"), read from the document so that the two cannot drift apart.

Every module is parsed with ``ast``: imports at module level and inside functions, absolute and
relative, ``from . import x`` included (a name that is a submodule is an edge to that submodule). The
parent packages Python runs on the way to a module are not edges (every module of a package whose
``__init__`` imports its submodules would otherwise be in a circle with it); a package named in the
import itself is one, unless it is a parent of the importing module."""

import ast
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

from conftest import ROOT

ARCHITECTURE = ROOT / "docs" / "architecture.md"
ORDER_MARKER = "Import order in the core"
ORDER_CHAIN = re.compile(r"`gpconv/[\w/]+\.py`(?:\s*→\s*`gpconv/[\w/]+\.py`)+")
CORE = ("gpconv.core", "gpconv.layers")  # the core layer of docs/architecture.md's table

Graph = Dict[str, Set[str]]


def module_name(path: Path, root: Path) -> str:
    """``gpconv/core/block.py`` -> ``gpconv.core.block``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path, package: str = "gpconv") -> Dict[str, Path]:
    """Every module of ``package`` (a folder under ``root``) by its dotted name."""
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}


def _longest_module(dotted: str, known: Set[str]) -> Optional[str]:
    parts = dotted.split(".")
    return next((".".join(parts[:end]) for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in known), None)


def _is_parent(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def imported_modules(path: Path, name: str, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that the module ``name`` (file ``path``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[Optional[str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_longest_module(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names) or not _is_parent(base, name):
                found.add(_longest_module(base, known))
    return {module for module in found if module is not None and module != name}


def import_graph(root: Path = ROOT, packages: Iterable[str] = ("gpconv",)) -> Graph:
    """``{module: modules it imports}`` over the modules of ``gpconv`` inside ``packages`` (dotted names of
    packages or modules), edges between those modules only."""
    modules = package_modules(root)
    inside = {name for name in modules if any(_is_parent(package, name) for package in packages)}
    return {name: imported_modules(modules[name], name, set(modules)) & inside for name in sorted(inside)}


def _circle_through(graph: Graph, start: str, component: Set[str]) -> List[str]:
    """A shortest circle from ``start`` back to it inside ``component`` (breadth first)."""
    previous = {start: None}
    queue = [start]
    for node in queue:
        for target in sorted(graph[node] & component):
            if target == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]
            if target not in previous:
                previous[target] = node
                queue.append(target)
    raise AssertionError(f"{start} is in no circle of its component")


def _components(graph: Graph) -> List[Set[str]]:
    """The strongly connected components of ``graph`` (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    components: List[Set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while not component or member != node:
                member = stack.pop()
                component.add(member)
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(root: Path = ROOT, packages: Iterable[str] = ("gpconv",)) -> List[List[str]]:
    """One circle per group of modules that import each other, ``[a, b, ..., a]``; empty when there is none."""
    graph = import_graph(root, packages)
    return [_circle_through(graph, min(component), component) for component in _components(graph)
            if len(component) > 1]


def documented_core_order(document: Path = ARCHITECTURE) -> List[str]:
    """The core's modules, lowest first, from the chain of paths (``a`` → ``b`` → ...) in the paragraph
    of ``document`` that names ``ORDER_MARKER``."""
    paragraphs = [part for part in document.read_text().split("\n\n") if ORDER_MARKER in part]
    assert len(paragraphs) == 1, f"{document.name}: one paragraph must name {ORDER_MARKER!r}, found {len(paragraphs)}"
    chains = ORDER_CHAIN.findall(paragraphs[0])
    assert len(chains) == 1, f"{document.name}: the {ORDER_MARKER!r} paragraph must hold one chain a → b → ..."
    return [module_name(ROOT / path, ROOT) for path in re.findall(r"`(gpconv/[\w/]+\.py)`", chains[0])]


def order_violations(order: List[str], graph: Graph) -> List[str]:
    """Each import of a core module that goes to a core module not before it in ``order``."""
    position = {name: place for place, name in enumerate(order)}
    problems = []
    for module in order:
        for imported in sorted(graph.get(module, ())):
            if imported not in position:
                problems.append(f"{module} imports {imported}, which is not in the order")
            elif position[imported] >= position[module]:
                problems.append(f"{module} imports {imported}, which comes after it in the order")
    return problems


def _report(cycles: List[List[str]]) -> str:
    return "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_import_cycle_in_the_core():
    cycles = find_cycles(packages=CORE)
    assert not cycles, _report(cycles)


def test_no_import_cycle_in_gpconv():
    cycles = find_cycles()
    assert not cycles, _report(cycles)


def test_core_modules_import_in_the_documented_order():
    order = documented_core_order()
    assert len(order) == len(set(order)), f"a module named twice in the order: {order}"
    graph = import_graph(packages=CORE)
    modules = set(graph) - {"gpconv.core"}  # the package's __init__ names the modules, imports none
    assert set(order) == modules, (f"docs/architecture.md's order misses {sorted(modules - set(order))} and names "
                                   f"{sorted(set(order) - modules)}, which are not core modules")
    assert not graph["gpconv.core"], f"gpconv/core/__init__.py imports {sorted(graph['gpconv.core'])}"
    problems = order_violations(order, graph)
    assert not problems, "against docs/architecture.md's import order of the core:\n" + "\n".join(problems)


def test_circles_and_order_violations_are_found(tmp_path):
    """Function-level, relative (``from . import x``, ``from ..a import y``) and absolute imports count;
    a package's ``__init__`` importing its modules makes no circle."""
    files = {
        "__init__.py": "from .a import f\nfrom . import d\n",
        "a.py": "def f():\n    from . import b\n    return b\n",
        "b.py": "import gpconv.sub.c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import f\n",
        "d.py": "from .e import g\n",
        "e.py": "g = 1\n",
    }
    for name, text in files.items():
        path = tmp_path / "gpconv" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert find_cycles(tmp_path) == [["gpconv.a", "gpconv.b", "gpconv.sub.c", "gpconv.a"]]
    assert find_cycles(tmp_path, packages=("gpconv.d", "gpconv.e")) == []
    graph = import_graph(tmp_path)
    assert graph["gpconv"] == {"gpconv.a", "gpconv.d"} and graph["gpconv.d"] == {"gpconv.e"}
    assert order_violations(["gpconv.e", "gpconv.d"], graph) == []
    assert order_violations(["gpconv.d", "gpconv.e"], graph) == [
        "gpconv.d imports gpconv.e, which comes after it in the order"]


MAX_LINES = 400  # issue 26: a module one can read in one sitting


def test_no_module_in_gpconv_is_over_400_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in package_modules(ROOT).items()}
    assert long and not {name: lines for name, lines in long.items() if lines > MAX_LINES}
