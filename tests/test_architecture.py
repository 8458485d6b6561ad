"""The core's shape, checked: no import cycles, no private names across modules, no private
attributes of Fabric or jsonargparse, no method names in the core."""

from __future__ import annotations

import ast
import re

from conftest import REPO

CORE = REPO / "collab_distill"


def _module_name(path) -> str:
    """``engine``, ``training.state``: a core module's name below ``collab_distill``."""
    return ".".join(path.relative_to(CORE).with_suffix("").parts)


MODULES = {_module_name(p) for p in CORE.rglob("*.py")} - {"__init__", "__main__"}


def _imports(path) -> set[str]:
    """Every core module a file imports, at module level, inside functions or only for type
    annotations (``if TYPE_CHECKING:``): a cycle of type-only imports is still a cycle."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "collab_distill":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:  # `from collab_distill.training import build` imports a module
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("collab_distill.")}
    return {m for m in found if m in MODULES}


def test_core_import_graph_has_no_cycles():
    graph = {_module_name(p): _imports(p) - {_module_name(p)} for p in CORE.rglob("*.py")
             if _module_name(p) in MODULES and not p.name == "__init__.py"}
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


def test_the_engine_is_small_and_nothing_else_reaches_into_it():
    """engine.py <= 350 lines, Engine <= 20 instance attributes; only the two modules that build
    an engine (cli, testing) import it; nothing assigns to an engine's attributes outside its class."""
    engine = CORE / "engine.py"
    assert len(engine.read_text().splitlines()) <= 350
    tree = ast.parse(engine.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    attributes = {t.attr for n in ast.walk(cls) for t in getattr(n, "targets", [getattr(n, "target", None)])
                  if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert len(attributes) <= 20, sorted(attributes)
    importers = [p.name for p in CORE.rglob("*.py") if p != engine
                 and re.search(r"from collab_distill\.engine import[^\n]*\bEngine\b", p.read_text())]
    assert sorted(importers) == ["cli.py", "testing.py"]
    writes = []
    for path in [*CORE.rglob("*.py"), *(REPO / "plugins").glob("*.py"), *(REPO / "tasks").rglob("*.py")]:
        if path == engine:
            continue
        writes += [f"{path.name}: {m}" for m in re.findall(r"\b(?:engine|parent|sub)\.\w+ *(?:=|\+=)(?!=)", path.read_text())]
    assert writes == []


def test_no_shipped_file_over_450_lines():
    """The core and the built-in plugins and tasks (installed as collab_distill.plugins and
    collab_distill.tasks): every source file at most 450 lines."""
    shipped = [*CORE.rglob("*.py"), *(REPO / "plugins").rglob("*.py"), *(REPO / "tasks").rglob("*.py")]
    too_long = {str(p.relative_to(REPO)): n for p in shipped if (n := len(p.read_text().splitlines())) > 450}
    assert too_long == {}


def test_no_private_names_across_modules_and_no_private_library_attributes():
    offenders = []
    for path in [*CORE.rglob("*.py"), *(REPO / "plugins").glob("*.py"), *(REPO / "tasks").rglob("*.py")]:
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
    for path in CORE.rglob("*.py"):
        if path.stem in ("testing",):  # the kit's docstring examples may name a plugin
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.strip().startswith("#"))
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.Compare)):
                snippet = ast.unparse(node.test if isinstance(node, ast.If) else node).lower()
                assert not any(m in snippet for m in methods), f"{path.name}: {snippet}"
