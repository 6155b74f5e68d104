"""Sessions: ``nox -s demo``, ``nox -s tests``, ``nox -s bench``, ``nox -s lint``, ``nox -s docs``, ``nox -s pythons``,
``nox -s oldest``.

Every session installs from scratch. torch is always pinned to 2.13.0 (CPU):
any other version pulls gigabytes of CUDA packages. With uv, the local CPU
wheel directory is passed as find-links (uv ignores pip's configuration).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import nox
from nox.command import CommandFailed

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests"]

PYTHON = "3.11"
TORCH = "torch==2.13.0"
WHEELS = Path(os.environ.get("TENSORTAP_TORCH_WHEELS", "/opt/wheels"))


def torch_requirement(session: nox.Session) -> list[str]:
    """Arguments that install the CPU build of torch 2.13.0 and nothing else."""
    if session.venv_backend != "uv":
        return [TORCH]  # pip finds the local CPU wheel through its own configuration
    if WHEELS.is_dir():
        return ["--find-links", str(WHEELS), f"{TORCH}+cpu"]
    return ["--extra-index-url", "https://download.pytorch.org/whl/cpu", f"{TORCH}+cpu"]


def install_all(session: nox.Session) -> None:
    """tensortap with every framework (CPU builds) and the test tools, in one resolution."""
    session.install(
        *torch_requirement(session), "-r", "requirements/frameworks.txt", "-r", "requirements/test.txt", "-e", "."
    )


# rerun on every backend (their tests marked keras)
KERAS_TESTS = [
    "tests/capture/test_keras.py",
    "tests/view/test_histogram_keras.py",
    "tests/trial/test_rules_frameworks.py",
]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the whole test suite, then the Keras tests (capture, histograms) on the torch and JAX backends."""
    install_all(session)
    session.run("pytest", *session.posargs)
    if not session.posargs:
        for backend in ("torch", "jax"):
            session.run("pytest", "-m", "keras", *KERAS_TESTS, env={"KERAS_BACKEND": backend})


# the tests that need no framework (writer, reader, format, storage, command line, rules)
NO_FRAMEWORK_TESTS = ["-m", "not torch and not keras and not xgboost"]


@nox.session(python=["3.10", "3.12", "3.13"])
def pythons(session: nox.Session) -> None:
    """The tests that need no framework (writer, reader, format, storage, command line, rules) on the other
    Pythons tensortap supports; the frameworks' own wheels for those Pythons are not all on this machine."""
    session.install("-r", "requirements/test.txt", "h5py>=3.11,<3.15", "-e", ".")
    session.run("pytest", *NO_FRAMEWORK_TESTS, *session.posargs)


class Stack(NamedTuple):
    """A stack of ``nox -s oldest``: the pytest arguments of its tests, its environment variables, and whether
    it needs torch (2.13.0)."""

    tests: list[str]
    torch: bool = False
    env: dict[str, str] = {}


# The lower bounds pyproject.toml declares, each stack pinned exactly in requirements/oldest-STACK.txt.
# The Keras stacks install torch for the histogram tests (tests/view/conftest.py needs it).
OLDEST = {
    "core": Stack(NO_FRAMEWORK_TESTS),
    "s3": Stack(["-m", "s3"]),
    "xgboost": Stack(
        [
            "-m",
            "xgboost",
            "tests/capture/test_xgboost.py",
            "tests/capture/test_xgboost_patterns.py",
            "tests/trial/test_rules_frameworks.py",
        ]
    ),
    "notebook": Stack(["tests/view", "tests/test_notebook.py"], torch=True),
    "keras-tf": Stack(["-m", "keras", *KERAS_TESTS], torch=True, env={"KERAS_BACKEND": "tensorflow"}),
    "keras-jax": Stack(["-m", "keras", *KERAS_TESTS], torch=True, env={"KERAS_BACKEND": "jax"}),
    "keras-torch": Stack(["-m", "keras", *KERAS_TESTS], torch=True, env={"KERAS_BACKEND": "torch"}),
    "torch-ecosystem": Stack(
        [
            "tests/integrations/test_lightning.py",
            "tests/integrations/test_transformers.py",
            "tests/capture/test_torch_training.py",  # Accelerate and Lightning Fabric among them
            "tests/capture/test_torch.py::test_a_torch_older_than_the_bound_fails_at_import_naming_the_version",
        ],
        torch=True,
    ),
}


@nox.session(python=PYTHON)
@nox.parametrize("stack", list(OLDEST))
def oldest(session: nox.Session, stack: str) -> None:
    """A stack's tests with the oldest versions tensortap declares it supports (``requirements/oldest-STACK.txt``)
    and the test tools, not the extras' packages at the versions CI runs (``requirements/test-tools.txt``)."""
    spec = OLDEST[stack]
    session.install(
        *(torch_requirement(session) if spec.torch else []),
        "-r",
        f"requirements/oldest-{stack}.txt",
        "-r",
        "requirements/test-tools.txt",
        "-e",
        ".",
    )
    session.run("pytest", *spec.tests, *session.posargs, env=spec.env)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Train with capture on each framework, query the trials and run rules (local directory)."""
    install_all(session)
    session.run("python", "examples/demo.py", *session.posargs)


SMDEBUG = ["smdebug==1.0.34", "numpy==2.2.*", "protobuf<=3.20.3", "requests", "pandas", "psutil"]


def smdebug_python(session: nox.Session) -> str | None:
    """The interpreter of smdebug's own environment (it needs NumPy < 2.3), None where it cannot be built.

    ``TENSORTAP_SMDEBUG_PYTHON`` names a ready one; otherwise one is built
    afresh in ``.nox/smdebug`` (about two minutes).
    """
    given = os.environ.get("TENSORTAP_SMDEBUG_PYTHON")
    if given:
        return given
    venv = Path(".nox/smdebug").resolve()
    try:
        session.run("python", "-m", "venv", "--clear", str(venv), external=True)
        session.run(str(venv / "bin/pip"), "install", "-q", *SMDEBUG, TORCH, external=True)
    except CommandFailed:
        session.warn("smdebug's environment could not be built; its rows are left out")
        return None
    return str(venv / "bin/python")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks (smdebug in its own environment, where it still runs) and write docs/performance.md.

    ``nox -s bench -- --quick`` only checks that every script runs (tiny sizes, no smdebug, nothing written);
    ``nox -s bench -- NAME ...`` runs some benchmarks only (see ``python -m bench --help``); ``nox -s bench --
    --docs`` runs none and puts the hand-written parts (``bench/*.md``, ``bench/profiles/*.md``) into the documents.
    """
    install_all(session)
    measures = not {"--quick", "--docs"} & set(session.posargs)
    names = [a for a in session.posargs if not a.startswith("-")]
    env: dict[str, str] = {}
    smdebug = smdebug_python(session) if measures and (not names or {"torch", "read"} & set(names)) else None
    if smdebug is not None:  # its arms run in processes of that environment, interleaved with ours
        env["TENSORTAP_SMDEBUG_PYTHON"] = smdebug
    session.run("python", "-m", "bench", *session.posargs, env=env)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    session.install("ruff", "mypy", "-e", ".")
    session.run("ruff", "check", "src", "tests", "bench", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "bench", "examples", "noxfile.py")
    session.run("mypy", "src", "bench")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs-material, mkdocstrings) into build/site; any warning fails it."""
    session.install("-r", "requirements/docs.txt", "-e", ".")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
