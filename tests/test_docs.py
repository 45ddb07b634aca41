"""The documentation site builds with ``mkdocs build --strict`` and no warnings.

The API pages are generated from docstrings by mkdocstrings, so this also catches
docstrings that griffe cannot parse, cross-references that do not resolve, pages
missing from the nav and links to pages that do not exist.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: modules the build needs (the ``docs`` and ``test`` extras install them)
DOCS_MODULES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_docs_tools() -> list[str]:
    missing = []
    for mod in DOCS_MODULES:
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(mod)
        except ModuleNotFoundError:  # parent package absent
            missing.append(mod)
    return missing


def test_docs_build_strict(tmp_path):
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(f"mkdocs toolchain not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # silence mkdocs-material's banner
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    log = proc.stdout + proc.stderr
    problems = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert proc.returncode == 0 and not problems, f"mkdocs build --strict failed:\n{log}"

    # the API page really holds generated reference, not just its heading
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for anchor in ("otflow.get_backend", "otflow.BackendUnavailable", "otflow.base.Backend"):
        assert f'id="{anchor}"' in api, f"no API entry for {anchor} in the built docs"
    assert (site / "architecture" / "index.html").exists()


def test_readme_states_the_test_command_ci_runs():
    """`.ci/run` runs exactly the test command the README gives."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if re.match(r"\s*python -m pytest\b", line)]
    assert len(commands) == 1, f".ci/run should run one pytest command, found {commands}"
    readme_lines = {line.strip() for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()}
    assert commands[0] in readme_lines, f"README.md does not give the test command {commands[0]!r}"
