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


def test_ci_runs_the_readmes_test_command():
    """The README opens with the two commands; `.ci/run` calls its test command, which runs
    `python -m pytest` (once)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/dev.sh demo", "bash scripts/dev.sh test"], commands
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    calls = [line.strip() for line in ci.splitlines() if re.match(r"\s*bash scripts/dev\.sh test\b", line)]
    assert len(calls) == 1, f".ci/run should call `bash scripts/dev.sh test` once, found {calls}"
    script = (REPO / "scripts" / "dev.sh").read_text(encoding="utf-8")
    assert len(re.findall(r"^\s*python -m pytest\b", script, re.M)) == 1


