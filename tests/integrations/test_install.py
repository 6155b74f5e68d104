"""The extras a user installs declare lower bounds; the project's own runs never let torch float off 2.13.0."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

ROOT = Path(__file__).parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
TORCH_PIN = "torch==2.13.0"


def requirements(extra: str) -> list[Requirement]:
    """The requirements of ``extra``, with ``tensortap[...]`` self-references expanded."""
    out: list[Requirement] = []
    for text in EXTRAS[extra]:
        req = Requirement(text)
        if req.name == "tensortap":
            for inner in sorted(req.extras):
                out.extend(requirements(inner))
        else:
            out.append(req)
    return out


@pytest.mark.parametrize("extra", sorted(set(EXTRAS) - {"dev"}))
def test_extras_have_lower_bounds_and_no_pins(extra: str) -> None:
    for req in requirements(extra):
        operators = {spec.operator for spec in req.specifier}
        assert ">=" in operators, f"[{extra}] {req}: no lower bound"
        assert not operators & {"==", "===", "~="}, f"[{extra}] {req}: pinned; a library must not fight the user's pins"


def test_keras_does_not_force_tensorflow() -> None:
    assert "tensorflow" not in {r.name for r in requirements("keras")}
    assert {"keras", "tensorflow"} <= {r.name for r in requirements("keras-tf")}
    everything = {r.name for r in requirements("all")}
    assert {"torch", "keras", "tensorflow", "lightning", "transformers", "accelerate", "xgboost"} <= everything


def test_every_torch_dependent_extra_bounds_torch_alike() -> None:
    bounds = {str(r.specifier) for extra in EXTRAS for r in requirements(extra) if r.name == "torch"}
    assert bounds == {str(Requirement(EXTRAS["torch"][0]).specifier)}


def load_noxfile() -> types.ModuleType:
    """noxfile.py imported with a stand-in ``nox`` (not installed in the test environment)."""
    nox = types.ModuleType("nox")
    nox.options = types.SimpleNamespace()  # type: ignore[attr-defined]
    nox.session = lambda **kw: lambda fn: fn  # type: ignore[attr-defined]
    nox.parametrize = lambda *a, **kw: lambda fn: fn  # type: ignore[attr-defined]
    nox.Session = object  # type: ignore[attr-defined]
    command = types.ModuleType("nox.command")
    command.CommandFailed = RuntimeError  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("nox", "nox.command")}
    sys.modules.update({"nox": nox, "nox.command": command})
    try:
        module = types.ModuleType("noxfile_under_test")
        exec(compile((ROOT / "noxfile.py").read_text(), "noxfile.py", "exec"), module.__dict__)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@pytest.mark.parametrize("backend", ["uv", "virtualenv"])
def test_nox_pins_torch_exactly(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    noxfile = load_noxfile()
    assert noxfile.TORCH == TORCH_PIN
    for wheels in (tmp_path, tmp_path / "missing"):
        monkeypatch.setattr(noxfile, "WHEELS", wheels)
        args: list[Any] = noxfile.torch_requirement(types.SimpleNamespace(venv_backend=backend))
        torch_specs = [a for a in args if a.startswith("torch")]
        assert len(torch_specs) == 1 and torch_specs[0] in (TORCH_PIN, TORCH_PIN + "+cpu"), args


def install_calls(tree: ast.AST) -> list[ast.Call]:
    """Every ``session.install(...)`` and every ``session.run(<pip>, "install", ...)`` in noxfile.py."""
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            literal = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if node.func.attr == "install" or (node.func.attr == "run" and "install" in literal):
                calls.append(node)
    return calls


def test_every_install_in_nox_and_ci_carries_the_torch_pin() -> None:
    """An install that may pull torch (frameworks, extras, smdebug) carries the exact pin in the same call."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    calls = install_calls(tree)
    assert len(calls) >= 2
    for call in calls:
        text = ast.unparse(call)
        pulls_torch = any(k in text for k in ("frameworks.txt", "SMDEBUG", "install_all", ".[")) or "torch" in text
        core_only = "'-e', '.'" in text and "requirements" not in text
        if pulls_torch and not core_only:
            assert "torch_requirement(session)" in text or "TORCH" in text, f"noxfile: {text}"
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all("torch" not in line and "install -r" not in line for line in commands), ci
    assert "nox -s tests" in ci
    for path in (ROOT / "requirements").glob("*.txt"):
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0].strip()
            assert not code.startswith("torch"), f"{path.name}: {line!r}: torch is pinned by noxfile.py only"


def pins(path: Path) -> list[Requirement]:
    """The requirements of a requirements file, with those of the files it includes (``-r``)."""
    out: list[Requirement] = []
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0].strip()
        if code.startswith("-r "):
            out.extend(pins(path.parent / code[3:].strip()))
        elif code:
            out.append(Requirement(code))
    return out


def lower_bounds() -> dict[str, Version]:
    """The lower bound tensortap declares for each package it depends on (dependencies and extras)."""
    texts = [*PYPROJECT["project"]["dependencies"], *(t for extra, ts in EXTRAS.items() if extra != "dev" for t in ts)]
    return {
        canonicalize_name(req.name): Version(spec.version)
        for req in map(Requirement, texts)
        for spec in req.specifier
        if spec.operator == ">="
    }


OLDEST = sorted((ROOT / "requirements").glob("oldest-*.txt"))


def test_nox_oldest_runs_each_stack_of_requirements() -> None:
    assert set(load_noxfile().OLDEST) == {p.stem.removeprefix("oldest-") for p in OLDEST}


@pytest.mark.parametrize("path", OLDEST, ids=lambda p: p.stem)
def test_oldest_stacks_pin_the_declared_lower_bounds(path: Path) -> None:
    """``nox -s oldest`` tests the release each lower bound names (2.0.0 for >=2.0, or its first patch
    release): a bound raised or lowered without its stack fails here."""
    bounds = lower_bounds()
    for req in pins(path):
        assert [s.operator for s in req.specifier] == ["=="], f"{path.name}: {req} is not pinned"
        bound = bounds.get(canonicalize_name(req.name))
        pinned = Version(next(iter(req.specifier)).version)
        assert bound is None or pinned.release[: len(bound.release)] == bound.release, f"{path.name}: {req}, >={bound}"
