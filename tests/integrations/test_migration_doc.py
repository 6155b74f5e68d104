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


def test_smdebug_hook_and_module_names_say_how_tensortap_spells_them(tmp_path: Path) -> None:
    """``hook.get_collection`` and ``smd.get_hook`` of smdebug code ported by its import line alone."""
    import tensortap.torch as ttt
    import tensortap.xgboost as ttx

    hook_lacks = r"^'Hook' object has no attribute"
    with ttt.Hook(tmp_path) as hook:
        with pytest.raises(AttributeError, match=rf"{hook_lacks} 'get_collection': smdebug's .*collection_configs="):
            hook.get_collection("weights")
        with pytest.raises(AttributeError, match=rf"{hook_lacks} 'wrap_optimizer': smdebug's .*attach_optimizer"):
            hook.wrap_optimizer(None)
        with pytest.raises(AttributeError, match=rf"{hook_lacks} 'no_such_thing'$"):
            hook.no_such_thing  # noqa: B018
        assert not hasattr(hook, "get_collection") and hasattr(hook, "save_scalar")
    for module in (ttt, ttx):
        lacks = rf"^module '{module.__name__}' has no attribute"
        with pytest.raises(AttributeError, match=rf"{lacks} 'get_hook': smdebug's smd.get_hook: .*ttt.capture"):
            module.get_hook(create_if_not_exists=True)  # type: ignore[attr-defined]
        with pytest.raises(AttributeError, match=rf"{lacks} 'SaveConfig': .* tensortap.SaveConfig$"):
            module.SaveConfig  # type: ignore[attr-defined]  # noqa: B018
        with pytest.raises(AttributeError, match=rf"{lacks} 'no_such_thing'$"):
            module.no_such_thing  # type: ignore[attr-defined]  # noqa: B018


def test_smdebug_hook_class_names_say_how_tensortap_spells_them(tmp_path: Path) -> None:
    """hunt 37 F6: ``ttt.Hook.create_from_json_file`` (smdebug's class method), ``hook.create_from_json_file`` and
    ``hook.get_hook`` gave the plain AttributeError, unlike ``hook.get_collection``."""
    import tensortap.torch as ttt

    with pytest.raises(
        AttributeError,
        match=r"^type object 'Hook' has no attribute 'create_from_json_file': smdebug's Hook.create_from_json_file: "
        r"in tensortap, Hook.from_env\(\) \(TENSORTAP_CONFIG\) or Hook.from_json\(path\)$",
    ):
        ttt.Hook.create_from_json_file()  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match=r"^type object 'Hook' has no attribute 'no_such_thing'$"):
        ttt.Hook.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
    with ttt.Hook(tmp_path) as hook:
        with pytest.raises(
            AttributeError, match=r"^'Hook' object has no attribute 'create_from_json_file': .*from_env"
        ):
            hook.create_from_json_file()
        with pytest.raises(
            AttributeError, match=r"^'Hook' object has no attribute 'get_hook': smdebug's .*ttt.capture"
        ):
            hook.get_hook()
