"""Fixtures of the adapter tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def torch_one_thread() -> None:
    """One torch thread (the CI machine has two cores shared by everything) and a fixed seed."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
