"""Reductions and health counts: names, validation and the NumPy formulas.

The same functions compute a reduction at write time (for NumPy inputs) and at
read time (from a raw tensor), so the two always agree; a framework's hook that
reduces on its device uses the same formulas, identical up to floating-point
summation order (a relative 1e-14 on large tensors). Every reduction is
computed in float64 over all elements; on an empty tensor ``min``, ``max``,
``mean``, ``std`` and ``variance`` are NaN, ``sum`` is 0 and ``prod`` is 1.
Complex tensors are reduced by magnitude ``|z|`` (so ``l2`` is their vector norm).

Histograms (:func:`histogram_edges`, :func:`histogram_counts`) are the one
reduction that is not a number: ``(edges, counts)`` of the finite values.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from .exceptions import UnknownName

try:  # the compiled counting of src/_bins.c, where it was built (an optional extension)
    from tensortap import _bins as _kernel
except ImportError:  # no C compiler at install: NumPy's passes, the same counts
    _kernel = None

REDUCTIONS = ("min", "max", "mean", "std", "variance", "sum", "prod")
NORMS = ("l1", "l2")
HEALTH_COUNTS = ("nan_count", "inf_count", "zero_count")
ALL_REDUCTIONS = REDUCTIONS + NORMS + HEALTH_COUNTS
KEYS = (*ALL_REDUCTIONS, *(f"abs_{r}" for r in ALL_REDUCTIONS))
"""Every key a reduction is stored under (``"mean"``, ``"abs_mean"``...)."""
DEFAULT_BINS = 64
MAX_BINS = 4096
_CHUNK_BYTES = 8 << 20  # float64 bytes converted at once by compute_rows
_LINEAR_MIN_SIZE = 1 << 15  # values from which counting by arithmetic beats sorting (bench/profiles/histogram.md)
_CONSTANT_WIDTH = 2.0**-36  # half the range of a constant tensor's bins, relative to its value (equal_edges)
_BLOCK = 1 << 18  # values binned at once by _linear_counts (bench/profiles/histogram.md: fewer calls, same speed)


def reduction_key(name: str, abs: bool = False) -> str:
    """Return the stored key of a reduction: ``"mean"`` or ``"abs_mean"``."""
    return f"abs_{name}" if abs else name


def split_key(key: str) -> tuple[str, bool]:
    """Inverse of :func:`reduction_key`."""
    if key.startswith("abs_"):
        return key[4:], True
    return key, False


def _as_float64(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float64:
        return a
    if a.dtype.kind == "c":  # complex: reduce the magnitudes
        return np.abs(a).astype(np.float64)
    return a.astype(np.float64)


Formula = Callable[[np.ndarray, Any], Any]


def _empty_nan(fn: Formula) -> Formula:
    def wrapped(a: np.ndarray, axis: Any) -> Any:
        if a.size == 0 or (axis is not None and a.shape[axis] == 0):
            return np.full(a.shape[0], np.nan) if axis is not None else np.nan
        return fn(a, axis)

    return wrapped


# Each formula takes ``axis=None`` (the whole array, one number) or ``axis=1`` (each row of a 2-D block).
_FORMULAS: dict[str, Formula] = {
    "min": _empty_nan(lambda a, axis: np.min(a, axis=axis)),
    "max": _empty_nan(lambda a, axis: np.max(a, axis=axis)),
    "mean": _empty_nan(lambda a, axis: np.mean(a, axis=axis)),
    "std": _empty_nan(lambda a, axis: np.std(a, axis=axis)),
    "variance": _empty_nan(lambda a, axis: np.var(a, axis=axis)),
    "sum": lambda a, axis: np.sum(a, axis=axis),
    "prod": lambda a, axis: np.prod(a, axis=axis),
    "l1": lambda a, axis: np.sum(np.abs(a), axis=axis),
    "l2": lambda a, axis: np.sqrt(np.sum(a * a, axis=axis)),
}


def _health(a: np.ndarray, name: str, axis: Any) -> Any:
    if name == "zero_count":
        return np.count_nonzero(a == 0, axis=axis)
    if a.dtype.kind not in "fc":
        return 0 if axis is None else np.zeros(a.shape[0], dtype=np.int64)
    test = np.isnan if name == "nan_count" else np.isinf
    return np.count_nonzero(test(a), axis=axis)


def check_key(key: str) -> tuple[str, bool]:
    """The reduction that ``key`` (``"mean"``, ``"abs_max"``...) names, and whether of absolute values.

    Raises
    ------
    UnknownName
        ``key`` names no reduction (a ``ValueError`` too); the message suggests the closest keys.
    """
    name, absolute = split_key(key)
    if name not in ALL_REDUCTIONS:
        raise UnknownName(
            "reduction",
            key,
            KEYS,
            listed=f"{', '.join(ALL_REDUCTIONS)}, each also as abs_NAME",
        )
    return name, absolute


def compute(array: np.ndarray, key: str) -> float:
    """Compute the reduction stored under ``key`` (e.g. ``"abs_mean"``) on ``array``.

    Parameters
    ----------
    array
        Any NumPy array; it is converted to float64 first.
    key
        A reduction name from :data:`ALL_REDUCTIONS`, optionally prefixed ``abs_``.
    """
    name, absolute = check_key(key)
    a = np.asarray(array)
    if name in HEALTH_COUNTS:
        return float(_health(a, name, None))
    x = _as_float64(a)
    if absolute:
        x = np.abs(x)
    with np.errstate(all="ignore"):
        return float(_FORMULAS[name](x, None))


def compute_many(array: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
    """Compute several reductions on one array (it is converted to float64 once)."""
    a = np.asarray(array)
    x = _as_float64(a) if a.dtype.kind in "biufc" and keys else a
    return {k: compute(x if split_key(k)[0] not in HEALTH_COUNTS else a, k) for k in keys}


def compute_rows(arrays: Sequence[np.ndarray] | np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Reductions of each of ``arrays`` (same shape and dtype, or stacked as ``[n, *shape]``).

    Element ``i`` of each result equals ``compute(arrays[i], key)``: the same
    formulas, applied to a block of rows at once. Rows are converted to float64
    into one reused buffer a block at a time, so memory stays bounded.
    """
    for k in keys:
        check_key(k)
    n = len(arrays)
    out = {k: np.empty(n, dtype=np.float64) for k in keys}
    if n == 0:
        return out
    size = int(np.asarray(arrays[0]).size)
    chunk = max(1, _CHUNK_BYTES // max(size * 8, 1))
    buf = np.empty((min(chunk, n), size), dtype=np.float64)
    abs_buf = np.empty_like(buf) if any(split_key(k)[1] for k in keys) else None
    for start in range(0, n, chunk):
        part = arrays[start : start + chunk]
        m = len(part)
        x = buf[:m]
        if isinstance(part, np.ndarray):  # one cast copy into memory that is already mapped
            x[...] = np.abs(part).reshape(m, size) if part.dtype.kind == "c" else part.reshape(m, size)
        else:
            for j in range(m):
                row = np.asarray(part[j]).reshape(size)
                x[j] = np.abs(row) if row.dtype.kind == "c" else row
        ax = np.abs(x, out=abs_buf[:m]) if abs_buf is not None else x
        with np.errstate(all="ignore"):
            for k in keys:
                name, is_abs = split_key(k)
                if name in HEALTH_COUNTS and isinstance(part, np.ndarray):
                    out[k][start : start + m] = _health(part.reshape(m, size), name, 1)
                elif name in HEALTH_COUNTS:
                    out[k][start : start + m] = [_health(np.asarray(a), name, None) for a in part]
                else:
                    out[k][start : start + m] = _FORMULAS[name](ax if is_abs else x, 1)
    return out


class Histogram(NamedTuple):
    """A histogram: ``counts[i]`` values fell in ``[edges[i], edges[i+1])`` (the last bin includes its right edge).

    Unpacks as ``edges, counts = histogram``.
    """

    edges: np.ndarray
    counts: np.ndarray


#: Counts the codes of a histogram (non-negative integers below ``minlength``), as
#: ``numpy.bincount(codes, minlength=minlength)`` does, in :func:`_linear_counts`; an adapter
#: may give a faster kernel (:attr:`tensortap.capture.TensorOps.bincount`).
Bincount = Callable[[np.ndarray, int], np.ndarray]


def _np_bincount(codes: np.ndarray, minlength: int) -> np.ndarray:
    return np.bincount(codes, minlength=minlength)


class PendingHistogram:
    """A histogram whose values were taken at save and are counted later (made by :func:`pending_histogram`).

    Holds the values, flat in their :func:`bin_dtype` and owned, until they are counted by
    :meth:`count`: on another thread while training goes on, or by the first :meth:`resolve`,
    whichever comes first (a lock makes it happen once). The counts are exactly those
    :func:`histogram_counts` gives.
    """

    __slots__ = ("_bincount", "_counts", "_lock", "edges", "values")

    def __init__(self, values: np.ndarray, edges: np.ndarray, bincount: Bincount | None = None) -> None:
        self.values: np.ndarray | None = values  # None once counted
        self.edges = edges
        self._bincount = bincount
        self._counts: np.ndarray | None = None
        self._lock = threading.Lock()

    def count(self) -> np.ndarray | None:
        """Count the values unless that is done; return the values array, no longer held, if this call counted."""
        with self._lock:
            if self._counts is not None or self.values is None:
                return None
            values = self.values
            self._counts = _counts(values, np.asarray(self.edges, dtype=np.float64), self._bincount)
            self.values = None
            return values

    def resolve(self) -> Histogram:
        """The histogram, counted now if it is not yet."""
        self.count()
        assert self._counts is not None
        return Histogram(self.edges, self._counts)


def pending_histogram(
    array: np.ndarray, edges: np.ndarray, bincount: Bincount | None = None, out: np.ndarray | None = None
) -> PendingHistogram:
    """``array`` taken for counting later on ``edges``: converted to the values it is binned on now
    (a value that cannot be binned fails here, on the training thread, where the hook skips that
    tensor alone) and copied: into ``out`` when given (a recycled buffer, flat, of ``array``'s
    size and :func:`bin_dtype`), else into a new array unless the conversion made one."""
    a = np.asarray(array)
    if out is not None and a.dtype.kind != "c":
        np.copyto(out, a.reshape(-1), casting="unsafe")  # the conversion of astype(bin_dtype)
        return PendingHistogram(out, edges, bincount)
    x = _binned_values(a)
    return PendingHistogram(x.copy() if np.may_share_memory(x, a) else x, edges, bincount)


def resolved(hist: Histogram | PendingHistogram) -> Histogram:
    """``hist``, counted if it is pending."""
    return hist.resolve() if isinstance(hist, PendingHistogram) else hist


def check_edges(edges: Sequence[float] | np.ndarray, field_name: str = "histogram") -> np.ndarray:
    """``edges`` as float64, or a ValueError: at least 2 finite, strictly increasing numbers."""
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or not 2 <= len(e) <= MAX_BINS + 1 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError(
            f"{field_name}: expected a number of bins (1 to {MAX_BINS}) or 2 to {MAX_BINS + 1} finite, "
            f"strictly increasing edges, got {edges!r}"
        )
    return e


def check_bins(bins: int | Sequence[float] | np.ndarray, field_name: str = "bins") -> int | np.ndarray:
    """``bins`` checked: a number of bins (an integer, not a bool, 1 to :data:`MAX_BINS`) as an int, else
    edges as :func:`check_edges` gives them; a ValueError naming ``field_name`` otherwise (``0`` or ``-3``
    too: they gave an empty histogram, or NumPy's error)."""
    if isinstance(bins, bool) or (isinstance(bins, (int, np.integer)) and not 1 <= bins <= MAX_BINS):
        raise ValueError(f"{field_name}: expected a number of bins (1 to {MAX_BINS}) or edges, got {bins!r}")
    if isinstance(bins, (int, np.integer)):
        return int(bins)
    return check_edges(bins, field_name)


def equal_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins`` equal bins from ``lo`` to ``hi`` (the finite range of a tensor): ``numpy.linspace``.

    A constant tensor (``lo == hi == x``) gets the range ``[x - d, x + d]``, ``d = max(0.5, |x| * 2**-36)``:
    ``0.5`` up to ``|x| = 2**35``, and beyond a relative width that keeps up to :data:`MAX_BINS` bins
    distinct (``x +- 0.5`` rounds to ``x`` from about 9e15); an end beyond the largest float64 is ``x``.
    A range wider than the largest float64 (values near both of its ends), where ``linspace``'s step
    overflows, gets the edges ``lo * (1 - t) + hi * t`` for ``t = linspace(0, 1)``: finite, from ``lo`` to ``hi``.
    """
    lo, hi = float(lo), float(hi)  # Python floats: a span that overflows is inf, without a NumPy warning
    if not lo < hi:
        d = max(0.5, abs(lo) * _CONSTANT_WIDTH)
        lo, hi = (lo - d if math.isfinite(lo - d) else lo), (hi + d if math.isfinite(hi + d) else hi)
    if math.isfinite(hi - lo):
        with np.errstate(over="ignore"):  # a span near the largest float64: only the last edge overflows,
            return np.linspace(lo, hi, bins + 1)  # and linspace sets that one to hi
    t = np.linspace(0.0, 1.0, bins + 1)
    return lo * (1.0 - t) + hi * t


def histogram_edges(array: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray | None:
    """``bins`` equal bins over the range of the finite values of ``array``; None if it has none.

    A constant tensor gets the range ``[x - 0.5, x + 0.5]`` (wider where ``|x| > 2**35``: :func:`equal_edges`).
    """
    span = _finite_range(_as_float64(np.asarray(array)).ravel())
    return None if span is None else equal_edges(*span, bins)


def _finite_range(a: np.ndarray) -> tuple[float, float] | None:
    """``(min, max)`` of the finite values of flat ``a``; None if it has none."""
    finite = np.isfinite(a)
    if not finite.all():
        a = a[finite]
    if a.size == 0:
        return None
    return float(a.min()), float(a.max())


K = TypeVar("K")
V = TypeVar("V")


class Remembered(Generic[K, V]):
    """Values made once per key (a tensor's bin rule, its bounds on a device), at most ``size`` of
    them: when full it starts afresh (a tensor's entry is made again at its next count)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: dict[K, V] = {}

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` unless it is remembered."""
        value = self._values.get(key)
        if value is None:
            if len(self._values) >= self.size:
                self._values.clear()
            value = self._values[key] = make()
        return value


@functools.cache
def dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name``, remembered per dtype: NumPy works it out in Python at every call (about
    5 µs, an exception raised and caught), which the hook pays for every histogram tensor."""
    return dtype.name


def bin_dtype(dtype: str) -> str:
    """The float type a tensor of ``dtype`` (a NumPy or Keras dtype name) is binned in: exactly.

    ``"float32"`` for the types it holds exactly (float32 and narrower floats, 8- and
    16-bit integers, bool, the magnitudes of complex64), else ``"float64"``.
    """
    narrow = ("bool", "int8", "int16", "uint8", "uint16", "float16", "bfloat16", "float32", "complex64")
    return "float32" if dtype in narrow or dtype.startswith("float8") else "float64"


class BinBounds(NamedTuple):
    """The histogram rule as a device computes it: ``edges`` rounded up into the dtype the values are binned in.

    A finite value ``x`` falls in bin ``clip(searchsorted(bounds, x, side="right"), first, bins) - 1``
    and NaN and ±Inf in none. This counts exactly as :func:`histogram_counts`: for
    ``x`` held exactly in ``bounds``' dtype, ``x < edge`` if and only if
    ``x < bound`` (the bound being the smallest number of that dtype not below the
    edge), and the clip is the clamp of outside values into the outer bins
    (``first`` > 1 when edges repeat ``edges[0]``: the bins before it stay empty).
    """

    bounds: np.ndarray
    first: int
    bins: int


def bin_bounds(edges: np.ndarray, dtype: str = "float64") -> BinBounds:
    """The :class:`BinBounds` of ``edges`` (float64, non-decreasing) for values binned in ``dtype``."""
    e = np.asarray(edges, dtype=np.float64)
    bounds = e
    if dtype != "float64":
        with np.errstate(over="ignore"):  # edges beyond the dtype's range, or next to its largest number
            bounds = e.astype(dtype)
            low = bounds.astype(np.float64) < e
            bounds = np.where(low, np.nextafter(bounds, np.inf, dtype=bounds.dtype), bounds)
    first = min(int(np.searchsorted(e, e[0], side="right")), len(e) - 1)  # edges equal to edges[0]: 1 unless repeated
    return BinBounds(bounds, first, len(e) - 1)


def _binned_values(array: np.ndarray) -> np.ndarray:
    """``array`` flat, as the values it is binned on (magnitudes of complex), in its :func:`bin_dtype`."""
    a = np.asarray(array)
    if a.dtype.kind == "c":
        a = np.abs(a)
    return a.astype(bin_dtype(dtype_name(a.dtype)), copy=False).ravel()


def histogram_counts(array: np.ndarray, edges: np.ndarray, bincount: Bincount | None = None) -> np.ndarray:
    """Counts (int64) of the finite values of ``array`` in the bins ``edges``.

    The bins are fixed, the values move: a value below ``edges[0]`` is counted
    in the first bin and one above ``edges[-1]`` in the last, so that every
    finite value is counted. NaN and infinities are not (``nan_count`` and
    ``inf_count`` count them). Complex values are binned by magnitude.

    The rule is ``numpy.histogram(numpy.clip(finite, edges[0], edges[-1]), bins=edges)``
    on the values as float64: ``counts[i]`` values ``v`` with ``edges[i] <= v < edges[i+1]``,
    the last bin including ``edges[-1]``. It is computed on the values in their
    :func:`bin_dtype` against :class:`BinBounds`, which gives the same counts faster:
    on about equal bins by arithmetic, in one call that releases the GIL (the compiled
    kernel ``tensortap._bins``), or where it was not built with NumPy's passes on large
    arrays (:func:`_linear_counts`, counted with ``bincount``: ``numpy.bincount`` by
    default); else on the sorted values.
    """
    return _counts(_binned_values(array), np.asarray(edges, dtype=np.float64), bincount)


def _counts(x: np.ndarray, edges: np.ndarray, bincount: Bincount | None = None) -> np.ndarray:
    """:func:`histogram_counts` of ``x``, flat and already in its :func:`bin_dtype`."""
    b, linear = _rule(edges, x.dtype)
    if linear is not None and _kernel is not None:
        counts = np.zeros(b.bins, dtype=np.int64)
        _kernel.count_linear(
            np.ascontiguousarray(x),
            float(linear.lo),
            float(linear.scale),
            float(linear.tol),
            b.bounds[1 : b.bins],
            counts,
        )
        return counts
    if linear is not None and x.size >= _LINEAR_MIN_SIZE:
        return _linear_counts(x, b, linear, bincount or _np_bincount)
    return _sorted_counts(np.sort(x), b)


def _finite_span(s: np.ndarray) -> tuple[int, int]:
    """``(start, end)``: the finite values of sorted ``s`` are ``s[start:end]`` (-Inf before, +Inf and NaN after)."""
    inf = s.dtype.type(np.inf)  # of s's dtype: a Python float would convert all of s to float64 first
    return int(np.searchsorted(s, -inf, side="right")), int(np.searchsorted(s, inf, side="left"))


def _sorted_counts(s: np.ndarray, b: BinBounds) -> np.ndarray:
    """Counts on sorted values ``s``: differences of how many finite values lie below each bound."""
    start, end = _finite_span(s)
    below = np.zeros(b.bins + 1, dtype=np.int64)
    below[b.first : b.bins] = np.searchsorted(s, b.bounds[b.first : b.bins], side="left") - start
    below[b.bins] = end - start
    return np.diff(below)


class _Linear(NamedTuple):
    """How :func:`_linear_counts` bins values of one dtype on about equal bins: a value's position
    is ``(x - lo) * scale``, exact to its bin unless it lies within ``tol`` of an integer."""

    lo: np.floating[Any]
    scale: np.floating[Any]
    tol: np.floating[Any]


def _linear(edges: np.ndarray, b: BinBounds, dtype: np.dtype[Any]) -> _Linear | None:
    """The :class:`_Linear` of ``edges`` for values of ``dtype`` (float32 or float64); None where
    the bins are not about equal (see :func:`_linear_counts`)."""
    if b.first != 1:
        return None
    bins = b.bins
    with np.errstate(all="ignore"):
        scale = bins / (edges[-1] - edges[0])
        lo, sc = dtype.type(edges[0]), dtype.type(scale)
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(lo) and np.isfinite(sc) and sc >= np.finfo(dtype).tiny):
        return None
    grid = (b.bounds[1:bins].astype(np.float64) - edges[0]) * scale - np.arange(1, bins)
    u = float(np.finfo(dtype).eps)
    tol = 2 * (float(np.max(np.abs(grid), initial=0.0)) + u * abs(float(edges[0])) * scale + 8 * u * (bins + 1))
    return _Linear(lo, sc, dtype.type(tol)) if tol < 0.25 else None


_RULES: Remembered[tuple[bytes, np.dtype[Any]], tuple[BinBounds, _Linear | None]] = Remembered(4096)
"""Sets of edges remembered: one per histogram tensor."""


def _rule(edges: np.ndarray, dtype: np.dtype[Any]) -> tuple[BinBounds, _Linear | None]:
    """:func:`bin_bounds` and :func:`_linear` of ``edges`` for values of ``dtype``, computed once
    per set of edges (a tensor's bins are fixed, so every later value is counted on the same)."""

    def make() -> tuple[BinBounds, _Linear | None]:
        b = bin_bounds(np.array(edges, dtype=np.float64), dtype_name(dtype))  # a copy: its bounds may be the edges
        b.bounds.flags.writeable = False  # shared by every later count on these edges
        return b, (_linear(edges, b, dtype) if dtype.kind == "f" else None)

    return _RULES.get((edges.tobytes(), dtype), make)


class _Work(threading.local):
    """Each thread's work buffers for :func:`_linear_counts`, of :data:`_BLOCK` values, made once."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[np.dtype[Any], bool, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def get(self, dtype: np.dtype[Any], small: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(position, distance, near, code)`` buffers; codes are ``uint8`` when ``small`` (up to 256 bins)."""
        key = (dtype, small, _BLOCK)
        bufs = self.buffers.get(key)
        if bufs is None:
            bufs = self.buffers[key] = (
                np.empty(_BLOCK, dtype=dtype),
                np.empty(_BLOCK, dtype=dtype),
                np.empty(_BLOCK, dtype=bool),
                np.empty(_BLOCK, dtype=np.uint8 if small else np.intp),
            )
        return bufs


_WORK = _Work()


def _linear_counts(x: np.ndarray, b: BinBounds, linear: _Linear, bincount: Bincount = _np_bincount) -> np.ndarray:
    """Counts of ``x`` (flat, float32 or float64) on about equal bins in O(n), by NumPy's passes
    (``src/_bins.c`` is the same arithmetic, compiled: read this first).

    Each value's position ``w = (x - edges[0]) * scale``, ``scale = bins / (edges[-1] - edges[0])``,
    is computed in ``x``'s dtype (:data:`_BLOCK` values at a time, in each thread's own work
    buffers: 2.5 MB for float32, made once), clipped into ``[0.5, bins - 0.5]`` (values outside the
    edges go to the outer bins), truncated to its bin (a ``uint8`` code up to 256 bins) and counted by ``bincount``.
    That is the bin of the rule unless ``w`` lies within ``tol`` of an integer: ``tol`` bounds
    the rounding of ``w`` (``x - lo`` and the product, about 1.5 ulp of ``w``, and ``lo``'s own
    rounding) plus how far the bounds (:class:`BinBounds`, rounded into ``x``'s dtype) lie from
    the equal grid, twice over.
    Those few values are binned by searching the bounds, exactly. A block with a non-finite
    position (NaN, Inf, or a value too far out for the dtype) is counted on its sorted values.
    :func:`_linear` gives no plan (then sort) when the edges repeat, are too far from equal, or
    are too close together for ``x``'s dtype (``tol >= 1/4``).
    """
    bins = b.bins
    lo, sc, tol = linear
    interior = b.bounds[1:bins]
    counts = np.zeros(bins, dtype=np.int64)
    w, dist, near, index = _WORK.get(x.dtype, bins <= 256)
    with np.errstate(all="ignore"):
        for start in range(0, x.size, _BLOCK):
            xb = x[start : start + _BLOCK]
            n = xb.size
            wb, db, nb, ib = w[:n], dist[:n], near[:n], index[:n]
            np.subtract(xb, lo, out=wb)
            np.multiply(wb, sc, out=wb)
            w_min, w_max = float(wb.min()), float(wb.max())  # NaN if there is one
            if not (np.isfinite(w_min) and np.isfinite(w_max)):  # NaN, Inf, or a position too large for the dtype
                counts += _sorted_counts(np.sort(xb), b)
                continue
            if w_min < 0.5 or w_max > bins - 0.5:  # one pass (np.maximum then np.minimum cost 2-4 times as much)
                np.clip(wb, 0.5, bins - 0.5, out=wb)
            np.subtract(wb, np.rint(wb, out=db), out=db)
            np.less(np.abs(db, out=db), tol, out=nb)
            np.copyto(ib, wb, casting="unsafe")  # truncation: floor, as w > 0
            if nb.any():
                j = np.flatnonzero(nb)
                ib[j] = np.searchsorted(interior, xb[j], side="right")
            counts += bincount(ib, bins)
    return counts


def histogram(
    array: np.ndarray, bins: int | Sequence[float] | np.ndarray = DEFAULT_BINS, bincount: Bincount | None = None
) -> Histogram | None:
    """The histogram of ``array`` with ``bins`` equal bins over its finite range, or with the given edges.

    None when there are no edges to use: ``bins`` is a number and ``array`` has no finite value.
    ``bincount`` as in :func:`histogram_counts`.
    """
    x = _binned_values(array)
    if isinstance(bins, (int, np.integer)):
        span = _finite_range(x)
        if span is None:
            return None
        edges = equal_edges(*span, int(bins))
    else:
        edges = check_edges(bins)
    return Histogram(edges, _counts(x, edges, bincount))
