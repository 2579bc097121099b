"""The layering of docs/architecture.md, checked on the source rather than trusted.

- ``core/`` is pure: it imports the standard library's value modules, pydantic and other
  ``core`` modules, nothing that does I/O and nothing from another layer;
- no SQL outside ``store/``;
- the lower layers never import the upper ones (``core`` < ``config``/``checks`` <
  ``store`` < ``runtime`` < ``api``/``cli``);
- no module over 500 lines, no function over 80, except the ones listed with a reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "rollbackd"

PURE_IMPORTS = {
    "__future__",
    "abc",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "itertools",
    "json",
    "math",
    "operator",
    "re",
    "string",
    "types",
    "typing",
    "unicodedata",
    "pydantic",
    "pydantic_core",
}
"""What ``core/`` may import besides itself: no sockets, files, threads, clocks or SQL."""

LOWER_THAN = {
    "core": {"config", "checks", "store", "runtime", "api", "cli", "executors", "notify"},
    "checks": {"store", "runtime", "api", "cli", "executors", "notify"},
    "store": {"runtime", "api", "cli", "checks", "executors", "notify", "config"},
    "runtime": {"api", "cli"},
    "executors": {"runtime", "api", "cli", "store"},
    "notify": {"runtime", "api", "cli", "store", "executors"},
}
"""For each layer, the layers it must not import."""

LONG_MODULES: dict[str, str] = {}
"""Modules allowed over 500 lines, each with the reason."""

LONG_FUNCTIONS: dict[str, str] = {
    "rollbackd.runtime.metrics:Metrics.__init__": "one declaration per metric, in the order "
    "/metrics shows them: split up, the list of every metric name would be in pieces",
    "rollbackd.notify.content:_describe": "one branch per event type, a table read top to "
    "bottom; a dispatch dict would scatter the wording of related events",
}
"""Functions (``module:qualified.name``) allowed over 80 lines, each with the reason."""

SQL = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM)\b", re.S)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "rollbackd" else None


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_layers_import_only_downwards(path: Path) -> None:
    module = _name(path)
    layer = _layer(module)
    imports = _imports(ast.parse(path.read_text()))
    if layer == "core":
        impure = {
            name
            for name in imports
            if name.split(".")[0] not in PURE_IMPORTS and not name.startswith("rollbackd.core")
        }
        assert not impure, f"{module} is in core/ but imports {sorted(impure)}"
    forbidden = LOWER_THAN.get(layer or "", set())
    upward = {name for name in imports if _layer(name) in forbidden}
    assert not upward, f"{module} ({layer}) imports a higher layer: {sorted(upward)}"


def test_no_sql_outside_the_store() -> None:
    offenders = [
        _name(path)
        for path in _modules()
        if _layer(_name(path)) != "store"
        and ("sqlite3" in _imports(ast.parse(path.read_text())) or SQL.search(path.read_text()))
    ]
    assert offenders == []


def test_modules_are_small() -> None:
    long = {
        _name(path): n
        for path in _modules()
        if (n := len(path.read_text().splitlines())) > 500 and _name(path) not in LONG_MODULES
    }
    assert long == {}, "split these modules or list them in LONG_MODULES with the reason"


def test_functions_are_short() -> None:
    long: dict[str, int] = {}
    for path in _modules():
        tree = ast.parse(path.read_text())
        for qualname, node in _functions(tree):
            key = f"{_name(path)}:{qualname}"
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > 80 and key not in LONG_FUNCTIONS:
                long[key] = size
    assert long == {}, "split these functions or list them in LONG_FUNCTIONS with the reason"


def _functions(
    tree: ast.AST, prefix: str = ""
) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append((prefix + node.name, node))
            found.extend(_functions(node, f"{prefix}{node.name}."))
        elif isinstance(node, ast.ClassDef):
            found.extend(_functions(node, f"{prefix}{node.name}."))
    return found


def _imports_of(module: str) -> set[str]:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    return _imports(ast.parse(path.read_text()))


EVALUATION_SIDE = (
    "rollbackd.runtime.engine",
    "rollbackd.runtime.baking",
    "rollbackd.runtime.baselines",
    "rollbackd.runtime.check_state_keeper",
    "rollbackd.runtime.firings",
    "rollbackd.runtime.transitions",
    "rollbackd.runtime.version_watch",
    "rollbackd.runtime.versions",
    "rollbackd.runtime.verify",
)
DECISION_SIDE = {
    "rollbackd.runtime.pipeline",
    "rollbackd.runtime.deciding",
    "rollbackd.runtime.approvals",
    "rollbackd.runtime.reconsider",
    "rollbackd.runtime.execution",
    "rollbackd.runtime.recovery",
    "rollbackd.runtime.guard_facts",
    "rollbackd.runtime.triggers",
    "rollbackd.runtime.runner",
    "rollbackd.runtime.control",
}


@pytest.mark.parametrize("module", EVALUATION_SIDE)
def test_the_engine_does_not_know_the_pipeline(module: str) -> None:
    """Firings flow one way: the runner hands the engine's firings to the pipeline."""
    assert _imports_of(module) & DECISION_SIDE == set()


def test_the_api_talks_to_the_runtime_through_control() -> None:
    """Routes and the alert receiver use the facade, never the engine, pipeline or store."""
    allowed = {
        "rollbackd.runtime.control",
        "rollbackd.runtime.triggers",
        "rollbackd.runtime.alert_intake",
        "rollbackd.runtime.bake_evidence",
    }
    reaching: dict[str, set[str]] = {}
    modules = [p for p in _modules() if _layer(_name(p)) == "api"]
    modules.append(PACKAGE / "runtime" / "alert_intake.py")
    for path in modules:
        inner = {
            name
            for name in _imports(ast.parse(path.read_text()))
            if (name.startswith("rollbackd.runtime.") and name not in allowed)
            or (name.startswith("rollbackd.store.") and name != "rollbackd.store.errors")
        }
        if inner:
            reaching[_name(path)] = inner
    assert reaching == {}
