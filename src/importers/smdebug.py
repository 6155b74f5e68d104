"""Turn a trial written by smdebug (SageMaker Debugger) into a tensortap trial.

smdebug writes one TFRecord file of TensorFlow ``Event`` protobufs per step and
worker (``events/<step>/<step>_<worker>.tfevents``), an index file per step and
worker (``index/<n>/<step>_<worker>.json``: the step's mode and mode step, and
the shapes saved with ``save_shape``) and the collections each worker defined
(``collections/``). This module reads them without smdebug, TensorFlow or
protobuf: the TFRecord framing and the few protobuf messages involved are
decoded here, every length checked against the bytes that are really there (a
trial may come from a stranger: nothing is unpickled, no path is taken from a
file's content, no symbolic link below the trial's folder is followed, nothing
but a regular file is opened, a shape filled with one repeated value and
packed integers that decode to more bytes than they take are bounded by
:func:`~tensortap.backends.shard.max_read_bytes`, and only numeric tensors
are kept). The tensors are written with
:class:`tensortap.capture.Writer`.

Names and collections (see ``docs/migrating-from-smdebug.md``):

================================ ======================================= ===============
smdebug                          tensortap                               collection
================================ ======================================= ===============
``gradient/<param>``             ``gradients/<param>``                   ``gradients``
a tensor of ``losses``           ``losses/<name>``                       ``losses``
``scalar/<name>`` (save_scalar)  ``metrics/<name>``                      ``metrics``
``smdebug/reductions/<r>/<x>``   reduction ``<r>`` of the tensor of x    as x
anything else                    unchanged (``Sequential_0.weight``)     smdebug's
================================ ======================================= ===============

smdebug's own collections keep their names (``all`` and ``default`` are
dropped: they are not collections of tensors); a tensor is in those whose
``tensor_names`` list it or whose ``include_regex`` matches its smdebug name, as
smdebug's trial reads them; a tensor in none of them is in ``custom``. Modes and
mode steps are the ones smdebug recorded.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import math
import os
import re
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ..backends import layout
from ..backends.shard import MAX_READ_ENV, max_read_bytes
from ..backends.storage import NotInTrial, open_regular
from ..capture import TensorOps, Writer
from ..config import Collection, ReductionConfig
from ..crc32c import masked_crc32c
from ..exceptions import TensortapError, TrialNotFound
from ..modes import Mode
from ..trial.export import new_folders_removed_on_error
from ..trial.index import IMPORT_FAILED
from ..trial.trial import SEARCH_DEPTH, SEARCH_FOLDERS

logger = logging.getLogger("tensortap")

__all__ = ["ImportSummary", "SmdebugFormatError", "import_smdebug"]

MAX_FILE_BYTES = 1 << 31  # one event file is read whole; larger ones are refused
MAX_NAME_CHARS = 4096
_WORKER = re.compile(r"^worker_(0|[1-9]\d{0,8})$")  # worker_00 is another worker than worker_0
_REDUCTION_PREFIX = "smdebug/reductions/"
_META_COLLECTIONS = frozenset({"all", "default"})
# smdebug's reduction names (tags use "l2", configurations "l2_norm") to tensortap's keys
_REDUCTIONS = frozenset({"min", "max", "mean", "std", "variance", "sum", "prod", "l1", "l2"})
# TensorFlow DataType enum -> NumPy dtype (numeric types only)
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    8: np.dtype("<c8"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    17: np.dtype("<u2"),
    18: np.dtype("<c16"),
    19: np.dtype("<f2"),
    22: np.dtype("<u4"),
    23: np.dtype("<u8"),
}
# TensorProto repeated value fields -> (wire layout of one element, dtype)
_VALUE_FIELDS: dict[int, str] = {
    5: "<f4",
    6: "<f8",
    7: "varint",
    10: "varint",
    11: "varint",
    16: "varint",
    17: "varint",
}


class SmdebugFormatError(TensortapError, ValueError):
    """An smdebug file is not what smdebug writes (truncated, corrupted or crafted)."""


# ----------------------------------------------------------------- TFRecord
# smdebug writes this CRC instead of the payload's unless asked to checksum
_UNCHECKED_PAYLOAD_CRC = masked_crc32c(b"0x12345678")


def read_records(data: bytes, where: str) -> Iterator[memoryview]:
    """The records of a TFRecord file: ``uint64 length, uint32 masked crc(length), payload, uint32 crc``."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if len(view) - pos < 12:
            raise SmdebugFormatError(f"{where}: truncated record header at byte {pos}")
        header = view[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", view[pos + 8 : pos + 12])
        if header_crc != masked_crc32c(header):
            raise SmdebugFormatError(f"{where}: corrupted record length at byte {pos}")
        start = pos + 12
        if length > len(view) - start - 4:
            raise SmdebugFormatError(f"{where}: record at byte {pos} claims {length} bytes; the file is shorter")
        payload = view[start : start + length]
        (payload_crc,) = struct.unpack("<I", view[start + length : start + length + 4])
        if payload_crc != _UNCHECKED_PAYLOAD_CRC and payload_crc != masked_crc32c(payload):
            raise SmdebugFormatError(f"{where}: corrupted record at byte {pos}")
        yield payload
        pos = start + length + 4


# ----------------------------------------------------------------- protobuf
def _varint(buf: memoryview, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise SmdebugFormatError(f"{where}: malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, where: str) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of a protobuf message: an int, or a memoryview for bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise SmdebugFormatError(f"{where}: truncated field {number}")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, where)
            if length > len(buf) - pos:
                raise SmdebugFormatError(f"{where}: field {number} claims {length} bytes; fewer are left")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise SmdebugFormatError(f"{where}: truncated field {number}")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise SmdebugFormatError(f"{where}: unsupported protobuf wire type {wire}")
        yield number, wire, value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, memoryview):
        raise SmdebugFormatError(f"{where}: expected a string")
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise SmdebugFormatError(f"{where}: a name is not valid UTF-8") from None
    if len(text) > MAX_NAME_CHARS:
        raise SmdebugFormatError(f"{where}: a name longer than {MAX_NAME_CHARS} characters")
    return text


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _Budget:
    """What the values of one event file may allocate beyond the bytes that store them.

    A TensorProto may hold one value for a shape of any size ("TensorFlow repeats the last value"), and
    packed integers of one byte each that decode to 8 (:func:`_varints`): a few bytes of a stranger's file
    must not become gigabytes. All of one file's such tensors together get
    :func:`~tensortap.backends.shard.max_read_bytes` (``$TENSORTAP_MAX_READ_BYTES``), what tensortap lets
    one read allocate.
    """

    def __init__(self) -> None:
        self.limit = self.left = max_read_bytes()

    def take(self, nbytes: int, where: str, what: str) -> None:
        """Count ``nbytes`` for the tensor ``where``, which ``what`` (``"declares shape ..."``);
        :class:`SmdebugFormatError` if more than is left."""
        if nbytes > self.left:
            raise SmdebugFormatError(
                f"{where} {what} ({nbytes} bytes), more than reading one event file may still allocate "
                f"({self.left} of {self.limit} bytes; set the environment variable {MAX_READ_ENV} to raise it)"
            )
        self.left -= nbytes


_VARINT_CHUNK = 1 << 16  # bytes of packed varints decoded at a time: bounds the decoding's own arrays


def _varints(buf: memoryview, where: str, budget: _Budget) -> np.ndarray:
    """Packed varints as uint64 (their low 64 bits, as protobuf reads them), decoded with NumPy.

    The array (8 bytes for each varint, which may be one byte) is counted in ``budget`` before it is made.
    """
    data = np.frombuffer(buf, dtype=np.uint8)
    if len(data) and data[-1] & 0x80:
        raise SmdebugFormatError(f"{where}: malformed varint")
    count = int(np.count_nonzero(data < 0x80))
    budget.take(8 * count, where, f"holds {count} packed integers")
    out = np.empty(count, dtype=np.uint64)
    pos = done = 0
    while pos < len(data):
        chunk = data[pos : pos + _VARINT_CHUNK]
        ends = np.flatnonzero(chunk < 0x80)  # the last byte of each varint
        lengths = np.diff(ends, prepend=-1)
        if not len(ends) or lengths.max() > 10:
            raise SmdebugFormatError(f"{where}: malformed varint")
        values = (chunk[ends] & 0x7F).astype(np.uint64)
        for k in range(1, int(lengths.max())):  # Horner's rule, from each varint's last byte to its first
            longer = np.flatnonzero(lengths > k)
            values[longer] = (values[longer] << np.uint64(7)) | (chunk[ends[longer] - k] & 0x7F)
        out[done : done + len(values)] = values
        done += len(values)
        pos += int(ends[-1]) + 1
    return out


def _unpacked(values: list[Any]) -> np.ndarray:
    """The values of repeated fields that were not packed, as one array: uint64 for varints, float64 where
    one is a float."""
    return np.array(values, dtype=np.float64 if any(isinstance(v, float) for v in values) else np.uint64)


def _as_dtype(values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """The values of a TensorProto field as ``dtype``: a varint's (uint64) as protobuf reads an integer of
    that type (two's complement for a signed one); ValueError or FloatingPointError for a value that does
    not fit."""
    if values.dtype == np.uint64 and dtype.kind in "iu":
        if dtype.kind == "i":
            values = values.view(np.int64)
        info = np.iinfo(dtype)
        if len(values) and (values.min() < info.min or values.max() > info.max):
            raise ValueError(f"a value beyond the range of {dtype}")
    with np.errstate(invalid="raise"):  # NaN or a float beyond the range of an integer type
        return values.astype(dtype)


@dataclass
class _Value:
    """One tensor of an event: its tag, mode, mode step and array (None when not numeric)."""

    tag: str
    mode: Mode
    mode_step: int | None
    array: np.ndarray | None


def _tensor(buf: memoryview, where: str, budget: _Budget) -> np.ndarray | None:
    """A TensorProto as an array; None for strings and other non-numeric types.

    Parameters
    ----------
    buf
        The TensorProto's bytes.
    where
        The file and tensor, for errors.
    budget
        What a value repeated to fill the declared shape, and packed varints, may allocate (:class:`_Budget`).

    Raises
    ------
    SmdebugFormatError
        The values do not fill the declared shape (other than one value repeated), do not fit the dtype,
        or the shape is one NumPy cannot make or more than ``budget`` allows.
    """
    dtype_code = 0
    dims: list[int] = []
    content: memoryview | None = None
    parts: list[np.ndarray] = []  # the repeated values, packed fields as arrays
    singles: list[Any] = []  # values of fields not packed, until the next packed one
    for number, wire, value in _fields(buf, where):
        if number == 1 and wire == 0:
            dtype_code = value
        elif number == 2 and wire == 2:
            for dnum, dwire, dim in _fields(value, where):
                if dnum == 2 and dwire == 2:
                    size = next((_signed64(v) for n, w, v in _fields(dim, where) if n == 1 and w == 0), 0)
                    if size < 0:
                        raise SmdebugFormatError(f"{where}: negative dimension {size}")
                    dims.append(size)
        elif number == 4 and wire == 2:
            content = value
        elif number in _VALUE_FIELDS:
            layout = _VALUE_FIELDS[number]
            if wire == 2:  # packed
                if layout != "varint" and len(value) % np.dtype(layout).itemsize:
                    raise SmdebugFormatError(f"{where}: packed values of a broken length")
                if singles:
                    parts.append(_unpacked(singles))
                    singles = []
                parts.append(_varints(value, where, budget) if layout == "varint" else np.frombuffer(value, layout))
            elif layout == "varint" and wire == 0:
                singles.append(value & 0xFFFFFFFFFFFFFFFF)  # protobuf keeps a varint's low 64 bits
            elif layout != "varint" and wire != 0 and len(value) == np.dtype(layout).itemsize:
                singles.append(float(np.frombuffer(value, dtype=layout)[0]))
            else:
                raise SmdebugFormatError(f"{where}: field {number} of wire type {wire}")
    if singles:
        parts.append(_unpacked(singles))
    dtype = _DTYPES.get(dtype_code)
    if dtype is None:
        return None
    shape = tuple(dims)
    count = 1
    for d in dims:
        count *= d
    try:
        if content is not None and len(content):
            if len(content) != count * dtype.itemsize:
                raise SmdebugFormatError(f"{where}: {len(content)} bytes for a {dtype} tensor of shape {shape}")
            return np.frombuffer(content, dtype=dtype).reshape(shape).copy()
        converted = [_as_dtype(part, dtype) for part in parts]
        values = converted[0] if len(converted) == 1 else np.concatenate([np.zeros(0, dtype), *converted])
        if values.size == count:
            return values.reshape(shape)
        if values.size == 1:  # TensorFlow repeats the last value
            budget.take(count * dtype.itemsize, where, f"declares shape {shape} filled with one value")
            return np.full(shape, values[0], dtype=dtype)
    except SmdebugFormatError:
        raise
    # more than 64 dimensions, too large even if empty, 2**40 as int32, NaN as int32
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise SmdebugFormatError(f"{where}: not a {dtype} tensor of shape {shape} ({exc})") from None
    raise SmdebugFormatError(f"{where}: {values.size} values for a tensor of shape {shape}")


def _summary_values(event: memoryview, where: str, budget: _Budget) -> Iterator[_Value]:
    """The tensors of an ``Event``'s ``Summary`` (a value repeated to fill a shape counted in ``budget``)
    with the mode smdebug recorded in their metadata."""
    step = 0
    summaries: list[memoryview] = []
    for number, wire, value in _fields(event, where):
        if number == 2 and wire == 0:
            step = _signed64(value)
        elif number == 5 and wire == 2:
            summaries.append(value)
    for summary in summaries:
        for number, wire, value in _fields(summary, where):
            if number != 1 or wire != 2:
                continue
            tag, tensor, mode, mode_step = "", None, Mode.GLOBAL, None
            for vnum, vwire, field_value in _fields(value, where):
                if vnum == 1 and vwire == 2:
                    tag = _text(field_value, where)
                elif vnum == 8 and vwire == 2:
                    tensor = field_value
                elif vnum == 9 and vwire == 2:
                    mode, mode_step = _mode(field_value, where, mode, mode_step)
            if tensor is not None and not tag:
                raise SmdebugFormatError(f"{where}: a tensor without a name")
            if tensor is not None:
                array = _tensor(tensor, f"{where}: tensor {tag!r}", budget)
                yield _Value(tag, mode, mode_step if mode_step is not None else step, array)


def _mode(metadata: memoryview, where: str, mode: Mode, mode_step: int | None) -> tuple[Mode, int | None]:
    for number, wire, plugin in _fields(metadata, where):
        if number != 1 or wire != 2:
            continue
        name, content = "", ""
        for pnum, pwire, value in _fields(plugin, where):
            if pnum == 1 and pwire == 2:
                name = _text(value, where)
            elif pnum == 2 and pwire == 2:
                content = _text(value, where)
        if name == "mode":
            number = _integer(content, name, where)
            try:
                mode = Mode(number)
            except ValueError:
                raise SmdebugFormatError(f"{where}: unknown mode {number}") from None
        elif name == "mode_step":
            # -1: smdebug's mode step before a mode's first step, which it gives a value saved for the step
            # before (save_scalar); the step's index file says its mode (_import_step)
            mode_step = _integer(content, name, where, low=-1)
    return mode, mode_step


def _integer(text: str, what: str, where: str, low: int = 0) -> int:
    """``text``, a decimal integer from ``low`` to 2**63 - 1 (a step of a tensortap trial is an int64).

    Raises
    ------
    SmdebugFormatError
        ``text`` is not a decimal integer (``str.isdigit`` takes ``"²"``, which ``int`` refuses), or is out
        of that range.
    """
    if not re.fullmatch(r"-?[0-9]+", text):
        raise SmdebugFormatError(f"{where}: {what} {text!r} is not a number")
    value = int(text)
    if not low <= value < 1 << 63:
        raise SmdebugFormatError(f"{where}: {what} {value} out of range")
    return value


def _read_index(fs: Any, path: str) -> tuple[Mode, int, list[str]]:
    """The mode and mode step of a step, and the tensors saved as their shape, from its smdebug index file
    ``path`` (``index/<n>/<step>_<worker>.json``): smdebug's trial takes the mode of every tensor of the
    step from there, not from the event file.

    Raises
    ------
    SmdebugFormatError
        The file is not JSON, or its ``meta`` has no mode or mode step, or its ``shape_payload`` is not a
        list of tensors.
    """
    index = _read_json(fs, path)
    meta = index.get("meta") if isinstance(index, dict) else None
    mode, mode_step = (meta.get("mode"), meta.get("mode_step")) if isinstance(meta, dict) else (None, None)
    if not isinstance(mode, str) or mode.strip() not in Mode.__members__:
        raise SmdebugFormatError(f"{path}: meta names no mode ({', '.join(Mode.__members__)})")
    if type(mode_step) is not int:
        raise SmdebugFormatError(f"{path}: meta mode_step {mode_step!r} is not a number")
    shapes = index.get("shape_payload") or []
    if not isinstance(shapes, list) or not all(
        isinstance(s, dict) and isinstance(s.get("tensorname"), str) for s in shapes
    ):
        raise SmdebugFormatError(f"{path}: shape_payload is not a list of tensors with their names")
    return Mode[mode.strip()], _integer(str(mode_step), "meta mode_step", path), [s["tensorname"] for s in shapes]


# --------------------------------------------------------------- the import
@dataclass
class _Stored:
    """What :class:`_ImportOps` stores for one tensor: the raw array and/or reductions smdebug computed."""

    raw: np.ndarray | None
    reductions: dict[str, float] = field(default_factory=dict)


class _ImportOps(TensorOps):
    """Store exactly what smdebug stored: its raw tensor when there is one, its reductions as they are."""

    def prepare(
        self, value: Any, keys: Sequence[str], raw: bool
    ) -> tuple[np.ndarray | None, dict[str, float], str | None]:
        if not isinstance(value, _Stored):
            raise TypeError(f"expected an imported tensor, got {type(value).__name__}")
        return value.raw, dict(value.reductions), None


class _ImportWriter(Writer):
    framework = "smdebug"
    ops = _ImportOps()


@dataclass
class ImportSummary:
    """What :func:`import_smdebug` wrote."""

    workers: list[str]
    steps: int
    tensors: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # smdebug name -> why it was not imported


def _reduction_config(text: Any, where: str) -> ReductionConfig | None:
    """smdebug's ``"mean,max,l2_norm,abs_max"`` with ``save_raw_tensor`` as a tensortap ReductionConfig.

    Raises
    ------
    SmdebugFormatError
        ``text`` (its fields) is not of the types smdebug writes; ``where`` names the collection.
    """
    if text is None:
        return None
    if not isinstance(text, Mapping):
        raise SmdebugFormatError(f"{where}: 'reduction_config' is not an object")
    reductions, save_raw = text.get("reductions") or "", text.get("save_raw_tensor", False)
    if not isinstance(reductions, str) or not isinstance(save_raw, bool):
        raise SmdebugFormatError(
            f"{where}: 'reduction_config' needs 'reductions' text and 'save_raw_tensor' true/false"
        )
    names = [t.strip() for t in reductions.split(",") if t.strip()]
    plain: list[str] = []
    absolute: list[str] = []
    norms: list[str] = []
    abs_norms: list[str] = []
    for token in names:
        base, is_abs = (token[4:], True) if token.startswith("abs_") else (token, False)
        base = base.removesuffix("_norm")
        if base in ("l1", "l2"):
            (abs_norms if is_abs else norms).append(base)
        elif base in _REDUCTIONS:
            (absolute if is_abs else plain).append(base)
        else:
            logger.warning("tensortap: smdebug reduction %r is unknown; its values are not imported", token)
    if not (plain or absolute or norms or abs_norms):
        return None
    return ReductionConfig(
        reductions=tuple(plain),
        abs_reductions=tuple(absolute),
        norms=tuple(norms),
        abs_norms=tuple(abs_norms),
        save_raw_tensor=save_raw,
    )


# parsing a pattern into the tree ``re`` compiles (public in no version; ``sre_parse`` warns from 3.11)
_RE_PARSER: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})
MATCH_BUDGET = 10**10
"""What matching one of smdebug's ``include_regex`` against one tensor name may cost at most, in the units of
:func:`_match_cost` (about a second's work: ``re`` backtracks, and a stranger's pattern such as ``(a|a)*$`` or
``.*.*.*x`` would take hours on one long name). The estimate is an upper bound, far above what the usual
patterns cost (``.*layer\\d+.*(weight|bias)``), so the matches of an import together are bounded by the
time they take, :data:`MATCH_SECONDS`."""
MATCH_SECONDS = 30.0
"""How long all the ``include_regex`` matches of one import may take."""


def _match_cost(items: Any, n: int, repeated: bool = False) -> float:
    """An upper bound of the steps ``re`` takes to match the parsed pattern ``items`` at one position of a
    name of ``n`` characters: each choice (a repeat of varying count, an alternation) multiplies the ways to
    try; a choice inside a repeat makes them exponential in ``n`` (inf). ``repeated``: ``items`` is repeated."""
    cost = 1.0
    for op, av in items:
        kind = str(op)
        if kind in _REPEATS:
            low, high, body = av
            if repeated and low != high:
                return math.inf
            cost *= (min(high - low, n) + 1) * _match_cost(body, n, repeated or high > 1)
        elif kind in ("BRANCH", "GROUPREF_EXISTS"):
            if repeated:
                return math.inf
            cost *= sum(_match_cost(branch, n) for branch in (av[1] if kind == "BRANCH" else av[1:]) if branch)
        elif kind == "SUBPATTERN":
            cost *= _match_cost(av[-1], n, repeated)
        elif kind == "ATOMIC_GROUP":
            cost *= _match_cost(av, n, repeated)
        elif kind in ("ASSERT", "ASSERT_NOT"):
            cost *= _match_cost(av[1], n, repeated)
        elif kind == "GROUPREF":
            cost *= n + 1
    return cost


@dataclass
class _SmdCollection:
    """One smdebug collection as its workers' files define it."""

    path: str  # a file that defines it, for errors
    names: set[str] = field(default_factory=set)  # its ``tensor_names``
    patterns: dict[str, tuple[re.Pattern[str], Any]] = field(default_factory=dict)  # include_regex: compiled, parsed
    config: ReductionConfig | None = None


class _SmdCollections:
    """smdebug's collections and which of them a tensor is in, as smdebug's trial reads it: those whose
    ``tensor_names`` list its smdebug name or one of whose ``include_regex`` matches it (``re.search``),
    the cost of each match bounded by :data:`MATCH_BUDGET`, the time of all by :data:`MATCH_SECONDS`."""

    def __init__(self, collections: dict[str, _SmdCollection]) -> None:
        self.collections = collections
        self.seconds = 0.0  # spent matching
        self._of: dict[str, list[str]] = {}

    def of(self, name: str) -> list[str]:
        """The collections smdebug's tensor ``name`` is in.

        Raises
        ------
        SmdebugFormatError
            Matching an ``include_regex`` against ``name`` could cost more than is left of the budget
            (the message names the collections file, the collection and the pattern).
        """
        if name not in self._of:
            self._of[name] = [c for c, spec in self.collections.items() if self._member(c, spec, name)]
        return self._of[name]

    def _member(self, collection: str, spec: _SmdCollection, name: str) -> bool:
        if name in spec.names:
            return True
        for text, (pattern, parsed) in spec.patterns.items():
            at_start = len(parsed) and str(parsed[0][0]) == "AT" and str(parsed[0][1]).startswith("AT_BEGINNING")
            searched = 1 if at_start and not pattern.flags & re.MULTILINE else len(name) + 1  # positions tried
            if searched * _match_cost(parsed, len(name)) > MATCH_BUDGET:
                raise SmdebugFormatError(
                    f"{spec.path}: collection {collection!r}: include_regex {text!r} could take too long to match "
                    f"tensor names such as one of {len(name)} characters (it repeats too much)"
                )
            start = time.monotonic()
            found = pattern.search(name)
            self.seconds += time.monotonic() - start
            if self.seconds > MATCH_SECONDS:
                raise SmdebugFormatError(
                    f"{spec.path}: collection {collection!r}: matching the include_regex of the collections took "
                    f"more than {MATCH_SECONDS:g} s (the last: {text!r}, against a name of {len(name)} characters)"
                )
            if found:
                return True
        return False


def _read_collections(fs: Any, root: str) -> _SmdCollections:
    """smdebug's collections of every worker (``all`` and ``default`` left out).

    Raises
    ------
    SmdebugFormatError
        A collections file is not what smdebug writes: not JSON (or nested too deeply), a collection name that
        is empty or not valid Unicode, a field of another type, an ``include_regex`` that is not a pattern.
    """
    out: dict[str, _SmdCollection] = {}
    for path in _files(fs, f"{root}/collections"):
        if not path.endswith(".json"):
            continue
        data = _read_json(fs, path)
        collections = data.get("collections") if isinstance(data, dict) else None
        if not isinstance(collections, dict):
            raise SmdebugFormatError(f"{path}: no 'collections' object")
        for name, spec in collections.items():
            if not name or len(name) > MAX_NAME_CHARS or not layout.is_unicode(name):
                raise SmdebugFormatError(f"{path}: {name!r} is not a collection name")
            where = f"{path}: collection {name!r}"
            if not isinstance(spec, dict):
                raise SmdebugFormatError(f"{where}: not an object")
            if name in _META_COLLECTIONS:
                continue
            names, patterns = spec.get("tensor_names") or [], spec.get("include_regex") or []
            for key, value in (("tensor_names", names), ("include_regex", patterns)):
                if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                    raise SmdebugFormatError(f"{where}: {key!r} is not a list of strings")
            collection = out.setdefault(name, _SmdCollection(path))
            collection.names.update(names)
            for text in patterns:
                try:
                    pattern, parsed = re.compile(text), _RE_PARSER.parse(text)
                except (re.error, RecursionError, OverflowError) as exc:
                    raise SmdebugFormatError(f"{where}: include_regex {text!r} is not a pattern ({exc})") from None
                if math.isinf(_match_cost(parsed, 1)):  # before anything is written
                    raise SmdebugFormatError(
                        f"{where}: include_regex {text!r} could take too long to match (it repeats a choice)"
                    )
                collection.patterns[text] = pattern, parsed
            collection.config = collection.config or _reduction_config(spec.get("reduction_config"), where)
    return _SmdCollections(out)


def tensortap_name(name: str, collections: Sequence[str]) -> str:
    """The tensortap name of smdebug tensor ``name`` (in smdebug's ``collections``)."""
    if name.startswith("gradient/"):
        return "gradients/" + name.removeprefix("gradient/")
    if name.startswith("scalar/"):
        return "metrics/" + name.removeprefix("scalar/")
    if "losses" in collections and not name.startswith("losses/"):
        return f"losses/{name}"
    return name


def _files(fs: Any, folder: str) -> list[str]:
    """The regular files below ``folder`` (full paths, as ``fs`` names them), sorted; none if it is not a folder.

    Nothing outside the trial is read and no read waits for ever: a symbolic link (to a file or a folder,
    ``folder`` itself included; the trial's own folder may be one) and anything that is not a regular file
    (a FIFO, a device) is left out with a warning, unopened.
    """
    try:
        info = fs.info(folder)
    except FileNotFoundError:
        return []
    if info.get("islink"):
        logger.warning("tensortap: %s: a symbolic link; not imported", folder)
        return []
    if info.get("type") != "directory":
        return []
    out: list[str] = []
    for path, info in sorted(fs.find(folder, detail=True).items()):  # lists no folder that is a link
        if info.get("islink") or info.get("type") != "file":
            why = "a symbolic link" if info.get("islink") else "not a regular file"
            logger.warning("tensortap: %s: %s; not imported", path, why)
        else:
            out.append(path)
    return out


def _read_json(fs: Any, path: str) -> Any:
    """The JSON content of the file ``path`` (:func:`_read`: an index or collections file).

    Raises
    ------
    SmdebugFormatError
        It is not UTF-8, not JSON, nested too deeply, or holds an integer of more digits than Python converts.
    """
    try:
        return json.loads(_read(fs, path))
    except RecursionError:
        raise SmdebugFormatError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SmdebugFormatError(f"{path}: not valid JSON ({exc})") from None


def _read(fs: Any, path: str) -> bytes:
    """The content of the file ``path`` listed by :func:`_files`, at most :data:`MAX_FILE_BYTES`.

    A local file is opened by :func:`~tensortap.backends.storage.open_regular`: never through a link and
    without waiting, in case something else was put in its place since it was listed.

    Raises
    ------
    SmdebugFormatError
        The file is larger than :data:`MAX_FILE_BYTES`, or no longer a regular file.
    """
    if not isinstance(fs, LocalFileSystem):
        if fs.size(path) > MAX_FILE_BYTES:
            raise SmdebugFormatError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return bytes(fs.cat_file(path))
    try:
        fd = open_regular(path, follow=False)
    except NotInTrial:
        raise SmdebugFormatError(f"{path}: not a regular file") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise SmdebugFormatError(f"{path}: a symbolic link") from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > MAX_FILE_BYTES:
            raise SmdebugFormatError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return f.read()


def _step_files(fs: Any, folder: str, suffix: str) -> dict[str, dict[int, str]]:
    """worker -> {step: path} of the files ``<step>_<worker><suffix>`` below ``folder`` (smdebug's
    ``events/<step>/<step>_<worker>.tfevents`` and ``index/<n>/<step>_<worker>.json``), sorted by step.

    Raises
    ------
    SmdebugFormatError
        Two files of one step and worker (``0_worker_0`` and ``000000000000_worker_0``), naming both:
        nothing is written for such a trial.
    """
    name = re.compile(rf"^(\d{{1,18}})_(.{{1,200}}){re.escape(suffix)}$")
    out: dict[str, dict[int, str]] = {}
    for path in _files(fs, folder):
        match = name.match(path.rsplit("/", 1)[-1])
        if match is None:
            if path.endswith(suffix):
                logger.warning("tensortap: %s: not named <step>_<worker>%s; not imported", path, suffix)
            continue
        step, worker = int(match.group(1)), match.group(2)
        other = out.setdefault(worker, {}).setdefault(step, path)
        if other != path:
            raise SmdebugFormatError(f"{other} and {path}: two files of step {step} of worker {worker!r}")
    return {w: dict(sorted(steps.items())) for w, steps in out.items()}


def _folders(fs: Any, path: str) -> list[str]:
    """The folders in ``path`` (full paths, as ``fs`` names them), symbolic links left out; none where it
    cannot be listed."""
    try:
        entries = fs.ls(path, detail=True)
    except (OSError, ValueError):
        return []
    return sorted(str(e["name"]).rstrip("/") for e in entries if e.get("type") == "directory" and not e.get("islink"))


def _trials_below(fs: Any, root: str, depth: int = SEARCH_DEPTH) -> list[str]:
    """Folders below ``root`` (up to ``depth`` levels) that hold an smdebug trial (an ``events/`` folder),
    relative to it, sorted: where a user gave the folder that holds a trial rather than the trial. The
    search does not go into trials, nor into more than ``SEARCH_FOLDERS`` folders."""
    found: list[str] = []
    level, visited = _folders(fs, root), 0
    for _ in range(depth):
        below: list[str] = []
        for folder in level:
            if visited >= SEARCH_FOLDERS:
                return sorted(found)
            visited += 1
            inside = _folders(fs, folder)
            if f"{folder}/events" in inside:
                found.append(folder[len(root) :].lstrip("/"))
            else:
                below += inside
        level = below
    return sorted(found)


def _ranks(workers: Sequence[str]) -> dict[str, int]:
    """``worker_<n>`` keeps rank n; other worker names (``worker_00`` too: smdebug's workers ``worker_0`` and
    ``worker_00`` are two) get free ranks in sorted order (with a warning)."""
    ranks = {w: int(m.group(1)) for w in workers if (m := _WORKER.match(w))}
    free = (r for r in range(len(workers) + len(ranks) + 1) if r not in ranks.values())
    for w in sorted(set(workers) - set(ranks)):
        ranks[w] = next(free)
        logger.warning("tensortap: smdebug worker %r is imported as worker_%d", w, ranks[w])
    return ranks


@contextlib.contextmanager
def _write_errors(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Raise an OSError that the writer (``strict=True``) wrapped in a RuntimeError as an OSError again,
    naming ``out_dir``: a folder that cannot be made or written is a bad argument (the command's exit 2,
    ``--json`` kind ``input``), not an unexpected error.

    Raises
    ------
    OSError
        ``cannot write the trial at OUT_DIR: [Errno N] ...``, of the same class as the writer's.
    """
    try:
        yield
    except RuntimeError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OSError):
            raise
        message = f"cannot write the trial at {os.fspath(out_dir)}: {cause}"
        raise (_reworded(cause, message) or OSError(message)) from cause


def _reworded(exc: Exception, message: str) -> Exception | None:
    """An exception of ``exc``'s class saying ``message``; None where its constructor takes other arguments (a
    subclass of a plugin's)."""
    try:
        return type(exc)(message)
    except TypeError:
        return None


@dataclass
class _Opened:
    """Whether one of the import's writers opened, i.e. claimed its worker in ``out_dir``."""

    writer: bool = False


@contextlib.contextmanager
def _nothing_kept(out_fs: Any, out_root: str, out_dir: str | os.PathLike[str]) -> Iterator[_Opened]:
    """Remove what the import wrote to ``out_dir`` (``out_root`` in ``out_fs``), new or empty before it, when it
    fails after one of its writers opened (the caller sets :attr:`_Opened.writer`): ``out_dir`` itself where it is
    new, else what it holds. An error says so, or what is left where the removal failed (``check`` reports that
    trial); after a Ctrl-C, a warning."""
    existed = out_fs.exists(out_root)
    opened = _Opened()
    try:
        yield opened
    except BaseException as exc:
        if not opened.writer:
            # What OUT_DIR holds now is not ours: another process may have written a trial there since it was
            # found empty (the first writer's refusal to claim its worker says so).
            raise
        where = os.fspath(out_dir)
        note: str | None = f"nothing was kept: what it had written to {where} was removed"
        try:
            out_fs.invalidate_cache(out_root)  # the writer wrote through its own storage: a cached listing misses it
            written = (out_fs.ls(out_root, detail=False) if existed else [out_root]) if out_fs.exists(out_root) else []
            if written:
                out_fs.rm(written, recursive=True)
            else:
                note = None  # nothing was written
        except Exception as removal:  # what is left stays, for the user to see
            note = f"{where} may still hold part of the trial: removing what was written failed ({removal})"
        if note is None:
            raise
        reworded = _reworded(exc, f"{exc} ({note})") if isinstance(exc, Exception) else None
        if reworded is None:
            logger.warning("tensortap: import-smdebug stopped by %r: %s", exc, note)
            raise
        raise reworded from exc


def import_smdebug(
    trial: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    out_storage_options: Mapping[str, Any] | None = None,
) -> ImportSummary:
    """Write the smdebug trial at ``trial`` as a tensortap trial at ``out_dir`` (which must be empty or absent).

    An import that fails keeps nothing: what it wrote to ``out_dir`` is removed (``out_dir`` too where it made
    it, and the empty folders it made above it: :func:`~tensortap.trial.export.new_folders_removed_on_error`)
    and the error's message says so, or says what is left where that removal failed. Where its first writer
    cannot open (another process wrote a trial into ``out_dir`` since it was found empty), nothing is removed.

    Parameters
    ----------
    trial
        Local directory or fsspec URL (``s3://...``) of a trial smdebug wrote.
    out_dir
        Local directory or fsspec URL of the tensortap trial to write.
    storage_options, out_storage_options
        fsspec options for reading ``trial`` and writing ``out_dir``.

    Raises
    ------
    TrialNotFound
        ``trial`` holds no smdebug event files (its message names the smdebug trials in the folders
        below it, :func:`_trials_below`).
    SmdebugFormatError
        A file is not what smdebug writes, or two files are of one step of a worker.
    ValueError
        ``out_dir`` already holds files, or is a file.
    OSError
        ``out_dir`` cannot be made or written (a folder on its way is a file, no permission, a full disk).
    """
    fs, root = fsspec.core.url_to_fs(os.fspath(trial), **dict(storage_options or {}))
    root = root.rstrip("/")
    files = _step_files(fs, f"{root}/events", ".tfevents")
    if not files:
        where = os.fspath(trial)
        if not fs.exists(root):
            raise TrialNotFound(where, "nothing exists there", kind="smdebug")
        why = "no smdebug event files there (events/<step>/*.tfevents)"
        raise TrialNotFound(where, why, _trials_below(fs, root), kind="smdebug")
    out_fs, out_root = fsspec.core.url_to_fs(os.fspath(out_dir), **dict(out_storage_options or {}))
    if out_fs.isfile(out_root):
        raise ValueError(f"{os.fspath(out_dir)}: is a file; import into a new directory")
    if out_fs.exists(out_root) and out_fs.ls(out_root):
        raise ValueError(f"{os.fspath(out_dir)}: already holds files; import into a new directory")
    indexes = _step_files(fs, f"{root}/index", ".json")
    smd_collections = _read_collections(fs, root)
    configs = {name: Collection(name, reduction_config=c.config) for name, c in smd_collections.collections.items()}
    ended = fs.exists(f"{root}/training_job_end.ts")
    summary = ImportSummary(workers=[], steps=0, tensors=[])
    names: set[str] = set()
    steps: set[int] = set()
    made = new_folders_removed_on_error(out_root) if isinstance(out_fs, LocalFileSystem) else contextlib.nullcontext()
    with made, _nothing_kept(out_fs, out_root, out_dir) as opened:  # OUT_DIR's new parents after what it holds
        for worker, rank in sorted(_ranks(list(files)).items(), key=lambda item: item[1]):
            with _write_errors(out_dir):
                writer = _ImportWriter(
                    out_dir, rank=rank, strict=True, collection_configs=configs, storage_options=out_storage_options
                )
                opened.writer = True
                try:
                    for step, path in files[worker].items():
                        index = indexes.get(worker, {}).get(step)
                        _import_step(writer, fs, path, index, step, smd_collections, names, summary.skipped)
                        steps.add(step)
                except BaseException:
                    writer.close(IMPORT_FAILED)
                    raise
                writer.close("closed" if ended else "incomplete")
            summary.workers.append(writer.worker)
    summary.steps = len(steps)
    summary.tensors = sorted(names)
    return summary


def _import_step(
    writer: _ImportWriter,
    fs: Any,
    path: str,
    index: str | None,
    step: int,
    smd_collections: _SmdCollections,
    names: set[str],
    skipped: dict[str, str],
) -> None:
    tensors: dict[str, _Stored] = {}
    modes: set[tuple[Mode, int]] = set()
    duplicates: set[str] = set()
    budget = _Budget()
    for record in read_records(_read(fs, path), path):
        for value in _summary_values(record, path, budget):
            modes.add((value.mode, value.mode_step if value.mode_step is not None else step))
            tag = value.tag
            reduction = None
            if tag.startswith(_REDUCTION_PREFIX):
                reduction, _, tag = tag.removeprefix(_REDUCTION_PREFIX).partition("/")
                base = reduction.removeprefix("abs_")
                if base not in _REDUCTIONS or not tag:
                    skipped[value.tag] = "unknown smdebug reduction"
                    continue
            if value.array is None:
                skipped[value.tag] = "not numeric"
                continue
            stored = tensors.setdefault(tag, _Stored(None))
            if reduction is None:
                if stored.raw is not None:
                    duplicates.add(tag)
                stored.raw = value.array
            elif value.array.size == 1:
                stored.reductions[reduction] = float(value.array.reshape(()).real)
            else:
                skipped[value.tag] = "a reduction that is not a scalar"
    if duplicates:
        logger.warning(
            "tensortap: %s: %s saved more than once at step %d; the last value is imported",
            path,
            ", ".join(sorted(duplicates)),
            step,
        )
    shapes: list[str] = []
    if index is not None:  # as smdebug's trial reads it: one mode for the step, whatever its tensors say
        mode, mode_step, shapes = _read_index(fs, index)
    elif len(modes) > 1:
        raise SmdebugFormatError(f"{path}: tensors of one step in several modes or mode steps: {sorted(modes)}")
    else:
        mode, mode_step = modes.pop() if modes else (Mode.GLOBAL, step)
        if mode_step < 0:
            raise SmdebugFormatError(f"{path}: mode_step {mode_step} out of range")
    for name in shapes:
        if name not in tensors or tensors[name].raw is None:
            skipped[name] = "its shape alone (save_shape): a tensortap trial holds a shape only with its values"
    writer.mode_steps[mode] = mode_step - 1  # smdebug's mode step, not a count of the saved ones
    with writer.stepping(mode, step=step):
        for tag, stored in tensors.items():
            colls = list(smd_collections.of(tag))
            name = tensortap_name(tag, colls)
            if name.startswith("metrics/") and "metrics" not in colls:
                colls.append("metrics")
            writer.save(name, stored, collections=colls or ["custom"])
            names.add(name)
