"""The package's layout holds: no import cycles, the client side imports nothing of the server,
and ``import auditor`` loads nothing until a public name is used.

Read from the source with ``ast``: module-level imports only (an import inside a function is a
deliberate lazy edge, and ``if TYPE_CHECKING:`` blocks never run).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "auditor"
SERVER_SIDE = ("auditor.service.server", "auditor.service.cluster", "auditor.service.jobs", "auditor.service.persist")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The auditor modules that ``path`` imports when it is imported."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_the_import_graph_has_no_cycles(graph: dict[str, set[str]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize("module", ["auditor.service.client", "auditor.service.wire"])
def test_the_client_side_imports_no_server_side_module(graph: dict[str, set[str]], module: str) -> None:
    reached, todo = set(), [module]
    while todo:
        name = todo.pop()
        for imported in graph[name] - reached:
            reached.add(imported)
            todo.append(imported)
    assert not {name for name in reached if name.startswith(SERVER_SIDE)}
    assert not {name for name in reached if name.startswith("auditor.engine")}


def test_the_public_names_are_the_functions_and_import_auditor_loads_none_of_them() -> None:
    probe = (
        "import json, sys, types\n"
        "import auditor\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('auditor.', 'onnx')))\n"
        "kinds = {n: isinstance(getattr(auditor, n), types.ModuleType) for n in auditor.__all__}\n"
        "print(json.dumps([loaded, kinds]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    loaded, kinds = json.loads(result.stdout.splitlines()[-1])
    assert loaded == []
    public = ["AuditConfig", "AuditError", "Prepared", "Report", "audit", "find_layers", "prepare", "shrink"]
    assert kinds == dict.fromkeys(public, False)
