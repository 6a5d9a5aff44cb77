"""The package layout: the service never depends on the applications built on it.

``gateway/apps`` (the demo, the viewer harness) imports the service; no module
of the service imports ``gateway.apps``, except :mod:`gateway.cli`, which loads
the demo inside the ``aigw demo`` command only (see :mod:`gateway.apps`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "gateway"
APPS = "gateway.apps"
CLI = PACKAGE / "cli.py"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names, relative imports resolved (PEP 328)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_apps(name: str) -> bool:
    return name == APPS or name.startswith(APPS + ".")


def _apps_imports(path: Path) -> list[tuple[int, str, bool]]:
    """Each import of ``gateway.apps`` in a module: line, what it imports, whether it is inside a function."""
    source = path.read_text(encoding="utf-8")
    return list(_apps_imports_in(source, _module_name(path), path.name == "__init__.py", str(path)))


def _apps_imports_in(
    source: str, module: str, is_package: bool, filename: str = "<unknown>"
) -> Iterator[tuple[int, str, bool]]:
    tree = ast.parse(source, filename=filename)

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[int, str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if _is_apps(alias.name):
                        yield child.lineno, alias.name, in_function
            elif isinstance(child, ast.ImportFrom):
                source = _absolute(child, module, is_package)
                # "from gateway import apps" names the package as an attribute.
                targets = [source] + [f"{source}.{alias.name}" for alias in child.names]
                hits = [t for t in targets if _is_apps(t)]
                if hits:
                    yield child.lineno, hits[0], in_function
            elif isinstance(child, ast.Call):
                # importlib.import_module("gateway.apps...") / __import__("gateway.apps...")
                func = child.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__") and child.args:
                    first = child.args[0]
                    if isinstance(first, ast.Constant) and isinstance(first.value, str) and _is_apps(first.value):
                        yield child.lineno, first.value, in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def _service_modules() -> list[Path]:
    apps = PACKAGE / "apps"
    return sorted(p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(apps))


def test_the_layout_has_an_apps_layer() -> None:
    for package in ("apps", "apps/demo", "apps/viewer"):
        assert (PACKAGE / package / "__init__.py").is_file(), package
    assert not (PACKAGE / "demo.py").exists() and not (PACKAGE / "viewer.py").exists()


@pytest.mark.parametrize("path", _service_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_the_service_does_not_import_the_apps(path: Path) -> None:
    found = list(_apps_imports(path))
    if path == CLI:
        at_module_level = [f"{path.name}:{line}: {name}" for line, name, in_function in found if not in_function]
        assert not at_module_level, (
            "gateway/cli.py may import gateway.apps only inside the command that runs it, "
            f"so other commands never load it: {at_module_level}"
        )
    else:
        assert not found, (
            f"{path.relative_to(REPO)} imports an application ({found}); the service must not depend on "
            "gateway/apps (only the CLI's `aigw demo` command loads it, lazily)"
        )


def test_the_checker_sees_the_cli_s_lazy_import_of_the_demo() -> None:
    # The exception above exists: without it the test would pass for a checker that finds nothing.
    assert any(name.startswith("gateway.apps.demo") and inside for _, name, inside in _apps_imports(CLI))


def test_relative_attribute_and_dynamic_imports_are_seen() -> None:
    code = (
        "from . import apps\n"
        "from .apps.viewer import Viewer\n"
        "import gateway.apps.demo\n"
        "from gateway import config\n"
        "def f():\n"
        "    from gateway import apps\n"
        "    importlib.import_module('gateway.apps.demo')\n"
    )
    assert list(_apps_imports_in(code, "gateway.service", is_package=False)) == [
        (1, "gateway.apps", False),
        (2, "gateway.apps.viewer", False),
        (3, "gateway.apps.demo", False),
        (6, "gateway.apps", True),
        (7, "gateway.apps.demo", True),
    ]


def test_serving_loads_no_app() -> None:
    code = (
        "import sys\n"
        "import gateway.cli, gateway.service\n"
        "loaded = sorted(m for m in sys.modules if m == 'gateway.apps' or m.startswith('gateway.apps.'))\n"
        "assert not loaded, loaded\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
