"""The framework versions the adapters run on: one home for the checks made when an adapter is imported."""

from __future__ import annotations

import re
from types import ModuleType


def release(module: ModuleType) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of ``module.__version__`` (``(3, 1, 0)`` for ``"3.1.0rc1"``, ``(2, 6, 0)`` for
    ``"2.6+cpu"``)."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", module.__version__)
    if found is None:
        raise ImportError(f"cannot read the version of {module.__name__}: {module.__version__!r}")
    return int(found[1]), int(found[2]), int(found[3] or 0)


def require(module: ModuleType, adapter: str, name: str, oldest: tuple[int, ...], install: str) -> None:
    """Refuse, with an ``ImportError`` naming the version needed, a framework older than ``oldest``.

    Parameters
    ----------
    module
        The framework, imported.
    adapter
        The module of tensortap that needs it (``"tensortap.xgboost"``), as the message names it.
    name
        The framework's name in the message (``"XGBoost"``).
    oldest
        The oldest release the adapter runs on (``(2, 1)``, ``(0, 6, 2)``): the lower bound that
        pyproject.toml declares.
    install
        What installs a version new enough (``'pip install "tensortap[xgboost]"'``).
    """
    if release(module) < oldest:
        needed = ".".join(map(str, oldest))
        raise ImportError(f"{adapter} needs {name} {needed} or newer, not {module.__version__}: {install}")
