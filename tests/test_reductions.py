"""SPEC sections 3, 4: reductions saved at write time and computed at read time agree with NumPy."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensortap
from tensortap import Collection, ReductionConfig, SaveConfig, TensorUnavailableForStep, reductions
from tensortap.capture import Writer
from tensortap.capture.testing import numpy_histogram_rule, numpy_rule_edges
from tensortap.reductions import ALL_REDUCTIONS, REDUCTIONS, Histogram, compute, equal_edges, histogram

ALL = ReductionConfig(
    reductions=[*REDUCTIONS, "nan_count", "inf_count", "zero_count"],
    abs_reductions=list(REDUCTIONS),
    norms=["l1", "l2"],
    abs_norms=["l1", "l2"],
    save_raw_tensor=True,
)


def numpy_reduction(a: np.ndarray, name: str, absolute: bool = False) -> float:
    """The documented formula, written with NumPy directly: float64 over all elements."""
    x = np.abs(a).astype(np.float64) if a.dtype.kind == "c" else a.astype(np.float64)
    if absolute:
        x = np.abs(x)
    with np.errstate(all="ignore"):
        if x.size == 0 and name in ("min", "max", "mean", "std", "variance"):
            return math.nan
        return float(
            {
                "min": np.min,
                "max": np.max,
                "mean": np.mean,
                "std": np.std,
                "variance": np.var,
                "sum": np.sum,
                "prod": np.prod,
                "l1": lambda v: np.sum(np.abs(v)),
                "l2": lambda v: np.sqrt(np.sum(v * v)),
            }[name](x)
        )


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


ARRAYS = {
    "f32": np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32),
    "f16": np.random.default_rng(2).standard_normal(33).astype(np.float16),
    "f64 nan": np.array([1.0, np.nan, -2.0]),
    "f64 inf": np.array([1.0, -np.inf, 0.0]),
    "int8": np.array([-128, 127, 0, 5], dtype=np.int8),
    "uint8": np.arange(250, 256, dtype=np.uint8),
    "int64": np.array([3, -4, 10**12], dtype=np.int64),
    "bool": np.array([True, False, True]),
    "complex64": np.array([3 + 4j, -1j, np.nan + 0j, 0], dtype=np.complex64),
    "0-d": np.array(-2.5, dtype=np.float32),
    "empty": np.zeros((0, 4), dtype=np.float32),
}


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> tensortap.Trial:
    """One step: each array saved as ``reduced/<k>`` (all reductions + raw) and ``raw/<k>`` (raw only)."""
    out = tmp_path_factory.mktemp("reductions")
    with Writer(out, collection_configs={"reduced": Collection("reduced", reduction_config=ALL)}) as w, w.stepping():
        for key, a in ARRAYS.items():
            w.save(f"reduced/{key}", a, ["reduced"])
            w.save(f"raw/{key}", a, ["custom"])
    return tensortap.create_trial(out)


@pytest.mark.parametrize("key", ARRAYS)
def test_saved_reductions_equal_numpy(trial: tensortap.Trial, key: str) -> None:
    a = ARRAYS[key]
    t = trial.tensor(f"reduced/{key}")
    assert set(t.available_reductions(0)) == set(ALL.keys)
    for name in (*REDUCTIONS, "l1", "l2"):
        for absolute in (False, True):
            got = t.reduction_value(0, name, abs=absolute)
            want = numpy_reduction(a, name, absolute)
            assert same(got, want), (key, name, absolute, got, want)


@pytest.mark.parametrize("key", ARRAYS)
def test_read_time_reductions_equal_write_time(trial: tensortap.Trial, key: str) -> None:
    saved = trial.tensor(f"reduced/{key}")
    raw = trial.tensor(f"raw/{key}")
    assert raw.available_reductions(0) == []  # so every value below is computed from the raw tensor
    for rkey in ALL.keys:
        name, absolute = (rkey[4:], True) if rkey.startswith("abs_") else (rkey, False)
        got, want = raw.reduction_value(0, name, abs=absolute), saved.reduction_value(0, name, abs=absolute)
        assert same(got, want), (key, rkey, got, want)
        assert same(compute(ARRAYS[key], rkey), want)


def test_health_counts(tmp_path: Path) -> None:
    a = np.array([[np.nan, 0.0, np.inf], [-np.inf, -0.0, np.nan], [1.0, 0.0, np.inf]], dtype=np.float32)
    ints = np.array([0, 1, 0, 2], dtype=np.int32)
    rc = ReductionConfig(reductions=["nan_count", "inf_count", "zero_count", "mean"])
    with Writer(tmp_path, reduction_config=rc) as w, w.stepping():
        w.save("a", a)
        w.save("ints", ints)
    trial = tensortap.create_trial(tmp_path)
    t = trial.tensor("a")
    assert t.reduction_value(0, "nan_count") == 2
    assert t.reduction_value(0, "inf_count") == 3
    assert t.reduction_value(0, "zero_count") == 3
    assert math.isnan(t.reduction_value(0, "mean"))
    i = trial.tensor("ints")
    assert (i.reduction_value(0, "nan_count"), i.reduction_value(0, "inf_count")) == (0, 0)
    assert i.reduction_value(0, "zero_count") == 2
    assert i.reduction_value(0, "mean") == 0.75


def test_value_of_reduction_only_tensor_names_the_reductions(tmp_path: Path) -> None:
    rc = ReductionConfig(reductions=["mean", "nan_count"], abs_norms=["l2"])
    assert not rc.saves_raw
    with Writer(tmp_path, reduction_config=rc) as w, w.stepping():
        w.save("g", np.array([3.0, -4.0]))
    t = tensortap.create_trial(tmp_path).tensor("g")
    assert not t.has_raw(0)
    with pytest.raises(TensorUnavailableForStep) as info:
        t.value(0)
    for word in ("'g'", "mean", "nan_count", "abs_l2", "save_raw_tensor"):
        assert word in str(info.value)
    assert t.reduction_value(0, "l2", abs=True) == 5.0
    assert t.reduction_value(0, "mean") == -0.5
    with pytest.raises(TensorUnavailableForStep, match=r"'max'.*saved: abs_l2, mean, nan_count"):
        t.reduction_value(0, "max")
    with pytest.raises(ValueError, match=r"'median'.*did you mean 'mean' or 'min'"):
        t.reduction_value(0, "median")


def test_reduction_values_over_steps_and_collections_merge(tmp_path: Path) -> None:
    """A tensor in two collections gets the union of their reductions; raw only if one asks for it."""
    cfgs = {
        "gradients": Collection("gradients", reduction_config=ReductionConfig(reductions=["max"])),
        "weights": Collection("weights", reduction_config=ReductionConfig(norms=["l1"])),
    }
    with Writer(tmp_path, collection_configs=cfgs, include_collections=["gradients", "weights"]) as w:
        for s in range(3):
            with w.stepping():
                w.save("both", np.array([1.0, -2.0]) * (s + 1), ["gradients", "weights"])
    t = tensortap.create_trial(tmp_path).tensor("both")
    assert t.available_reductions(2) == ["l1", "max"]
    assert not t.has_raw(2)
    assert t.reduction_values("max") == {0: 1.0, 1: 2.0, 2: 3.0}
    assert t.reduction_values("l1") == {0: 3.0, 1: 6.0, 2: 9.0}
    assert t.reduction_values("min") == {}


def test_every_reduction_name_is_computable() -> None:
    a = np.array([1.0, -2.0, 0.0, np.nan])
    assert {k: compute(a[:3], k) for k in ALL_REDUCTIONS} == {
        "min": -2.0, "max": 1.0, "mean": -1 / 3, "std": float(np.std([1.0, -2.0, 0.0])),
        "variance": float(np.var([1.0, -2.0, 0.0])), "sum": -1.0, "prod": -0.0, "l1": 3.0,
        "l2": math.sqrt(5.0), "nan_count": 0.0, "inf_count": 0.0, "zero_count": 1.0,
    }  # fmt: skip
    assert compute(a, "nan_count") == 1.0
    with pytest.raises(ValueError, match="'median'"):
        compute(a, "median")


def test_to_pandas_long_format(tmp_path: Path) -> None:
    weights = Collection("weights", reduction_config=ReductionConfig(reductions=["mean"], norms=["l2"]))
    with Writer(tmp_path, collection_configs={"weights": weights}) as w:
        for mode, n in (("TRAIN", 2), ("EVAL", 1)):
            for _ in range(n):
                with w.stepping(mode=mode):
                    w.save_scalar("loss", np.float32(w.step + 0.5), collections=["losses"])
                    w.save("w", np.array([3.0, -4.0]) * (w.step + 1), ["weights"])
    trial = tensortap.create_trial(tmp_path)
    df = trial.to_pandas()
    assert list(df.columns) == ["worker", "mode", "mode_step", "step", "name", "reduction", "value"]
    rows = sorted(df.itertuples(index=False, name=None), key=lambda r: (r[3], r[4], r[5]))
    assert rows == [
        ("worker_0", "TRAIN", 0, 0, "losses/loss", "value", 0.5),
        ("worker_0", "TRAIN", 0, 0, "w", "l2", 5.0),
        ("worker_0", "TRAIN", 0, 0, "w", "mean", -0.5),
        ("worker_0", "TRAIN", 1, 1, "losses/loss", "value", 1.5),
        ("worker_0", "TRAIN", 1, 1, "w", "l2", 10.0),
        ("worker_0", "TRAIN", 1, 1, "w", "mean", -1.0),
        ("worker_0", "EVAL", 0, 2, "losses/loss", "value", 2.5),
        ("worker_0", "EVAL", 0, 2, "w", "l2", 15.0),
        ("worker_0", "EVAL", 0, 2, "w", "mean", -1.5),
    ]
    losses = trial.to_pandas(collection="losses", reductions=["max", "abs_min", "l2"])
    assert set(losses["name"]) == {"losses/loss"}
    assert len(losses) == 9  # computed from the raw scalars
    assert losses[(losses.step == 2) & (losses.reduction == "abs_min")]["value"].item() == 2.5
    only_mean = trial.to_pandas(names=["w"], reductions=["mean", "max"])
    assert list(only_mean["reduction"]) == ["mean"] * 3  # max was not saved and there is no raw tensor
    assert list(only_mean["value"]) == [-0.5, -1.0, -1.5]


def test_raw_at_some_steps_reductions_at_others(tmp_path: Path) -> None:
    cfgs = {
        "gradients": Collection("gradients", reduction_config=ReductionConfig(reductions=["max"])),
        "weights": Collection("weights", save_config=SaveConfig(save_interval=2)),  # raw
    }
    with Writer(tmp_path, collection_configs=cfgs, include_collections=["gradients", "weights"]) as w:
        for s in range(4):
            with w.stepping():
                w.save("t", np.array([-1.0, 2.0]) * (s + 1), ["gradients", "weights"])
    t = tensortap.create_trial(tmp_path).tensor("t")
    assert t.steps() == [0, 1, 2, 3]
    assert [t.has_raw(s) for s in range(4)] == [True, False, True, False]
    np.testing.assert_array_equal(t.value(2), [-3.0, 6.0])
    with pytest.raises(TensorUnavailableForStep, match="only reductions were saved \\(max\\)"):
        t.value(1)
    assert list(t.values()) == [0, 2]
    assert t.reduction_values("max") == {0: 2.0, 1: 4.0, 2: 6.0, 3: 8.0}
    assert t.reduction_values("min") == {0: -1.0, 2: -3.0}  # computable where the raw tensor is


HIST_DTYPES = st.sampled_from(
    ["float16", "float32", "float64", "int8", "int32", "int64", "uint16", "bool", "complex64"]
)


@st.composite
def arrays_and_edges(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | int]:
    """An array (NaN, Inf, repeats) and edges: a number of bins, or edges partly taken from its own values."""
    dtype = np.dtype(draw(HIST_DTYPES))
    array = draw(hnp.arrays(dtype, draw(st.integers(0, 40)), elements=hnp.from_dtype(dtype, allow_subnormal=False)))
    if draw(st.booleans()):
        return array, draw(st.integers(1, 9))
    pool = [float(v) for v in np.abs(array).ravel() if np.isfinite(v)] if dtype.kind == "c" else []
    pool += [float(v) for v in array.ravel() if dtype.kind != "c" and np.isfinite(v)]
    picked = draw(st.lists(st.sampled_from(pool) if pool else st.floats(-1e6, 1e6), max_size=4))
    more = draw(st.lists(st.floats(-1e38, 1e38, allow_subnormal=False), min_size=2, max_size=5))
    edges = np.unique(np.array(picked + more, dtype=np.float64))
    return array, edges if edges.size >= 2 else np.array([-1.0, 1.0])


#: How a histogram is counted: the compiled kernel (src/_bins.c), or NumPy's passes (sorting or
#: arithmetic), which tensortap uses where the kernel was not built.
COUNTING = ["compiled", "numpy"]


@contextlib.contextmanager
def counted_by(path: str, linear_from: int | None = None, block: int | None = None) -> Iterator[None]:
    """Histograms counted by ``path`` (of :data:`COUNTING`); with NumPy, by arithmetic from
    ``linear_from`` values, ``block`` values at a time, where given."""
    with pytest.MonkeyPatch.context() as mp:
        if path == "numpy":
            mp.setattr(reductions, "_kernel", None)
            if linear_from is not None:
                mp.setattr(reductions, "_LINEAR_MIN_SIZE", linear_from)
            if block is not None:
                mp.setattr(reductions, "_BLOCK", block)
        yield


@pytest.mark.parametrize("path", COUNTING)
@settings(max_examples=400, deadline=None)
@given(case=arrays_and_edges())
def test_histogram_counts_equal_the_numpy_calls_of_the_rule(
    path: str, case: tuple[np.ndarray, np.ndarray | int]
) -> None:
    """reductions.histogram (NumPy: sorted values, these arrays being small) against the rule's NumPy calls."""
    array, bins = case
    with counted_by(path):
        hist = histogram(array, bins)
    _assert_the_rule(hist, array, bins)


