"""The package's folders are its layers, and imports point down (README, "How the code is laid out").

Every import counts, those under `TYPE_CHECKING` and inside functions included: a layer that
needs a higher one only to name a type still depends on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import p2psl

# Each layer and the layers it may import from (its own modules always may import each other).
ALLOWED = {
    "core": set(),
    "wire": {"core"},
    "planning": {"core"},
    "learning": {"core", "planning"},
    "viz": {"core", "planning"},
    "net": {"core", "wire"},
    "runtime": {"core", "wire", "planning", "learning", "net"},
    "cli": {"core", "wire", "planning", "learning", "viz", "net", "runtime"},
}
CORE_MODULES = {"p2psl", "p2psl.errors", "p2psl.units", "p2psl.topology", "p2psl.tasks"}


def layer_of(module: str) -> str:
    if module in CORE_MODULES or module.startswith("p2psl.topology."):
        return "core"
    if module == "p2psl.__main__":
        return "cli"
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in ALLOWED:
        raise AssertionError(f"{module} belongs to no layer: put it in one of {sorted(ALLOWED)}")
    return parts[1]


def modules(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports, wherever the import statement stands."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph(root: Path, package: str) -> nx.DiGraph:
    found = modules(root, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(found)
    for module, path in found.items():
        for target in imports(module, path, set(found)):
            # `import p2psl.x.y` also runs p2psl/x/__init__.py, but a package's own __init__ only
            # counts as an edge when something is taken from it.
            graph.add_edge(module, target)
    return graph


def upward_imports(graph: nx.DiGraph) -> list[str]:
    wrong = []
    for src, dst in graph.edges:
        a, b = layer_of(src), layer_of(dst)
        if a != b and b not in ALLOWED[a] and dst != "p2psl":
            wrong.append(f"{src} ({a}) imports {dst} ({b})")
    return sorted(wrong)


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    package_edges = [(s, d) for s, d in graph.edges if not s.startswith(d + ".")]
    return list(nx.simple_cycles(nx.DiGraph(package_edges)))


def test_every_import_points_down_a_layer():
    graph = import_graph(Path(p2psl.__file__).parent, "p2psl")
    assert upward_imports(graph) == []


def test_no_import_cycle_type_checking_included():
    graph = import_graph(Path(p2psl.__file__).parent, "p2psl")
    assert cycles(graph) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small package laid out like p2psl, with one module per layer."""
    root = tmp_path / "p2psl"
    for folder in ("wire", "net", "runtime"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("class P2PSLError(Exception): ...\n")
    (root / "wire" / "codec.py").write_text("from p2psl.errors import P2PSLError\n")
    (root / "net" / "link.py").write_text("from p2psl.wire import codec\n")
    (root / "runtime" / "peer.py").write_text("from p2psl.net.link import codec\n")
    return root


def test_the_layer_check_sees_an_upward_import(tree: Path):
    assert upward_imports(import_graph(tree, "p2psl")) == []
    (tree / "wire" / "codec.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p2psl.runtime.peer import Peer\n")
    assert upward_imports(import_graph(tree, "p2psl")) == ["p2psl.wire.codec (wire) imports p2psl.runtime.peer (runtime)"]


def test_the_cycle_check_sees_a_cycle_made_by_a_function_level_import(tree: Path):
    assert cycles(import_graph(tree, "p2psl")) == []
    (tree / "net" / "link.py").write_text("from p2psl.wire import codec\n\ndef f():\n    from . import other\n")
    (tree / "net" / "other.py").write_text("from .link import f\n")
    assert sorted(map(sorted, cycles(import_graph(tree, "p2psl")))) == [["p2psl.net.link", "p2psl.net.other"]]
