"""Fixtures of the adapter tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def torch_one_thread() -> None:
    """One torch thread (the CI machine has two cores shared by everything) and a fixed seed."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture
def ordered_callbacks() -> None:
    """Skip before XGBoost 3.1.2, which kept ``callbacks=[...]`` in a set: they ran in an order of their own,
    from one process to the next, and what a test expects of the round another callback ends differs by it."""
    import xgboost
    from packaging.version import Version

    if Version(xgboost.__version__) < Version("3.1.2"):
        pytest.skip(f"XGBoost {xgboost.__version__} runs callbacks in no set order (3.1.2 keeps the given one)")
