"""mkdocs hooks: make the package importable by its name, and generate the rules reference.

``tensortap`` lives in ``src/``; mkdocstrings finds it through a link
``build/docs-src/tensortap -> src`` made here. The page
``reference/rules.md`` lists every rule of :data:`tensortap.rules.BUILTIN_RULES`
from its docstring, so a new rule appears without editing the page.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
LINK_DIR = ROOT / "build" / "docs-src"
MARKER = "<!-- rules -->"


@event_priority(100)  # before mkdocstrings looks for the package
def on_config(config: Any) -> Any:
    """Link ``build/docs-src/tensortap`` to ``src`` and put it on ``sys.path``."""
    LINK_DIR.mkdir(parents=True, exist_ok=True)
    link = LINK_DIR / "tensortap"
    if not link.exists():
        os.symlink(ROOT / "src", link, target_is_directory=True)
    if str(LINK_DIR) not in sys.path:
        sys.path.insert(0, str(LINK_DIR))
    return config


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace the marker of the rules reference with one mkdocstrings block per built-in rule."""
    if MARKER not in markdown:
        return markdown
    from tensortap.trial.rules import BUILTIN_RULES

    blocks = [
        f"## `{name}`\n\n::: tensortap.trial.rules.{cls.__name__}\n    options:\n      show_root_heading: false\n"
        for name, cls in BUILTIN_RULES.items()
    ]
    return markdown.replace(MARKER, "\n".join(blocks))
