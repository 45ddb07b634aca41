"""MkDocs hook: render the Sphinx roles used in otflow's docstrings.

Docstrings say ``:class:`~otflow.BackendUnavailable``` or ``:meth:`Backend.namespace```
(the reST habit). After Markdown conversion these arrive as
``:class:<code>~otflow.BackendUnavailable</code>``; this hook turns each into an
optional cross-reference that mkdocs-autorefs resolves to the API page when the
object is documented, and into plain code otherwise (no warning either way).
"""
from __future__ import annotations

import re

_ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|attr|mod|exc|data|obj|const|attribute|method|function):"
    r"<code>(?P<tilde>~?)(?P<target>[\w.]+)</code>"
)


def _autoref(match: re.Match) -> str:
    target = match["target"].lstrip(".")
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    identifier = target if target.split(".", 1)[0] == "otflow" else f"otflow.{target}"
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_autoref, html)