def _assert_the_rule(hist: Histogram | None, array: np.ndarray, bins: np.ndarray | int) -> None:
    """``hist`` has the edges and counts of np.histogram(np.clip(...)) in float64 (None: no finite value)."""
    magnitudes = np.abs(array) if array.dtype.kind == "c" else array
    edges = numpy_rule_edges(magnitudes, bins) if isinstance(bins, int) else bins
    if edges is None:
        assert hist is None
        return
    assert hist is not None
    np.testing.assert_array_equal(hist.edges, edges)
    np.testing.assert_array_equal(hist.counts, numpy_histogram_rule(array, edges))


@pytest.mark.parametrize("value", [3.0, 2.0**35, -(2.0**53), 9.1e15, 2.0**62, 1.7e308, np.finfo(np.float64).max])
@pytest.mark.parametrize("dtype", ["float64", "int64", "float32"])
def test_a_constant_tensor_gets_distinct_edges_around_it(value: float, dtype: str) -> None:
    """Beyond about 9e15 ``x -+ 0.5`` rounds to ``x``: its edges were all equal, its one value in the last bin."""
    big = float(np.finfo(dtype).max) if np.dtype(dtype).kind == "f" else float(2**62)
    array = np.full(6, min(value, big), dtype=dtype)
    for bins in (1, 2, 64, reductions.MAX_BINS):
        hist = histogram(array, bins)
        assert hist is not None and (np.diff(hist.edges) > 0).all() and np.isfinite(hist.edges).all()
        _assert_the_rule(hist, array, bins)
    hist = histogram(array, 2)
    assert hist is not None and hist.counts.tolist() == [0, 6]  # x is the middle edge (the last one at the max)


