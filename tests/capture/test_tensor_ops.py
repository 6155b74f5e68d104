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
@pytest.mark.parametrize("keys", [(), ("max",)], ids=["raw", "raw+max"])
def test_raw_cpu_tensors_of_every_kind_are_taken_as_their_values(keys: tuple[str, ...]) -> None:
    """Raw CPU tensors (taken as a view in one call when nothing else is computed) give their values: a
    parameter, a transposed view, torch's lazy conjugate and negation, complex, bool, empty, int; one that
    NumPy cannot hold (sparse) is made dense."""
    w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    z = torch.tensor([1 + 2j, -3 - 1j])
    cases: dict[str, tuple[torch.Tensor, np.ndarray]] = {
        "parameter": (w, np.arange(6.0, dtype=np.float32).reshape(2, 3)),
        "transposed": (w.t(), np.arange(6.0, dtype=np.float32).reshape(2, 3).T),
        "conjugate": (z.conj(), np.array([1 - 2j, -3 + 1j], dtype=np.complex64)),
        "negated": (torch._neg_view(torch.tensor([1.0, -2.0])), np.array([-1.0, 2.0], dtype=np.float32)),
        "bool": (torch.tensor([True, False]), np.array([True, False])),
        "empty": (torch.zeros(0, 3), np.zeros((0, 3), dtype=np.float32)),
        "int": (torch.tensor([3, -4]), np.array([3, -4])),
        "sparse": (torch.tensor([[0.0, 2.0], [0.0, 0.0]]).to_sparse(), np.array([[0.0, 2.0], [0.0, 0.0]], np.float32)),
    }
    for name, (tensor, want) in cases.items():
        if keys and (want.dtype.kind in "cb" or not want.size):
            continue  # no maximum of complex, bool or empty values
        raw, values, orig = TorchOps().prepare(tensor, keys, True)
        assert raw is not None and orig is None, name
        assert raw.dtype == want.dtype, name
        np.testing.assert_array_equal(raw, want, err_msg=name)
        assert values == ({"max": float(want.max())} if keys else {}), name


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
