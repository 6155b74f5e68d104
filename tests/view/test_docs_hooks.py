"""The docs site's rules reference is generated from every built-in rule (docs/hooks.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tensortap.rules import BUILTIN_RULES

HOOKS = Path(__file__).resolve().parent.parent.parent / "docs" / "hooks.py"


def test_rules_reference_lists_every_builtin_rule() -> None:
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hooks", HOOKS)
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (HOOKS.parent / "reference" / "rules.md").read_text(encoding="utf-8")
    out = hooks.on_page_markdown(page, page=None)
    assert hooks.MARKER not in out
    for name, cls in BUILTIN_RULES.items():
        assert f"## `{name}`\n\n::: tensortap.trial.rules.{cls.__name__}\n" in out
    assert hooks.on_page_markdown("# other page", page=None) == "# other page"
