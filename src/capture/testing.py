"""The conformance suite of :class:`~tensortap.capture.TensorOps` (needs pytest; never imported by tensortap).

Every adapter's ``TensorOps`` must store the same values as the NumPy
formulas of :mod:`tensortap.reductions` (the read side recomputes reductions
with them from raw tensors, so the two must agree). A test class subclasses
:class:`TensorOpsConformance` and provides the ops and a factory that turns a
NumPy array into a tensor of its framework::

    from tensortap.capture.testing import TensorOpsConformance

    class TestTorchOps(TensorOpsConformance):
        ops = TorchOps()

        def make(self, array):
            return torch.from_numpy(array)

The contract:

- raw values come back bit for bit, with the dtype NumPy has for them
  (dtypes NumPy lacks, such as bfloat16, widened to float32 and named in
  the third element, ``orig_dtype``);
- ``min``, ``max`` and the health counts are bit for bit, and so are
  ``sum``, ``l1`` and ``mean`` of integer and boolean tensors;
- the other float reductions (sums in another order) agree to a few ulp
  of float64 (:attr:`TensorOpsConformance.rtol`);
- NaN and Inf propagate as NumPy's do; an empty tensor gives NaN for
  ``min``/``max``/``mean``/``std``/``variance``, 0 for ``sum``, 1 for ``prod``;
- a :meth:`TensorOps.batch`, where the ops have one, delivers for each value
  it took what ``prepare`` gives, for the value as it was when taken
  (subclasses set :meth:`TensorOpsConformance.overwrite`);
- histograms (:meth:`TensorOps.histogram`) equal :func:`numpy_histogram_rule`
  exactly: the same edges when they are fixed from the tensor, the same
  counts, values outside the edges in the outer bins, NaN and Inf in none.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from .. import reductions as red
from .core import TensorOps

ALL_KEYS = [*red.ALL_REDUCTIONS, *(f"abs_{k}" for k in red.REDUCTIONS + red.NORMS)]
# the reductions a batch is asked for in the batch test (those a GPU training saves by default and rules ask for)
BATCH_KEYS = ["min", "max", "mean", "sum", "l1", "l2", "nan_count", "inf_count", "abs_max", "abs_mean"]
EXACT = frozenset({"min", "max", "abs_min", "abs_max", *red.HEALTH_COUNTS})
# sums of integers are exact in float64 whatever the order
EXACT_INTEGER = frozenset({"sum", "abs_sum", "l1", "mean", "abs_mean"})


# edges that float32 cannot hold (0.1 is rounded up to float32, 0.7 and 1.3 down), and float32 values on either side
GIVEN_EDGES = (-1.0, 0.1, 0.7, 1.3, 2.5)
# edges a huge constant fixes: repeated values (float64 has no number between), every value below them
REPEATED_EDGES = np.linspace(1e17, 1e17 + 64, 9)


def _values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    special = rng.standard_normal(40).astype(np.float32)
    special[[3, 11]] = np.nan
    special[[5]] = np.inf
    special[[8]] = -np.inf
    special[[13, 14]] = 0.0
    near = np.array(GIVEN_EDGES, dtype=np.float32)
    straddle = np.concatenate([near, np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf))])
    return {
        "float32-straddle": np.concatenate([straddle, [np.float32(-3.0), np.float32(7.0), np.float32(np.nan)]]),
        # a constant so large that its edges (x - 0.5, x + 0.5 in float64) are all equal
        "float32-huge-constant": np.full(6, 1e17, dtype=np.float32),
        "float32": rng.standard_normal((7, 5)).astype(np.float32),
        "float64": rng.standard_normal(33) * 1e3,
        "float16": rng.standard_normal(17).astype(np.float16),
        "float32-special": special,
        "float32-scalar": np.asarray(np.float32(-2.5)),
        "float32-empty": np.zeros((0, 3), dtype=np.float32),
        "int64": rng.integers(-50, 50, (4, 6)).astype(np.int64),
        "int32": rng.integers(-5, 5, 12).astype(np.int32),
        "uint8": rng.integers(0, 255, 9).astype(np.uint8),
        "bool": rng.integers(0, 2, 10).astype(bool),
    }


VALUES = _values()


def numpy_histogram_rule(array: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The counts of the histogram rule, written as the NumPy calls that define it."""
    a = np.asarray(array)
    a = (np.abs(a) if a.dtype.kind == "c" else a).astype(np.float64).ravel()
    finite = a[np.isfinite(a)]
    return np.histogram(np.clip(finite, edges[0], edges[-1]), bins=edges)[0]


