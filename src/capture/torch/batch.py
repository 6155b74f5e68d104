"""Tensors of a step taken on their device and delivered together: one transfer and one wait a step.

On a GPU every operation the training thread asks for is a kernel launch (about
10-25 µs of its time), and every value brought to the host waits for the work
queued before it. Prepared one by one, a tensor of weights or gradients costs
about twelve launches and one wait (bench/profiles/gpu.md). Taken into a batch,
it costs one launch, a copy into a flat buffer of its device and dtype (which is
also its snapshot: later changes to the tensor do not reach it); when the step
ends the batch reduces every tensor in it with a few segmented reductions,
copies the buffer and the reductions to the host together and waits once.

Taken: floating tensors (bfloat16 and the float8 types widened to float32, as
:class:`~tensortap.capture.torch.ops.TorchOps` stores them) of the device types
in ``TorchOps.batched`` (CUDA), saved raw or with reductions read from the
quantities :data:`BATCHED` (min, max, mean, sum, l1, l2 and their ``abs_``
forms, the NaN and infinity counts). Everything else, and what does not fit in
:data:`BATCH_BYTES` a device and dtype, is prepared when it is offered.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import Prepared
from .ops import _WIDEN, TorchOps, _dtype_name, _plain, quantity

BATCH_BYTES = 256 << 20
"""The most one device and dtype packs a step: its flat buffer there (and its pinned twin on the host
where raw values are saved), grown to what a step takes. A step that saves more prepares the rest
one by one."""
_FIRST_BYTES = 1 << 20  # a buffer's first size; it grows to what a step needed, up to BATCH_BYTES

# the quantities (:func:`~tensortap.capture.torch.ops.quantity`) a batch computes: segmented sums (of the
# values, of their magnitudes, of their squares: the l2 norm's square) and extremes; the counts are 0
# for a tensor whose sum of magnitudes is finite
BATCHED = frozenset({"sum", "l1", "l2", "min", "max", "abs_min", "abs_max", "nan_count", "inf_count"})


@functools.cache
def _batchable(keys: tuple[str, ...]) -> bool:
    """Whether a batch computes every reduction of ``keys``."""
    return all(quantity(k)[0] in BATCHED for k in keys)


@dataclass
class _Item:
    ticket: int  # its place in the order taken
    offset: int  # in the flat buffer
    size: int  # its values
    shape: tuple[int, ...]
    keys: tuple[str, ...]
    raw: bool
    orig: str | None


@dataclass
class _Packed:
    """The values of one device and dtype taken this step, packed into one flat buffer there."""

    flat: torch.Tensor
    items: list[_Item] = field(default_factory=list)
    used: int = 0  # elements of ``flat`` holding values
    wanted: int = 0  # elements the step would have packed with room for all
    most: int = BATCH_BYTES  # elements ``flat`` may grow to (less once memory for more was refused)
    host: torch.Tensor | None = None  # the pinned twin of ``flat`` (CUDA)
    lengths: tuple[tuple[int, ...], torch.Tensor] | None = None  # the last segment lengths, on the device
    streams: set[torch.cuda.Stream] = field(default_factory=set)  # the CUDA streams values were taken on


class DeviceBatch:
    """A :class:`~tensortap.capture.core.Batch` of torch tensors of the device types ``devices``."""

    def __init__(self, devices: frozenset[str]) -> None:
        self.devices = devices
        self._packed: dict[tuple[torch.device, torch.dtype], _Packed] = {}
        self._count = 0

    def take(self, value: object, keys: Sequence[str], raw: bool) -> bool:
        if not isinstance(value, torch.Tensor) or value.device.type not in self.devices:
            return False
        if not (keys or raw) or not _batchable(tuple(keys)) or not value.is_floating_point():
            return False
        t = _plain(value)
        n = t.numel()
        if n == 0:
            return False
        dtype = _WIDEN.get(t.dtype, t.dtype)
        p = self._room(t.device, dtype, n)
        if p is None:
            return False
        p.flat[p.used : p.used + n].view(t.shape).copy_(t)  # the snapshot: one kernel
        if t.is_cuda:
            p.streams.add(torch.cuda.current_stream(t.device))
        orig = _dtype_name(t.dtype) if t.dtype in _WIDEN else None
        p.items.append(_Item(self._count, p.used, n, tuple(t.shape), tuple(keys), raw, orig))
        p.used += n
        self._count += 1
        return True

    def _room(self, device: torch.device, dtype: torch.dtype, n: int) -> _Packed | None:
        """The buffer of ``device`` and ``dtype`` if it has room for ``n`` more elements, else None.

        Made at the first value; between steps (while empty) grown to what the last steps wanted.
        """
        p = self._packed.get((device, dtype))
        most = BATCH_BYTES // dtype.itemsize if p is None else p.most
        if p is None or (not p.items and p.flat.numel() < min(most, p.wanted)):
            wanted = max(n, p.wanted if p is not None else 0)
            size = min(most, max(_FIRST_BYTES // dtype.itemsize, 1 << (wanted - 1).bit_length()))
            try:
                flat = _buffer(size, dtype, device)
            except RuntimeError:  # no memory for it there (OutOfMemoryError): keep what there is, grow no more
                if p is None:
                    p = self._packed[(device, dtype)] = _Packed(torch.empty(0, dtype=dtype, device=device))
                p.most = p.flat.numel()
                return None
            p = self._packed[(device, dtype)] = _Packed(flat, wanted=wanted, most=most)
        p.wanted = max(p.wanted, p.used + n)
        return p if p.used + n <= p.flat.numel() else None

    def deliver(self) -> list[Prepared | Exception]:
        out: list[Prepared | Exception] = [ValueError("not delivered")] * self._count
        for p in self._packed.values():
            if not p.items:
                continue
            try:
                for item, prepared in zip(p.items, self._prepare(p), strict=True):
                    out[item.ticket] = prepared
            except Exception as exc:  # these tensors are skipped (with a warning), not the run
                for item in p.items:
                    out[item.ticket] = exc
        self.clear()
        return out

    def clear(self) -> None:
        for p in self._packed.values():
            p.items, p.used = [], 0
            p.streams.clear()
        self._count = 0

    def _prepare(self, p: _Packed) -> list[Prepared]:
        """Reduce every value of ``p`` and bring the values to the host; one wait."""
        used = p.flat[: p.used]
        if used.is_cuda:
            current = torch.cuda.current_stream(used.device)
            for stream in p.streams - {current}:
                current.wait_stream(stream)  # on the device: the host does not wait
        host = self._to_host(p, used) if any(item.raw for item in p.items) else None
        quantities: dict[str, list[float]] = {}
        if any(item.keys for item in p.items):
            names, rows = self._reduce(p, used)
            quantities = dict(zip(names, rows.cpu().tolist(), strict=True))  # the wait
        elif used.is_cuda:
            torch.cuda.current_stream(used.device).synchronize()  # for the host copy alone
        prepared: list[Prepared] = []
        for j, item in enumerate(p.items):
            part = slice(item.offset, item.offset + item.size)
            raw = host[part].numpy().reshape(item.shape) if host is not None else None
            values: dict[str, float] = {}
            if item.keys and math.isfinite(quantities["l1"][j]):
                values = {k: _value(k, quantities, j, item.size) for k in item.keys}
            elif item.keys:  # a NaN or an infinity in it: the formulas of one tensor, on its snapshot
                values = TorchOps._reduce(used[part].view(item.shape), item.keys)
            prepared.append((raw if item.raw else None, values, item.orig))
        return prepared

    @staticmethod
    def _to_host(p: _Packed, used: torch.Tensor) -> torch.Tensor:
        """``used`` copied to the host: into the pinned twin without waiting on CUDA (the wait comes after)."""
        if not used.is_cuda:
            return used
        if p.host is None or p.host.numel() < p.flat.numel():
            try:
                p.host = torch.empty(p.flat.numel(), dtype=p.flat.dtype, pin_memory=True)
            except RuntimeError:  # no pinned memory to be had: a copy that waits
                return used.cpu()
        return p.host[: used.numel()].copy_(used, non_blocking=True)

    @staticmethod
    def _reduce(p: _Packed, used: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The segmented quantities the items' keys need, one row each (the magnitudes' sum always: it is
        finite exactly when the segment holds no NaN nor infinity), in float64.

        Reduced a chunk of whole items at a time (:data:`CHUNK_ELEMENTS`): its float64 copy is the only
        memory it takes, its magnitudes and squares taken in place.
        """
        sizes = tuple(item.size for item in p.items)
        if p.lengths is None or p.lengths[0] != sizes:
            p.lengths = (sizes, torch.tensor(sizes, dtype=torch.int64).to(used.device))
        lengths = p.lengths[1]
        wanted = {quantity(k)[0] for item in p.items for k in item.keys} - {"nan_count", "inf_count"} | {"l1"}
        names = sorted(wanted)
        blocks = []
        first = 0
        while first < len(p.items):
            last, end = first + 1, p.items[first].offset + sizes[first]
            while last < len(p.items) and end + sizes[last] - p.items[first].offset <= CHUNK_ELEMENTS:
                end += sizes[last]
                last += 1
            x = used[p.items[first].offset : end].to(torch.float64, copy=True)
            got: dict[str, torch.Tensor] = {}
            for step, pass_names in _PASSES:
                if not pass_names & wanted:
                    continue  # no later pass needs its change: the squares of the magnitudes are those of the values
                if step is not None:
                    step(x)
                for q in pass_names & wanted:
                    how = "sum" if q in ("sum", "l1", "l2") else q.removeprefix("abs_")
                    got[q] = torch.segment_reduce(x, how, lengths=lengths[first:last], unsafe=True)
            blocks.append(torch.stack([got[q] for q in names]))
            first = last
        return names, torch.cat(blocks, dim=1)


CHUNK_ELEMENTS = 1 << 23
"""Values a batch reduces at once (64 MiB as float64); an item larger than that is reduced alone."""

# the passes over a chunk's float64 copy: the quantities of the values, then in place of their
# magnitudes, then in place of their squares
_PASSES: tuple[tuple[Callable[[torch.Tensor], object] | None, frozenset[str]], ...] = (
    (None, frozenset({"sum", "min", "max"})),
    (torch.Tensor.abs_, frozenset({"l1", "abs_min", "abs_max"})),
    (torch.Tensor.square_, frozenset({"l2"})),
)


def _buffer(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new flat buffer (the tests refuse it memory here)."""
    return torch.empty(size, dtype=dtype, device=device)


def _value(key: str, quantities: dict[str, list[float]], j: int, n: int) -> float:
    """Reduction ``key`` of segment ``j`` (``n`` values, all finite) from the segmented quantities."""
    q, mean = quantity(key)
    if q in ("nan_count", "inf_count"):
        return 0.0
    v = quantities[q][j]
    if q == "l2":  # the sum of squares
        v = float(np.sqrt(v))
    return v / n if mean else float(v)
