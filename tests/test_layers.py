"""The package layering of `hutch/` (ARCHITECTURE.md, "Code map"), read from the imports.

Every import counts, those under `if TYPE_CHECKING:` too: a type is a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hutch"

# Lower layers first; a package may import its own layer's packages (without a cycle) and the
# layers below it, never one above.
LAYERS = [
    {"errors", "types"},
    {"agent", "client", "lifespan"},
    {"metadb", "storage"},
    {"runtime", "pricing", "config", "tenants"},
    {"functions", "templates"},
    {"scheduler"},
    {"metrics"},
    {"api", "gateway", "cluster"},
    {"server"},
    {"mcp", "asgi", "selftest"},
    {"cli", "__main__"},
]
HTTP_FRAMEWORKS = {"starlette", "fastapi"}
KNOW_HTTP = {"api", "gateway", "cluster"}


def _unit(path: Path) -> str:
    """A module's top-level package under hutch (or the module's name, for hutch/*.py)."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """The absolute module names a file imports."""
    module = ".".join(("hutch", *path.relative_to(ROOT).with_suffix("").parts))
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            names.add(name)
            names.update(f"{name}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    units = {_unit(p) for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {unit: set() for unit in units}
    for path in ROOT.rglob("*.py"):
        source = _unit(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "hutch" and len(parts) > 1 and parts[1] in units and parts[1] != source:
                graph[source].add(parts[1])
    return graph


def _layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"hutch/{unit} has no layer: add it to LAYERS (and to ARCHITECTURE.md)")


def test_every_package_imports_only_its_layer_and_below():
    wrong = [
        f"{source} -> {target}"
        for source, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer_of(target) > _layer_of(source)
    ]
    assert not wrong, f"imports against the layering: {wrong}"


def test_no_import_cycle_between_packages():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for target in sorted(graph[unit]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target] if target in path else [unit, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])


def test_only_the_http_packages_import_an_http_framework():
    offenders = sorted(
        str(path.relative_to(ROOT.parent))
        for path in ROOT.rglob("*.py")
        if _unit(path) not in KNOW_HTTP and any(n.split(".")[0] in HTTP_FRAMEWORKS for n in _imports(path))
    )
    assert not offenders, f"HTTP frameworks outside {sorted(KNOW_HTTP)}: {offenders}"


def test_the_agent_imports_nothing_of_hutch_but_errors():
    imported = {
        name
        for path in (ROOT / "agent").rglob("*.py")
        for name in _imports(path)
        if name.startswith("hutch.") and not name.startswith(("hutch.agent", "hutch.errors"))
    }
    assert not imported
