"""TorchOps: reductions and histograms on the tensor's device, one host transfer, raw values as host arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ... import reductions as red
from .. import core

# float types NumPy lacks: stored as float32, the original dtype recorded
_WIDEN: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.float32, torch.complex32: torch.complex64}
for _name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _WIDEN[getattr(torch, _name)] = torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain(value: torch.Tensor) -> torch.Tensor:
    """``value`` detached, dense, its lazy conjugate or negation applied (``x.conj()`` of a complex
    tensor, ``torch._neg_view``): ``numpy()`` refuses those bits; resolving costs nothing without them.

    Raises
    ------
    TypeError
        ``value`` is a nested tensor (``torch.nested``): its parts have different shapes, so it has
        no one array to save (torch's own error said "Internal error ... please file an issue").
    """
    if value.is_nested:
        raise TypeError(
            "a nested tensor (torch.nested, sequences of different lengths; e.g. inside nn.TransformerEncoder "
            "in eval() under no_grad with a padding mask, its fast path) has no single shape; "
            "torch.backends.mha.set_fastpath_enabled(False) keeps the layers on plain tensors"
        )
    t = value.detach() if value.requires_grad else value
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_conj():  # each resolve_* or detach() is a dispatcher call, which gives the GIL up and waits
        t = t.resolve_conj()  # to get it back when another thread (the writer) runs Python meanwhile
    return t.resolve_neg() if t.is_neg() else t


_BOUNDS: red.Remembered[tuple[bytes, str, torch.device], tuple[torch.Tensor, red.BinBounds]] = red.Remembered(4096)
"""Sets of edges remembered: one per tensor binned on a device."""


def _device_bounds(edges: np.ndarray, work: str, device: torch.device) -> tuple[torch.Tensor, red.BinBounds]:
    """The :class:`~tensortap.reductions.BinBounds` of ``edges`` for values of ``work``, and its bounds
    on ``device``: made once per tensor's bins (fixed at its first value), so that later counts
    neither recompute them nor copy them to the device (a copy from pageable memory, which waits
    for the work queued on the device)."""

    def make() -> tuple[torch.Tensor, red.BinBounds]:
        b = red.bin_bounds(edges, work)
        return torch.from_numpy(b.bounds).to(device), b

    return _BOUNDS.get((np.asarray(edges, dtype=np.float64).tobytes(), work, device), make)


class TorchOps(core.TensorOps):
    """Reductions and histograms on the tensor's device (one host transfer); raw values as host arrays."""

    device_histogram = True
    #: Device types whose tensors are binned with NumPy on a view of their memory (no copy):
    #: on a CPU, :func:`tensortap.reductions.histogram_counts` is several times faster than
    #: ``torch.bucketize`` (bench/profiles/histogram.md).
    host_binned: ClassVar[frozenset[str]] = frozenset({"cpu"})
    #: Device types without float64 (int32, int64 and float64 tensors are binned on the host there)
    no_float64: ClassVar[frozenset[str]] = frozenset({"mps"})
    #: Device types whose tensors a step takes into a :class:`~tensortap.capture.torch.batch.DeviceBatch`
    #: (a snapshot there; reduced and copied to the host together at the step's end)
    batched: ClassVar[frozenset[str]] = frozenset({"cuda"})

    def batch(self) -> core.Batch | None:
        """A :class:`~tensortap.capture.torch.batch.DeviceBatch` of the device types :attr:`batched` this
        machine has (None where it has none of them: its tensors are prepared when offered)."""
        from .batch import DeviceBatch  # it builds on this module

        devices = self.batched if torch.cuda.is_available() else self.batched - {"cuda"}
        return DeviceBatch(devices) if devices else None

    def histogram(
        self, value: Any, edges: np.ndarray | None, bins: int, defer: bool = False
    ) -> red.Histogram | red.PendingHistogram | None:
        """Bin on the tensor's device with ``torch.bucketize`` and ``torch.bincount``; only the counts
        (and, the first time, the finite range) come to the host. The rule is
        :class:`tensortap.reductions.BinBounds`, so the counts equal the NumPy ones."""
        if not isinstance(value, torch.Tensor):
            return super().histogram(value, edges, bins, defer)
        t = _plain(value)
        if t.dtype in _WIDEN:
            t = t.to(_WIDEN[t.dtype])
        device = t.device.type
        work = red.bin_dtype(_dtype_name(t.dtype))
        if (
            device in self.host_binned
            or t.is_complex()
            or t.numel() == 0
            or (work == "float64" and device in self.no_float64)
        ):
            return super().histogram(t.numpy() if t.is_cpu else t.cpu().numpy(), edges, bins, defer)
        x = t.reshape(-1).to(getattr(torch, work))
        finite = torch.isfinite(x)
        if edges is None:
            inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
            lo, hi = torch.stack([torch.where(finite, x, inf).min(), torch.where(finite, x, -inf).max()]).tolist()
            if lo > hi:  # no finite value
                return None
            edges = red.equal_edges(lo, hi, bins)
        bounds, b = _device_bounds(edges, work, x.device)
        index = torch.bucketize(x, bounds, right=True, out_int32=True)
        index = torch.where(finite, index.clamp_(b.first, b.bins) - 1, b.bins)  # non-finite: an extra bin, dropped
        counts = torch.bincount(index, minlength=b.bins + 1)[: b.bins]
        return red.Histogram(edges, counts.cpu().numpy().astype(np.int64))

    def bincount(self, codes: np.ndarray, minlength: int) -> np.ndarray:
        """``torch.bincount`` on a view of ``codes``: faster than NumPy's on small integer codes
        (``uint8``, which NumPy converts to ``intp`` first), and it releases the GIL."""
        return torch.bincount(torch.from_numpy(codes), minlength=minlength).numpy()

    def prepare(
        self, value: Any, keys: Sequence[str], raw: bool
    ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
        if not isinstance(value, torch.Tensor):
            return super().prepare(value, keys, raw)
        orig = _dtype_name(value.dtype) if value.dtype in _WIDEN else None
        if not keys and not raw:  # a tensor saved as a histogram alone: nothing more to take here
            return None, {}, orig
        if not keys and orig is None and value.is_cpu and value.layout == torch.strided and not value.is_nested:
            # a view (detached, conjugation and negation resolved by a copy) in one call: 0.9 µs against 3.2
            return value.numpy(force=True), {}, None
        t = _plain(value)
        if orig is not None:
            t = t.to(_WIDEN[t.dtype])
        on_host = t.is_complex() or t.numel() == 0  # reduced with NumPy from the host copy
        host = self._to_host(t) if raw or on_host else None
        values = self._reduce(t, keys) if keys and not on_host else {}
        if host is not None and t.is_cuda and (on_host or not keys):
            torch.cuda.current_stream(t.device).synchronize()  # else the reductions' transfer waited for it
        array = host.numpy() if host is not None else None
        if on_host and keys and array is not None:
            values = red.compute_many(array, list(keys))
        return (array if raw else None), values, orig

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        """``t`` on the host: a view of a CPU tensor (the core copies it before ``offer`` returns),
        a pinned buffer filled without blocking from CUDA."""
        if t.is_cpu:
            return t.contiguous()
        if t.is_cuda:
            try:
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            except RuntimeError:
                return t.cpu()
            # completed by the blocking transfer of the reductions, or the stream synchronize in prepare
            return out.copy_(t, non_blocking=True)
        return t.cpu()

    @staticmethod
    def _reduce(t: torch.Tensor, keys: Sequence[str]) -> dict[str, float]:
        """Compute ``keys`` with the formulas of :mod:`tensortap.reductions`, stacked into one transfer.

        Few operations per tensor: each is a kernel launch on a GPU, about 10 µs of the training
        thread's time there (bench/profiles/gpu.md). A floating tensor is summed and normed in the
        wide type by the reduction itself (no widened copy), its extremes taken in its own type
        (exact); a sum serves the mean too, divided on the host as NumPy divides it.
        """
        wide = torch.float32 if t.device.type == "mps" else torch.float64
        x = t if t.is_floating_point() else t.to(wide)  # integers widened once: the abs of the most negative
        n = t.numel()
        taken: dict[str, int] = {}  # quantity -> its index in ``parts``
        parts: list[torch.Tensor] = []
        plan: list[tuple[str, int, int]] = []  # (key, index of its quantity, divisor)
        for key in keys:
            q, mean = quantity(key)
            if q in ("nan_count", "inf_count") and not t.is_floating_point():
                plan.append((key, -1, 1))  # no NaN nor infinity in an integer tensor
                continue
            if q not in taken:
                taken[q] = len(parts)
                parts.append(_REDUCTION_OPS[q](t, x, wide))
            plan.append((key, taken[q], n if mean else 1))
        got = torch.stack(parts).cpu().tolist() if parts else []
        return {key: (float(got[i]) / d if i >= 0 else 0.0) for key, i, d in plan}


def quantity(key: str) -> tuple[str, bool]:
    """The quantity reduction ``key`` is read from, and whether it is that quantity divided by the count.

    Quantities: ``sum``; ``l1`` (the sum of magnitudes: ``l1``, ``abs_sum``, ``abs_mean``); ``l2``
    (``abs_l2`` too); ``min``, ``max``, ``std``, ``variance``, ``prod`` and their ``abs_`` forms; the
    health counts. ``mean`` is ``sum`` divided by the count, as NumPy's formula is.
    """
    name, absolute = red.split_key(key)
    if name in ("sum", "mean", "l1"):
        return ("l1" if absolute or name == "l1" else "sum"), name == "mean"
    if name == "l2" or name in red.HEALTH_COUNTS:
        return name, False
    if name in ("min", "max", "std", "variance", "prod"):
        return (f"abs_{name}" if absolute else name), False
    raise ValueError(f"reduction: {key!r} is not a reduction; valid: {', '.join(red.ALL_REDUCTIONS)}")


def _widened(x: torch.Tensor, wide: torch.dtype, absolute: bool) -> torch.Tensor:
    w = x.to(wide)
    return w.abs() if absolute else w


# How each quantity (:func:`quantity`) is computed from (the tensor, its floating form ``x``, the wide
# dtype): one or two kernels each; std, variance and prod on a widened copy, as NumPy's are in float64.
_REDUCTION_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]] = {
    "nan_count": lambda t, x, w: torch.isnan(t).sum(),
    "inf_count": lambda t, x, w: torch.isinf(t).sum(),
    "zero_count": lambda t, x, w: (t == 0).sum(),
    "sum": lambda t, x, w: x.sum(dtype=w),
    "l1": lambda t, x, w: torch.linalg.vector_norm(x, 1, dtype=w),
    "l2": lambda t, x, w: torch.linalg.vector_norm(x, 2, dtype=w),
    "min": lambda t, x, w: x.min(),
    "max": lambda t, x, w: x.max(),
    "abs_min": lambda t, x, w: x.abs().min(),
    "abs_max": lambda t, x, w: x.abs().max(),
    "std": lambda t, x, w: _widened(x, w, False).std(correction=0),
    "abs_std": lambda t, x, w: _widened(x, w, True).std(correction=0),
    "variance": lambda t, x, w: _widened(x, w, False).var(correction=0),
    "abs_variance": lambda t, x, w: _widened(x, w, True).var(correction=0),
    "prod": lambda t, x, w: _widened(x, w, False).prod(),
    "abs_prod": lambda t, x, w: _widened(x, w, True).prod(),
}