@pytest.mark.parametrize("size", [5, 600_000], ids=["sorted", "by-arithmetic-size"])
def test_a_range_wider_than_the_largest_float64_gets_finite_edges(size: int) -> None:
    big = np.finfo(np.float64).max
    array = np.random.default_rng(0).uniform(-1, 1, size) * big
    array[:2] = -big, big  # the span overflows float64
    hist = histogram(array, 4)
    assert hist is not None and np.isfinite(hist.edges).all() and (np.diff(hist.edges) > 0).all()
    assert hist.edges[0] == -big and hist.edges[-1] == big
    _assert_the_rule(hist, array, 4)
    assert hist.counts.sum() == size


def test_a_range_just_under_the_largest_float64_gets_numpy_edges_without_a_warning() -> None:
    """linspace's last step overflows there (before it sets the last edge to the end): no warning leaks."""
    import warnings

    big = np.finfo(np.float64).max
    array = np.array([-big / 2, big / 2, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hist = histogram(array, 3)
    assert hist is not None and np.isfinite(hist.edges).all() and hist.edges[-1] == big / 2
    _assert_the_rule(hist, array, 3)


@st.composite
def values_around_equal_edges(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Equal edges and values on them, one ulp either side, inside, outside, NaN and Inf."""
    dtype = np.dtype(draw(st.sampled_from(["float32", "float64", "float16", "int16"])))
    bins = draw(st.integers(1, 70))
    lo = draw(st.floats(-1e5, 1e5, allow_subnormal=False))
    width = draw(st.floats(1e-7, 1e5, allow_subnormal=False)) * max(1.0, abs(lo))
    edges = equal_edges(lo, lo + width, bins)
    binned = np.float64 if dtype == np.float64 else np.float32
    with np.errstate(all="ignore"):
        on = edges.astype(binned)
        pool = np.concatenate([on, np.nextafter(on, binned(np.inf)), np.nextafter(on, binned(-np.inf))])
    inside = st.floats(lo - width / 4, lo + width * 1.25, allow_subnormal=False)
    special = st.sampled_from([np.nan, np.inf, -np.inf])
    values = draw(st.lists(st.one_of(st.sampled_from(pool.tolist()), inside, special), min_size=1, max_size=120))
    with np.errstate(all="ignore"):
        array = np.array(values).astype(dtype)
    return array, edges


@pytest.mark.parametrize("path", COUNTING)
@settings(max_examples=300, deadline=None)
@given(case=st.one_of(values_around_equal_edges(), arrays_and_edges()), block=st.integers(1, 40))
def test_counting_by_arithmetic_equals_the_numpy_calls_of_the_rule(
    path: str, case: tuple[np.ndarray, np.ndarray | int], block: int
) -> None:
    """The O(n) counting (NumPy's for large arrays, here on any array and in blocks of ``block`` values)."""
    array, bins = case
    with counted_by(path, linear_from=0, block=block):
        hist = histogram(array, bins)
    _assert_the_rule(hist, array, bins)


@pytest.mark.parametrize("path", COUNTING)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_large_array_is_counted_by_arithmetic_exactly(dtype: str, path: str) -> None:
    """Values on every edge and one ulp either side, outside the edges, NaN and Inf, in several blocks."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal(reductions._LINEAR_MIN_SIZE + 12345).astype(dtype)
    edges = equal_edges(-2.0, 2.5, 64)
    on = edges.astype(dtype)
    near = np.concatenate([on, np.nextafter(on, np.inf), np.nextafter(on, -np.inf)])
    values[: near.size] = near
    big = np.finfo(dtype).max
    values[1000:1003] = [big, -big, big / 2]  # finite, with a position that overflows
    values[-3:] = [np.nan, np.inf, -np.inf]
    clean = values[:-3]
    assert reductions._rule(edges, np.dtype(dtype))[1] is not None  # counted by arithmetic, not sorted
    with counted_by(path):
        np.testing.assert_array_equal(reductions.histogram_counts(values, edges), numpy_histogram_rule(values, edges))
        np.testing.assert_array_equal(reductions.histogram_counts(clean, edges), numpy_histogram_rule(clean, edges))


def test_the_compiled_counting_is_built_and_refuses_what_it_cannot_count() -> None:
    """Every install of this project builds src/_bins.c (an optional extension that would fall back
    to NumPy's passes silently); the kernel checks the types and sizes it is given."""
    kernel = reductions._kernel
    assert kernel is not None, "tensortap._bins was not built: histograms are counted by NumPy's passes"
    x, interior, counts = np.zeros(5, np.float32), np.zeros(3, np.float32), np.zeros(4, np.int64)
    kernel.count_linear(x, 0.0, 1.0, 0.0, interior, counts)
    assert counts.tolist() == [5, 0, 0, 0]
    native = "<" if sys.byteorder == "little" else ">"
    kernel.count_linear(x.astype(np.dtype("f4").newbyteorder(native)), 0.0, 1.0, 0.0, interior, counts)
    assert counts.tolist() == [10, 0, 0, 0]  # the byte order written out, as a reader's "<f4" arrays are
    with pytest.raises(TypeError, match="float32 or float64 alike"):
        kernel.count_linear(x.astype(np.float64), 0.0, 1.0, 0.0, interior, counts)
    with pytest.raises(TypeError, match="float32 or float64 alike"):
        kernel.count_linear(
            x.astype(np.dtype("f4").newbyteorder(">" if native == "<" else "<")), 0.0, 1.0, 0.0, interior, counts
        )
    with pytest.raises(TypeError, match="int64"):
        kernel.count_linear(x, 0.0, 1.0, 0.0, interior, counts.astype(np.int32))
    with pytest.raises(ValueError, match="one bound fewer"):
        kernel.count_linear(x, 0.0, 1.0, 0.0, interior[:2], counts)
    with pytest.raises(ValueError, match="tol in"):
        kernel.count_linear(x, 0.0, 1.0, 0.5, interior, counts)
    with pytest.raises(ValueError, match="read-only"):
        counts.flags.writeable = False
        kernel.count_linear(x, 0.0, 1.0, 0.0, interior, counts)
    with pytest.raises(ValueError, match="not C-contiguous"):
        kernel.count_linear(np.zeros(10, np.float32)[::2], 0.0, 1.0, 0.0, interior, np.zeros(4, np.int64))


def test_edges_too_close_for_the_dtype_fall_back_to_sorting() -> None:
    """float32 values near 1000 on bins 1e-4 wide: rounding spans bins, so the values are sorted instead."""
    edges = equal_edges(1000.0, 1000.0 + 64e-4, 64)
    values = (1000.0 + np.random.default_rng(1).uniform(-1e-3, 7e-3, reductions._LINEAR_MIN_SIZE)).astype(np.float32)
    assert reductions._rule(edges, np.dtype("float32"))[1] is None
    np.testing.assert_array_equal(reductions.histogram_counts(values, edges), numpy_histogram_rule(values, edges))


@pytest.mark.parametrize("path", COUNTING)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("size", [11, 600_000], ids=["small", "large"])
def test_a_span_wider_than_the_dtype_is_counted_exactly(dtype: str, size: int, path: str) -> None:
    """Values over the whole range of the type the kernel counts them in (float32 for bfloat16), so that
    many lie farther from the first edge than its largest number: in their own bins, not the last.
    (A float64 span that wide does not fit float64 itself, so its values are sorted; complex values are
    binned by magnitude, whose span fits.)"""
    binned = np.dtype(reductions.bin_dtype(dtype))
    big = float(np.finfo(binned).max)
    values = np.random.default_rng(2).uniform(-0.99, 0.99, size) * big
    values[:11] = np.linspace(-0.9, 0.9, 11) * big  # evenly spread: two values in most of 10 bins
    array = values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    edges = equal_edges(float(array.min()), float(array.max()), 10)
    assert (reductions._rule(edges, binned)[1] is not None) == (binned == np.float32)  # the kernel's plan
    for bins in (10, 64):
        with counted_by(path, linear_from=0):
            hist = histogram(array, bins)
        _assert_the_rule(hist, array, bins)
