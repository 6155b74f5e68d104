"""The framework versions the adapters run on: one home for the checks made when an adapter is imported."""

from __future__ import annotations

import re
from types import ModuleType


def release(module: ModuleType) -> tuple[int, int]:
    """``(major, minor)`` of ``module.__version__`` (``(3, 1)`` for ``"3.1.0rc1"``)."""
    found = re.match(r"(\d+)\.(\d+)", module.__version__)
    if found is None:
        raise ImportError(f"cannot read the version of {module.__name__}: {module.__version__!r}")
    return int(found[1]), int(found[2])


def require(module: ModuleType, name: str, oldest: tuple[int, int], extra: str) -> None:
    """Refuse, with an ``ImportError`` naming the version needed, a framework older than ``oldest``.

    Parameters
    ----------
    module
        The framework, imported.
    name
        Its name in the message (``"XGBoost"``).
    oldest
        The oldest ``(major, minor)`` the adapter runs on: the lower bound of ``extra`` in pyproject.toml.
    extra
        The extra of tensortap that installs a version new enough.
    """
    if release(module) < oldest:
        raise ImportError(
            f"tensortap needs {name} {oldest[0]}.{oldest[1]} or newer, found {module.__version__}: "
            f'pip install "tensortap[{extra}]"'
        )