def numpy_rule_edges(array: np.ndarray, bins: int) -> np.ndarray | None:
    """The edges the rule fixes from a tensor: ``bins`` equal bins over its finite range (None if it has none);
    the range of the magnitudes for a complex tensor."""
    a = np.asarray(array)
    a = (np.abs(a) if a.dtype.kind == "c" else a).astype(np.float64).ravel()
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if not lo < hi:  # constant: x +- max(0.5, |x| * 2**-36); an end past the largest float64 stays at x
        d = max(0.5, abs(lo) * 2.0**-36)
        lo, hi = (lo - d if np.isfinite(lo - d) else lo), (hi + d if np.isfinite(hi + d) else hi)
    if hi - lo == np.inf:  # wider than the largest float64: linspace's step would overflow
        return lo * (1.0 - np.linspace(0.0, 1.0, bins + 1)) + hi * np.linspace(0.0, 1.0, bins + 1)
    with np.errstate(over="ignore"):  # near the largest float64 the last edge overflows; linspace sets it to hi
        return np.linspace(lo, hi, bins + 1)


class TensorOpsConformance:
    """What every :class:`TensorOps` must do. Subclass and set :attr:`ops` and :meth:`make`."""

    ops: ClassVar[TensorOps]
    rtol: ClassVar[float] = 1e-12
    # value kinds the framework cannot hold (e.g. ``{"uint8"}``); skipped
    unsupported: ClassVar[frozenset[str]] = frozenset()

    def make(self, array: np.ndarray) -> Any:
        """``array`` as a tensor of the framework under test."""
        raise NotImplementedError

    def _tensor(self, kind: str) -> tuple[np.ndarray, Any]:
        if kind in self.unsupported:
            pytest.skip(f"{kind} is not supported by this framework")
        array = VALUES[kind]
        return array, self.make(array.copy())

    @pytest.mark.parametrize("kind", sorted(VALUES))
    def test_raw_values_round_trip_bit_for_bit(self, kind: str) -> None:
        array, tensor = self._tensor(kind)
        raw, values, orig = self.ops.prepare(tensor, [], True)
        assert raw is not None
        assert orig is None
        assert raw.dtype == array.dtype
        assert raw.shape == array.shape
        np.testing.assert_array_equal(raw, array)
        assert values == {}

    @pytest.mark.parametrize("kind", sorted(VALUES))
    def test_reductions_equal_the_numpy_formulas(self, kind: str) -> None:
        _, tensor = self._tensor(kind)
        raw, got, _ = self.ops.prepare(tensor, ALL_KEYS, False)
        assert raw is None
        self._assert_the_numpy_formulas(kind, got, ALL_KEYS)

    def _assert_the_numpy_formulas(self, kind: str, got: dict[str, float], keys: Sequence[str]) -> None:
        array = VALUES[kind]
        expected = red.compute_many(array, keys)
        assert set(got) == set(expected)
        for key in keys:
            want, have = expected[key], got[key]
            assert isinstance(have, float), key
            if np.isnan(want) or np.isinf(want):
                assert have == want or (np.isnan(want) and np.isnan(have)), f"{kind} {key}: {have} != {want}"
            elif key in EXACT or (array.dtype.kind in "biu" and key in EXACT_INTEGER):
                assert have == want, f"{kind} {key}: {have!r} != {want!r} (must be bit for bit)"
            else:
                assert have == pytest.approx(want, rel=self.rtol, abs=1e-300), f"{kind} {key}"

    def test_a_batch_delivers_each_value_taken_as_prepare_gives_it(self) -> None:
        """Every kind of value taken into one batch (with the reductions it may compute), in the order taken:
        raw values bit for bit, reductions by the formulas; the value as it was when taken."""
        batch = self.ops.batch()
        if batch is None:
            pytest.skip("these ops prepare every tensor when it is offered")
        tensors = {kind: self.make(VALUES[kind].copy()) for kind in sorted(VALUES) if kind not in self.unsupported}
        keys = BATCH_KEYS
        taken = [kind for kind, tensor in tensors.items() if batch.take(tensor, keys, True)]
        if not taken:
            pytest.skip("the batch takes none of these tensors (another device)")
        for kind in taken:  # changed after it was taken: the batch holds the value as it was
            self.overwrite(tensors[kind])
        delivered = batch.deliver()
        assert len(delivered) == len(taken)
        for kind, prepared in zip(taken, delivered, strict=True):
            assert not isinstance(prepared, Exception), f"{kind}: {prepared!r}"
            raw, got, orig = prepared
            assert orig is None and raw is not None
            assert raw.dtype == VALUES[kind].dtype and raw.shape == VALUES[kind].shape, kind
            np.testing.assert_array_equal(raw, VALUES[kind])
            self._assert_the_numpy_formulas(kind, got, keys)
        assert batch.deliver() == []  # delivered once

    def overwrite(self, tensor: Any) -> None:
        """Change ``tensor`` in place (for the batch test: a value taken before must not change)."""
        raise NotImplementedError

    def test_raw_and_reductions_together(self) -> None:
        array, tensor = self._tensor("float32")
        raw, got, _ = self.ops.prepare(tensor, ["mean", "abs_max"], True)
        assert raw is not None
        np.testing.assert_array_equal(raw, array)
        assert got["abs_max"] == float(np.max(np.abs(array.astype(np.float64))))

    def test_the_tensor_is_not_changed(self) -> None:
        array, tensor = self._tensor("float32")
        self.ops.prepare(tensor, ALL_KEYS, True)
        np.testing.assert_array_equal(np.asarray(self.ops.prepare(tensor, [], True)[0]), array)

    @pytest.mark.parametrize("bins", [1, 7])
    @pytest.mark.parametrize("kind", sorted(VALUES))
    def test_histogram_with_bins_fixed_from_the_tensor_equals_the_numpy_rule(self, kind: str, bins: int) -> None:
        array, tensor = self._tensor(kind)
        found = self.ops.histogram(tensor, None, bins, defer=True)  # the first fixes the bins: counted now
        assert not isinstance(found, red.PendingHistogram)
        hist = found
        edges = numpy_rule_edges(array, bins)
        if edges is None:
            assert hist is None
            return
        assert hist is not None
        np.testing.assert_array_equal(hist.edges, edges)
        assert hist.counts.dtype == np.int64
        np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(array, edges))

    @pytest.mark.parametrize("kind", sorted(VALUES))
    def test_histogram_on_given_edges_equals_the_numpy_rule(self, kind: str) -> None:
        """Fixed edges: values outside them, on them (taken from the tensor), edges float32 lacks, repeated edges."""
        array, tensor = self._tensor(kind)
        finite = np.unique(array.astype(np.float64)[np.isfinite(array.astype(np.float64))])
        given = [np.asarray(GIVEN_EDGES), REPEATED_EDGES]
        if finite.size >= 3:
            given.append(finite[[0, finite.size // 3, 2 * finite.size // 3]])  # the largest values lie outside
        for edges, defer in itertools.product(given, (False, True)):  # counted now, or later from a copy
            found = self.ops.histogram(tensor, edges, len(edges) - 1, defer=defer)
            assert found is not None
            hist = red.resolved(found)
            np.testing.assert_array_equal(hist.edges, edges)
            np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(array, edges), err_msg=f"{kind} {edges}")
