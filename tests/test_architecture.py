"""The core's shape, checked: no import cycles, no private names across modules, no private
attributes of Fabric or jsonargparse, no method names in the core."""

from __future__ import annotations

import ast
import re

from conftest import REPO

CORE = REPO / "collab_distill"


def _imports(path) -> set[str]:
    """Every ``collab_distill.<module>`` a file imports, at module level or inside functions."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: no import at run time
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collab_distill"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from collab_distill import x
                found |= {a.name for a in node.names if (CORE / f"{a.name}.py").is_file()}
            elif parts[1] in {p.stem for p in CORE.glob("*.py")}:
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "collab_distill" and len(parts) > 1 and (CORE / f"{parts[1]}.py").is_file():
                    found.add(parts[1])
    return found


def test_core_import_graph_has_no_cycles():
    graph = {p.stem: _imports(p) - {p.stem} for p in CORE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    # the package root only re-exports; no core module imports it except for re-exported names
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_no_private_names_across_modules_and_no_private_library_attributes():
    offenders = []
    for path in [*CORE.glob("*.py"), *(REPO / "plugins").glob("*.py"), *(REPO / "tasks").rglob("*.py")]:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collab_distill"):
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
        for pattern in (r"fabric\._\w+", r"_name_parser_map", r"_subcommands_action", r"engine\._\w+"):
            offenders += [f"{path.name}: {m}" for m in re.findall(pattern, text)]
    assert offenders == []


def test_no_method_names_in_the_core():
    methods = ("mc_distil", "cnet", "kdcl", "dml", "fitnets", "metadistiller", "takd", "dgkd", "rmc", "dkd")
    for path in CORE.glob("*.py"):
        if path.stem in ("testing",):  # the kit's docstring examples may name a plugin
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.strip().startswith("#"))
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.Compare)):
                snippet = ast.unparse(node.test if isinstance(node, ast.If) else node).lower()
                assert not any(m in snippet for m in methods), f"{path.name}: {snippet}"
