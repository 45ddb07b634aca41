"""The core never imports a framework.

``src/otflow`` (the reference backend included) computes with the array API and
reaches frameworks only through backends loaded by name. These tests import the
whole core in a fresh interpreter and check that no framework or backend package
came along, scan the sources for import statements of them, and check that a
backend whose framework cannot be imported fails with
:class:`otflow.BackendUnavailable` naming the pip extra.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
CORE = SRC / "otflow"

#: frameworks the core must never import (add a new backend's framework here)
FRAMEWORK_MODULES = ("torch", "jax", "jaxlib", "equinox", "optax")
#: backend packages; those named by ``otflow.backends`` entry points are added below
BACKEND_PACKAGES = ("otflow_torch", "otflow_jax")


def _forbidden() -> list[str]:
    names = set(FRAMEWORK_MODULES) | set(BACKEND_PACKAGES)
    for ep in metadata.entry_points(group="otflow.backends"):
        names.add(ep.value.split(":", 1)[0].split(".", 1)[0])
    return sorted(names)


FORBIDDEN = _forbidden()


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args...`` in a fresh interpreter that imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SRC), str(REPO / "backends")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )


_IMPORT_ALL = """
import importlib, json, pkgutil, sys

forbidden = json.loads(sys.argv[1])

def loaded():
    return {m for m in forbidden
            if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)}

import otflow
culprit = {m: "otflow" for m in loaded()}
imported = ["otflow"]

def onerror(name):
    raise  # a subpackage failed to import while walking: show its traceback

for info in pkgutil.walk_packages(otflow.__path__, "otflow.", onerror=onerror):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        continue  # importing a __main__ would run it
    importlib.import_module(info.name)
    imported.append(info.name)
    for m in loaded():
        culprit.setdefault(m, info.name)

print(json.dumps({"imported": imported, "leaked": culprit}))
"""


def test_importing_the_whole_core_imports_no_framework():
    proc = _run(_IMPORT_ALL, json.dumps(FORBIDDEN))
    assert proc.returncode == 0, f"importing the core failed:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    imported = result["imported"]
    # the walk really covered the package
    assert {"otflow", "otflow.base.reference", "otflow.ode.integrate", "otflow.cnf.flow", "otflow.training.loop"} \
        <= set(imported), imported
    leaked = result["leaked"]
    assert not leaked, "the core imported a framework or backend package: " + ", ".join(
        f"{mod} (first present after importing {where})" for mod, where in sorted(leaked.items())
    )


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _forbidden_imports(path: Path) -> list[str]:
    """Import statements (anywhere: top level, functions, TYPE_CHECKING blocks) and
    ``importlib.import_module`` / ``__import__`` calls with a literal name that reach a
    forbidden module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def check(name: str | None, node: ast.AST, text: str) -> None:
        if name and name.split(".", 1)[0] in FORBIDDEN:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            check(node.module, node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if fname in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                check(arg.value, node, f"{fname}({arg.value!r})")
    return found


def test_core_sources_contain_no_framework_imports():
    files = _core_files()
    assert CORE / "__init__.py" in files and CORE / "base" / "reference.py" in files
    offenders = [line for path in files for line in _forbidden_imports(path)]
    assert not offenders, "framework imports in the core (src/otflow):\n" + "\n".join(offenders)


_ASK_BLOCKED = """
import json, sys

name, blocked = sys.argv[1], json.loads(sys.argv[2])
for mod in blocked:
    sys.modules[mod] = None  # any `import mod` now raises ImportError

import otflow
try:
    otflow.get_backend(name)
except otflow.BackendUnavailable as e:
    print(json.dumps({"outcome": "unavailable", "message": str(e)}))
except Exception as e:
    print(json.dumps({"outcome": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"outcome": "loaded", "message": ""}))
"""


@pytest.mark.parametrize(
    ("name", "blocked", "extra"),
    [("torch", ["torch"], "torch"), ("jax", ["jax", "jaxlib"], "jax")],
)
def test_backend_with_missing_framework_is_unavailable(name, blocked, extra):
    proc = _run(_ASK_BLOCKED, name, json.dumps(blocked))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["outcome"] == "AttributeError" and "has no attribute" in result["message"]:
        # the entry point names a class its package does not define (yet)
        pytest.skip(f"backend {name!r} is not written yet: {result['message']}")
    assert result["outcome"] == "unavailable", (
        f"get_backend({name!r}) with {blocked} unimportable gave {result['outcome']}: "
        f"{result['message']!r}; expected otflow.BackendUnavailable"
    )
    assert f"otflow[{extra}]" in result["message"], result["message"]
