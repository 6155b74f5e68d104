"""The TensorOps conformance suite for NumPy and torch (CPU, and CUDA when present)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensortap.capture import TensorOps
from tensortap.capture.testing import TensorOpsConformance, numpy_histogram_rule


class TestNumpyOps(TensorOpsConformance):
    ops = TensorOps()

    def make(self, array: np.ndarray) -> Any:
        return array


torch = pytest.importorskip("torch")
from tensortap.torch import TorchOps  # noqa: E402


class TorchConformance(TensorOpsConformance):
    def make(self, array: np.ndarray) -> Any:
        return torch.from_numpy(array)

    def overwrite(self, tensor: Any) -> None:
        tensor.zero_()


@pytest.mark.torch
class TestTorchCPUOps(TorchConformance):
    ops = TorchOps()


class DeviceBinnedTorchOps(TorchOps):
    """TorchOps that bins CPU tensors as it bins CUDA ones (``torch.bucketize``), to test that kernel here."""

    host_binned = frozenset()


@pytest.mark.torch
class TestTorchCPUOpsBinningOnTheDevice(TorchConformance):
    ops = DeviceBinnedTorchOps()


class BatchedTorchOps(TorchOps):
    """TorchOps that takes CPU tensors into a batch as it takes CUDA ones, to test the batch here."""

    batched = frozenset({"cpu"})


@pytest.mark.torch
class TestTorchCPUOpsTakenIntoABatch(TorchConformance):
    ops = BatchedTorchOps()


@pytest.mark.torch
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestTorchCUDAOps(TorchConformance):
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


@pytest.mark.torch
@pytest.mark.parametrize("ops", [TorchOps(), DeviceBinnedTorchOps()], ids=["host", "device"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_histograms_of_dtypes_numpy_lacks_bin_their_float32_values(ops: TorchOps, dtype: str) -> None:
    t = torch.tensor([0.1, -2.0, 3.25, 0.2, 0.30078125, float("nan"), 448.0]).to(getattr(torch, dtype))
    values = t.float().numpy()
    for edges in (None, np.array([-1.0, 0.1, 0.2, 0.3, 2.5])):
        hist = ops.histogram(t, edges, 5)
        assert hist is not None
        if edges is None:
            finite = values[np.isfinite(values)].astype(np.float64)
            np.testing.assert_array_equal(hist.edges, np.linspace(finite.min(), finite.max(), 6))
        np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(values, hist.edges))
