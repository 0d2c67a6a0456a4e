"""service/'s layout shows the design: two sides, the messages between them, dependencies one way.

Parsed with ``ast`` (nothing is imported): the engine imports neither the front end nor the wiring
(``service.app``); the front end never imports the engine (it reaches the model only through
``state.engine``, the engine client that ``service.app`` wires); and module-level imports among service modules
have no cycle. Imports inside functions (lazy, for torch or start-up order) and under
``if TYPE_CHECKING:`` count for the first two rules, and for the cycles between the wiring and the front end:
a front-end module that needs the wiring's types to be read is a circle all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SERVICE.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, here: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The service modules an import statement names (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:  # relative: from the package of ``here``
        pkg = here.split(".")
        pkg = pkg[: len(pkg) - node.level + (1 if is_pkg else 0)]
        base = ".".join([*pkg, *([base] if base else [])])
    out = {base}
    out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(path: Path, known: set[str], *, top_level_only: bool) -> set[str]:
    """The service modules ``path`` imports: all of them, or only those run when the module loads."""
    here = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(
                    t
                    for t in _targets(node, here, path.name == "__init__.py", known)
                    if t == "service" or t.startswith("service.")
                )
            elif top_level_only:
                if isinstance(node, ast.If) and not _is_type_checking(node):
                    visit(node.body)
                    visit(node.orelse)
                elif isinstance(node, ast.Try):
                    visit(node.body)
                    for h in node.handlers:
                        visit(h.body)
                    visit(node.orelse)
                    visit(node.finalbody)
                elif isinstance(node, ast.With):
                    visit(node.body)

    if top_level_only:
        visit(tree.body)
    else:
        visit([n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)])
    return found


def _names(targets: set[str], prefix: str) -> set[str]:
    return {t for t in targets if t == prefix or t.startswith(prefix + ".")}


def test_the_engine_imports_neither_the_front_end_nor_the_wiring():
    known = set(modules())
    bad = {
        name: sorted(
            _names(imports(path, known, top_level_only=False), "service.frontend")
            | _names(imports(path, known, top_level_only=False), "service.app")
        )
        for name, path in modules().items()
        if name.startswith("service.engine")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_front_end_never_imports_the_engine():
    """Not even ``service.engine.client``: front-end modules reach the model through ``state.engine``."""
    known = set(modules())
    bad = {
        name: sorted(_names(imports(path, known, top_level_only=False), "service.engine"))
        for name, path in modules().items()
        if name.startswith("service.frontend")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_shared_modules_import_neither_side():
    """service/'s top-level modules but the wiring (app, cli) are what both sides share: errors, messages,
    metrics, tracing, logs, settings. They import neither side, not even lazily."""
    known = set(modules())
    bad = {
        name: sorted(_names(targets, "service.frontend") | _names(targets, "service.engine"))
        for name, path in modules().items()
        if name.count(".") == 1 and name not in ("service.app", "service.cli")
        for targets in [imports(path, known, top_level_only=False)]
    }
    assert {k: v for k, v in bad.items() if v} == {}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None (depth-first, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if colour[m] == 1:
                return [*stack[stack.index(m) :], m]
            if colour[m] == 0 and (found := dfs(m)) is not None:
                return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if colour[n] == 0 and (found := dfs(n)) is not None:
            return found
    return None


def import_graph(*, top_level_only: bool = True) -> dict[str, set[str]]:
    """Imports among service modules (module-level ones, or all); importing ``a.b.c`` also runs ``a`` and ``a.b``."""
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        for t in imports(path, known, top_level_only=top_level_only):
            parts = t.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
        graph[name] = edges - {name}
    return graph


def test_module_level_imports_have_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["service.app"], "the graph was built from nothing"
    assert _cycle(graph) is None


def test_the_wiring_and_the_front_end_have_no_cycle_even_through_lazy_imports():
    """service.app imports the front end; no front-end module imports it back, not in a function, not for types.
    (``service.frontend.worker`` may start the wiring: nothing the wiring imports leads back to it.)"""
    graph = import_graph(top_level_only=False)
    side = {n for n in graph if n == "service.app" or n == "service.frontend" or n.startswith("service.frontend.")}
    sub = {n: graph[n] & side for n in side}
    assert len(sub) > 15 and "service.frontend.heatmap" in sub["service.app"], "the graph was built from nothing"
    assert _cycle(sub) is None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# -- no other project's private names: an upgrade can change them without a sign (issue 20's uvicorn drain) --

OURS = {"service", "mha_core", "mha_client"}
# Underscored names that their projects document for use: os._exit (the os module's docs), logging._srcfile (the
# logging HOWTO's "Optimization" section: set it to None not to look up each record's caller).
DOCUMENTED = {("os", "_exit"), ("logging", "_srcfile")}
# Private attributes a drain or a pool once reached into (uvicorn's Server, a bound handler, ProcessPoolExecutor).
NAMED = {"_captured_signals", "__self__", "_processes"}


def private_uses(source: str) -> list[str]:
    """Imports from another project's private modules or of its private names, ``module._name`` on another project's
    module, and the attributes in NAMED on anything."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level and n.module != "__future__":
            parts = n.module.split(".")
            if parts[0] in OURS:
                continue
            if any(p.startswith("_") for p in parts):
                found.append(f"{n.lineno}: from {n.module} import ...")
            found += [f"{n.lineno}: from {n.module} import {a.name}" for a in n.names if a.name.startswith("_")]
    for n in ast.walk(tree):
        if not isinstance(n, ast.Attribute):
            continue
        if n.attr in NAMED:
            found.append(f"{n.lineno}: .{n.attr}")
        elif n.attr.startswith("_") and not n.attr.startswith("__") and isinstance(n.value, ast.Name):
            mod = modules.get(n.value.id)
            if mod is not None and mod.split(".")[0] not in OURS and (mod, n.attr) not in DOCUMENTED:
                found.append(f"{n.lineno}: {n.value.id}.{n.attr}")
    return sorted(found, key=lambda f: int(f.split(":")[0]))  # (in the order of the source's lines)


def test_the_service_uses_no_other_projects_private_names():
    found = {
        name: uses
        for name, path in modules().items()
        if ".triton_proto" not in name  # (generated by protoc)
        and (uses := private_uses(path.read_text()))
    }
    assert found == {}


def test_the_private_name_finder_finds_each_kind():
    source = """
import asyncio
import os
from grpc_health.v1._async import HealthServicer
from concurrent.futures import _base
from service.messages import _lent
asyncio._get_running_loop()
os._exit(0)
server._captured_signals
handler.__self__
pool._processes
"""
    assert private_uses(source) == [
        "4: from grpc_health.v1._async import ...",
        "5: from concurrent.futures import _base",
        "7: asyncio._get_running_loop",
        "9: ._captured_signals",
        "10: .__self__",
        "11: ._processes",
    ]
