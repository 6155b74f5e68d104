"""The TensorOps conformance suite for NumPy and torch (CPU, and CUDA when present)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensortap.capture import TensorOps
from tensortap.capture.testing import TensorOpsConformance


class TestNumpyOps(TensorOpsConformance):
    ops = TensorOps()

    def make(self, array: np.ndarray) -> Any:
        return array


torch = pytest.importorskip("torch")
from tensortap.torch import TorchOps  # noqa: E402


@pytest.mark.torch
class TestTorchCPUOps(TensorOpsConformance):
    ops = TorchOps()

    def make(self, array: np.ndarray) -> Any:
        return torch.from_numpy(array)


@pytest.mark.torch
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestTorchCUDAOps(TensorOpsConformance):
    ops = TorchOps()

    def make(self, array: np.ndarray) -> Any:
        return torch.from_numpy(array).cuda()


@pytest.mark.torch
def test_bfloat16_is_widened_and_named() -> None:
    t = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    raw, values, orig = TorchOps().prepare(t, ["max"], True)
    assert orig == "bfloat16"
    assert raw is not None and raw.dtype == np.float32
    np.testing.assert_array_equal(raw, np.array([1.5, -2.0, 3.25], dtype=np.float32))
    assert values == {"max": 3.25}
