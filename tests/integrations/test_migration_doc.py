"""The Python blocks of docs/migrating-from-smdebug.md run, in order, next to an smdebug trial."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.docs import ROOT, python_blocks

pytest.importorskip("torch")

DOC = ROOT / "docs" / "migrating-from-smdebug.md"
SMDEBUG_TRIAL = ROOT / "tests" / "data" / "smdebug-trial" / "trial"


def test_the_migration_guide_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(DOC)
    assert len(blocks) >= 5
    shutil.copytree(SMDEBUG_TRIAL, tmp_path / "smdebug-run")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "migration_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i}", "exec"), namespace)  # the doc's own code, nothing else
    assert (tmp_path / "tensortap-run").is_dir() and (tmp_path / "tensortap-capture").is_dir()


def test_every_table_row_names_both_sides() -> None:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 40
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cells), f"an empty cell: {row}"
