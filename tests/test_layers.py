"""The core's three layers on a common base, and the directions they may import in.

``src/otflow`` is ``base`` (errors, options, trees, the backend protocol and
registry), the ``ode`` layer (solvers, step-size control, the integration loop,
the adjoint), the ``cnf`` layer (fields, dynamics, divergence, objective, Flow)
and the ``training`` layer (fit, data, optimizers, checkpoints, CLI, plots).
Each may import only from itself and the layers below it; the top-level package
re-exports all of them. The backend packages may use the core's public names only.
These tests read every import statement (top level and inside functions) with ``ast``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "src" / "otflow"
BACKENDS = REPO / "backends"

#: each layer and the layers it may import from (itself included)
ALLOWED = {
    "base": {"base"},
    "ode": {"base", "ode"},
    "cnf": {"base", "ode", "cnf"},
    "training": {"base", "ode", "cnf", "training"},
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path`` (relative ones resolved);
    for ``from X import a, b`` the names ``X.a`` and ``X.b`` are listed too, since they may be
    submodules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "otflow" and parts[1] in ALLOWED else None


def _core_modules():
    return [(p, _module_name(p, CORE.parent)) for p in sorted(CORE.rglob("*.py"))]


def test_every_core_module_belongs_to_a_layer():
    stray = [m for p, m in _core_modules() if _layer(m) is None and m not in ("otflow", "otflow.__main__")]
    assert not stray, f"modules outside the layers base/ode/cnf/training: {stray}"
    for layer in ALLOWED:
        assert (CORE / layer / "__init__.py").exists(), f"layer {layer} is missing"


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_layer_imports_only_from_layers_below(layer):
    offenders = []
    for path, module in _core_modules():
        if _layer(module) != layer:
            continue
        for line, target in _imports(path, module):
            if target == "otflow":
                offenders.append(f"{path.relative_to(REPO)}:{line}: imports the top-level package otflow")
                continue
            target_layer = _layer(target)
            if target_layer is not None and target_layer not in ALLOWED[layer]:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {target} ({target_layer})")
    assert not offenders, (f"the {layer} layer may import only from {sorted(ALLOWED[layer])}:\n"
                           + "\n".join(offenders))


def test_the_check_sees_a_wrong_direction(tmp_path):
    """The scanner resolves relative imports: an ODE module importing the CNF layer is caught."""
    fake = tmp_path / "otflow" / "ode" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..cnf.flow import Flow\nfrom ..base import errors\n\ndef f():\n    from ..training import fit\n")
    targets = [t for _, t in _imports(fake, "otflow.ode.bad")]
    assert {"otflow.cnf.flow", "otflow.base", "otflow.training"} <= set(targets)
    assert {_layer(t) for t in targets} == {"cnf", "base", "training"}


def test_backends_use_only_public_names_of_the_core():
    """A backend package builds on the core's public API: no module or name starting with ``_``."""
    offenders = []
    for path in sorted(BACKENDS.rglob("*.py")):
        module = _module_name(path, BACKENDS)
        for line, target in _imports(path, module):
            parts = target.split(".")
            if parts[0] == "otflow" and any(p.startswith("_") for p in parts[1:]):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert not offenders, "backend packages import private parts of the core:\n" + "\n".join(offenders)
