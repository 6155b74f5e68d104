"""Reductions and health counts: names, validation and the NumPy formulas.

The same functions compute a reduction at write time (for NumPy inputs) and at
read time (from a raw tensor), so the two always agree. Every reduction is
computed in float64 over all elements; on an empty tensor ``min``, ``max``,
``mean``, ``std`` and ``variance`` are NaN, ``sum`` is 0 and ``prod`` is 1.
Complex tensors are reduced by magnitude ``|z|`` (so ``l2`` is their vector norm).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

REDUCTIONS = ("min", "max", "mean", "std", "variance", "sum", "prod")
NORMS = ("l1", "l2")
HEALTH_COUNTS = ("nan_count", "inf_count", "zero_count")
ALL_REDUCTIONS = REDUCTIONS + NORMS + HEALTH_COUNTS


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


def _empty_nan(fn: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], float]:
    def wrapped(a: np.ndarray) -> float:
        return float("nan") if a.size == 0 else fn(a)

    return wrapped


_FORMULAS: dict[str, Callable[[np.ndarray], float]] = {
    "min": _empty_nan(lambda a: float(np.min(a))),
    "max": _empty_nan(lambda a: float(np.max(a))),
    "mean": _empty_nan(lambda a: float(np.mean(a))),
    "std": _empty_nan(lambda a: float(np.std(a))),
    "variance": _empty_nan(lambda a: float(np.var(a))),
    "sum": lambda a: float(np.sum(a)),
    "prod": lambda a: float(np.prod(a)),
    "l1": lambda a: float(np.sum(np.abs(a))),
    "l2": lambda a: float(np.sqrt(np.sum(a * a))),
}


def compute(array: np.ndarray, key: str) -> float:
    """Compute the reduction stored under ``key`` (e.g. ``"abs_mean"``) on ``array``.

    Parameters
    ----------
    array
        Any NumPy array; it is converted to float64 first.
    key
        A reduction name from :data:`ALL_REDUCTIONS`, optionally prefixed ``abs_``.
    """
    name, absolute = split_key(key)
    a = np.asarray(array)
    if name in HEALTH_COUNTS:
        if name == "zero_count":
            return float(np.count_nonzero(a == 0))
        if a.dtype.kind not in "fc":
            return 0.0
        test = np.isnan if name == "nan_count" else np.isinf
        return float(np.count_nonzero(test(a)))
    if name not in _FORMULAS:
        raise ValueError(f"reduction: {key!r} is not a reduction; valid: {', '.join(ALL_REDUCTIONS)}")
    x = _as_float64(a)
    if absolute:
        x = np.abs(x)
    with np.errstate(all="ignore"):
        return _FORMULAS[name](x)


def compute_many(array: np.ndarray, keys: list[str]) -> dict[str, float]:
    """Compute several reductions on one array (it is converted to float64 once)."""
    a = np.asarray(array)
    x = _as_float64(a) if a.dtype.kind in "biufc" and keys else a
    return {k: compute(x if split_key(k)[0] not in HEALTH_COUNTS else a, k) for k in keys}
