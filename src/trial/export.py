"""Exporting a trial: a table of reductions (CSV, Parquet) and TensorBoard event files."""

from __future__ import annotations

import contextlib
import decimal
import logging
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ..backends.registry import get_storage
from ..crc32c import masked_crc32c, masked_crc32c_rows
from ..modes import Mode
from .progress import progress

if TYPE_CHECKING:
    import pandas

    from .trial import Trial

logger = logging.getLogger("tensortap")

TABLE_SUFFIXES = (".csv", ".parquet")
TENSORBOARDX_NAN_WARNING = ("tensorboardX.x2num", "NaN or Inf found in input tensor.")
"""tensorboardX's logger and the warning it logs for every NaN or infinite value it writes, naming nothing."""
EVENT_BATCH = 4096
"""Events an event file holds before it writes them (:class:`_EventFile`)."""
TOGETHER = 32
"""Records of one length checksummed together by :func:`_tfrecords` from this many (fewer: one by one; a
record of 1,000 bytes alone took 2.9 ms in NumPy, 0.12 ms in tensorboardX's loop)."""


@contextlib.contextmanager
def _without_tensorboardx_nan_warning() -> Iterator[None]:
    """Within, tensorboardX's :data:`TENSORBOARDX_NAN_WARNING` is dropped (its other messages pass):
    :func:`export_tensorboard` warns once per tensor instead, naming it."""
    name, message = TENSORBOARDX_NAN_WARNING

    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != message

    tb_logger = logging.getLogger(name)
    tb_logger.addFilter(keep)
    try:
        yield
    finally:
        tb_logger.removeFilter(keep)


def _tfrecords(records: list[bytes]) -> bytes:
    """``records`` framed as TFRecords (the event file format): each its length, the length's masked
    CRC-32C, itself and its masked CRC-32C, all little-endian; the checksums of records of one length are
    computed together (byte by byte in Python, as tensorboardX does without the ``crc32c`` package, they
    took most of an export's time)."""
    lengths = np.array([len(r) for r in records], dtype="<u8")
    headers = lengths.view(np.uint8).reshape(-1, 8)
    header_crcs = masked_crc32c_rows(headers).astype("<u4")
    record_crcs = np.empty(len(records), dtype="<u4")
    for length in np.unique(lengths):
        same = np.flatnonzero(lengths == length)
        if len(same) < TOGETHER:  # a NumPy pass per byte costs more than one record at a time for a few
            record_crcs[same] = [masked_crc32c(records[i]) for i in same]
            continue
        rows = np.frombuffer(b"".join(records[i] for i in same), dtype=np.uint8).reshape(len(same), int(length))
        record_crcs[same] = masked_crc32c_rows(rows)
    header_bytes, header_crc_bytes, record_crc_bytes = headers.tobytes(), header_crcs.tobytes(), record_crcs.tobytes()
    return b"".join(
        header_bytes[8 * i : 8 * i + 8]
        + header_crc_bytes[4 * i : 4 * i + 4]
        + record
        + record_crc_bytes[4 * i : 4 * i + 4]
        for i, record in enumerate(records)
    )


@contextlib.contextmanager
def written_whole(path: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """The file to write the output ``path`` to: a hidden one beside it (``.tensortap-<random>.partial``), made
    here (once, refused if the name exists), renamed to ``path`` when the block ends, removed when it raises
    (Ctrl-C, a full disk).

    An interrupted export or report leaves no file at ``path``: a truncated CSV read back as a complete table,
    and event files as a complete TensorBoard run. A symbolic link is followed (the file it names is replaced,
    in that file's folder), and a replaced file keeps its permissions. Where the hidden file cannot be made
    (a folder the user cannot write) but ``path`` is a file the user can write, ``path`` is written in place.
    A URL (``s3://``, ``file://``) is written to a local temporary file first, published whole in its folder
    once the block ends (:meth:`~tensortap.backends.storage.Storage.publish_file` of the folder's storage:
    transient errors retried, one that says the storage failed raised as a
    :class:`~tensortap.exceptions.StorageUnreachable` naming the folder).

    Parameters
    ----------
    path
        The output file (``~`` expanded).
    storage_options
        For a URL: passed to its fsspec filesystem (s3fs's ``key``, ``secret``, ``client_kwargs``, ...).

    Yields
    ------
    BinaryIO
        The file, open for writing bytes; closed when the block ends.

    Raises
    ------
    OSError
        The file cannot be written; one about the hidden file names ``path``, the name the user gave.
    """
    if "://" in path:
        scheme, _, rest = path.partition("://")
        folder, _, name = rest.rpartition("/")  # "memory://o.csv": the file system's root
        storage = get_storage(f"{scheme}://{folder}", **(storage_options or {}))
        with tempfile.TemporaryDirectory(prefix="tensortap-") as folder:
            local_path = os.path.join(folder, "output")
            with open(local_path, "wb") as file:  # the caller may close it (an event file does)
                yield file
            storage.publish_file(local_path, name)
        return
    target = os.path.realpath(os.path.expanduser(path))
    partial = os.path.join(os.path.dirname(target), f".tensortap-{secrets.token_hex(6)}.partial")
    try:
        file = open(partial, "xb")  # made once, here: "x" refuses a name that exists
    except OSError as exc:
        if os.path.isfile(target) and os.access(target, os.W_OK):
            with open(target, "wb") as in_place:
                yield in_place
            return
        raise OSError(exc.errno, exc.strerror, path) from exc
    try:
        with file:  # closed (its last bytes written) before the rename
            yield file
        if os.path.exists(target):
            shutil.copymode(target, partial)
        os.replace(partial, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        if isinstance(exc, OSError) and exc.filename == partial:
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


@contextlib.contextmanager
def new_folders_removed_on_error(path: str) -> Iterator[None]:
    """Within, the local folder ``path`` and those above it that do not exist yet may be made; where the block
    raises, those of them that are empty then are removed, the deepest first.

    A folder that existed before is never removed, nor one that holds anything (what the block left, what
    another process put there), nor any above such a folder: an export or import cut short leaves no empty
    folders behind (``logdir/train``, the parents of ``OUT_DIR``). A URL (``s3://``) is left alone: an object
    store has no folders to leave.

    Parameters
    ----------
    path
        A local folder (``~`` expanded).
    """
    missing: list[str] = []
    folder = os.path.abspath(os.path.expanduser(path))
    while "://" not in path and not os.path.lexists(folder):  # lexists: a dangling link is not a folder this made
        missing.append(folder)
        folder, child = os.path.dirname(folder), folder
        if folder == child:
            break
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                os.rmdir(folder)
            except FileNotFoundError:  # removed by the block already (an import's OUT_DIR)
                continue
            except OSError:  # not empty (or not ours to remove): nor is any folder above it
                break
        raise


class _EventFile:
    """The event file of one TensorBoard run (``logdir/train``), as tensorboardX's ``SummaryWriter`` writes it.

    The same events, in the same order: the file version, then each summary (tensorboardX's) in one
    ``Event`` with its step and wall time. ``SummaryWriter`` hands each event to a writer thread through
    a ``multiprocessing.Queue`` of ten, which checksums it byte by byte in Python; here events are written
    in the calling thread, :data:`EVENT_BATCH` at a time, their checksums computed together
    (docs/performance.md).
    """

    def __init__(
        self, logdir: str, files: contextlib.ExitStack, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        """Open the file (:func:`written_whole`, with ``storage_options`` for a URL: in place once ``files``
        closes without an error) and close it before ``files`` puts it in place; the local folders made for it
        are removed where ``files`` closes on an error (:func:`new_folders_removed_on_error`)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import directory_check

        files.enter_context(new_folders_removed_on_error(logdir))  # after the file's removal on an error
        if "://" not in logdir:  # it takes a scheme it does not know (file://) for a relative folder
            directory_check(logdir)
        # tensorboardX's name: the time (seconds) and the host
        name = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._file = files.enter_context(written_whole(name, storage_options))
        files.callback(self.close)
        self._event = Event
        self._pending = [Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()]

    def add(self, summary: Any, step: int, walltime: float | None) -> None:
        """Write ``summary`` (a tensorboardX ``Summary``) at global step ``step``, at ``walltime`` (default: now)."""
        wall_time = time.time() if walltime is None else walltime
        self._pending.append(self._event(summary=summary, step=step, wall_time=wall_time).SerializeToString())
        if len(self._pending) >= EVENT_BATCH:
            self._write()

    def _write(self) -> None:
        self._file.write(_tfrecords(self._pending))
        self._pending.clear()

    def close(self) -> None:
        """Write the events held and close the file."""
        try:
            if self._pending:
                self._write()
        finally:
            self._file.close()


class CheckedOutput(str):
    """An output file's path that :func:`check_output` checked: checked again, a URL's storage is not asked for
    again (the command line checks ``-o`` before it reads the trial, then the function that writes it checks it
    too)."""

    @property
    def suffix(self) -> str:
        """The lower-case suffix of the path (``.csv``)."""
        return os.path.splitext(self)[1].lower()


def check_output(
    path: str,
    suffixes: Sequence[str] = (),
    *,
    stdout: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckedOutput:
    """The output file ``path``, checked before any work: a ``ValueError`` naming ``suffixes`` (if any) unless its
    :attr:`~CheckedOutput.suffix` is one of them, or ``path`` is ``"-"`` (standard output) where ``stdout``
    allows it (without a known suffix the writer would choose: matplotlib writes ``path.png``, and the file
    named would not exist); a ``NotADirectoryError`` or ``FileNotFoundError`` where its folder is a file or
    missing (pandas said "Cannot save file into a non-existent directory" of a folder that was a file). A
    URL is asked for once, with ``storage_options`` (not again for a path this returned): a storage that cannot
    be reached (no credentials, a wrong endpoint) raises its :class:`~tensortap.exceptions.StorageUnreachable`
    before the trial is read, not once it has been."""
    checked = CheckedOutput(path)
    if stdout and path == "-":
        return checked
    if suffixes and checked.suffix not in suffixes:
        allowed = f"{', '.join(suffixes[:-1])} or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise ValueError(f"output: {path!r} must end in {allowed}" + (" (or be '-')" if stdout else ""))
    if "://" in path:  # a URL (memory://, s3://): its file system says whether its folder exists when written
        if not isinstance(path, CheckedOutput):
            # asked for the file, not its folder: s3fs takes a bucket it cannot reach for a missing one
            get_storage(path, **(storage_options or {})).exists()
        return checked
    folder = os.path.dirname(os.path.expanduser(path)) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"output: {path!r}: {folder} is a file, not a folder")
    if not os.path.exists(folder):
        raise FileNotFoundError(f"output: {path!r}: no folder {folder}")
    return checked


def export_table(
    trial: Trial,
    output: str | os.PathLike[str],
    reductions: Sequence[str] | None = None,
    collection: str | None = None,
    show_progress: bool | None = None,
    escape: Callable[[str], str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write :meth:`Trial.to_pandas` (every tensor, raw or not) to ``output``; return the number of rows.

    Parameters
    ----------
    output
        ``*.csv``, ``*.parquet`` (needs pyarrow, of the ``notebook`` extra: an ImportError that says so
        without it), or ``"-"`` for CSV on standard output. CSV writes NaN as ``nan`` (not an empty
        cell) and a text cell that starts as a formula with a ``'`` before it (:func:`spreadsheet_text`);
        Parquet adds ``value_int`` where needed (:func:`_with_exact_ints`). A file is written whole or not
        at all (:func:`written_whole`).
    reductions
        Reduction keys to export for every tensor (saved, or computed from the raw tensor).
    show_progress
        A progress bar over tensors (default: when standard error is a terminal).
    escape
        Applied to every text cell (names, workers) written to standard output: the command line
        passes ``tensortap.cli.printable`` when that is a terminal, so that a stranger's tensor
        name cannot act on it (files and pipes get the names as they are).
    storage_options
        For a URL ``output`` (``s3://``): passed to its fsspec filesystem, as :func:`~tensortap.create_trial`
        takes them.
    """
    from pandas.api.types import is_string_dtype

    path = os.fspath(output)
    suffix = check_output(path, TABLE_SUFFIXES, stdout=True, storage_options=storage_options).suffix
    if suffix == ".parquet":
        _require_pyarrow()  # before reading the trial
    df = trial.to_pandas(collection=collection, reductions=reductions, progress=show_progress, exact_ints=True)
    if suffix == ".parquet":
        with written_whole(path, storage_options) as file:
            _with_exact_ints(df).to_parquet(file, index=False, engine="pyarrow")
        return len(df)
    shown = escape if path == "-" else None
    for column in df.columns:
        if is_string_dtype(df[column]):  # names, workers: text from the trial; each text once (few, many rows)
            texts = {c: spreadsheet_text(c, shown) if isinstance(c, str) else c for c in df[column].unique()}
            df[column] = df[column].map(texts)
    if path == "-":
        df.to_csv(sys.stdout, index=False, na_rep="nan")
        return len(df)
    with written_whole(path, storage_options) as file:
        df.to_csv(file, index=False, na_rep="nan")
    return len(df)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a CSV cell a spreadsheet reads as a formula starts with (OWASP, "CSV Injection")."""


def spreadsheet_text(cell: str, escape: Callable[[str], str] | None = None) -> str:
    """A text cell of a CSV export: ``escape`` applied (if any), then a ``'`` put before a cell that starts
    with one of :data:`FORMULA_STARTS`, so that a spreadsheet shows a stranger's tensor name
    ``=HYPERLINK(...)`` as text instead of evaluating it (OWASP's advice for CSV injection)."""
    text = cell if escape is None else escape(cell)
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def _require_pyarrow() -> None:
    """Raise an ImportError naming the extra that installs pyarrow (``notebook``) when it is missing.

    pandas' own error (``Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'...``) has
    no ``name`` and names no extra: the command printed it squashed into one line, with ``\\n`` for its
    newlines, and no ``pip install`` that helps.

    Raises
    ------
    ImportError
        With ``name="pyarrow"``, which :func:`tensortap.cli.missing_dependency_hint` maps to its extra.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            'the Parquet export needs pyarrow: pip install "tensortap[notebook]"', name="pyarrow"
        ) from exc


def _refuse_earlier_events(logdir: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise FileExistsError if a run folder the export writes (``logdir/<mode>``, ``logdir/<mode>/<worker>``)
    holds event files already: TensorBoard shows every event file of a run, so a second export there (the
    same trial again, or another) showed each point twice, or two trials' points as one run's, without a word.
    Other runs in ``logdir`` (``lightning_logs/version_0``) are left alone. A URL is listed through its storage
    (:func:`~tensortap.backends.get_storage`, with ``storage_options``): one that fails raises its
    :class:`~tensortap.exceptions.StorageUnreachable` before anything is written.

    Raises
    ------
    FileExistsError
        Naming ``logdir`` and one of those event files.
    """
    storage = get_storage(logdir, **(storage_options or {}))
    for mode in Mode:
        run = mode.name.lower()
        files, folders = storage.entries(run)
        runs = [(run, files), *((f"{run}/{f}", storage.list(f"{run}/{f}")) for f in folders if f.startswith("worker_"))]
        for folder, names in runs:
            earlier = sorted(f for f in names if f.startswith("events.out.tfevents"))
            if earlier:
                raise FileExistsError(
                    f"{logdir} holds event files already ({logdir.rstrip('/')}/{folder}/{earlier[0]}): "
                    "TensorBoard would show their points beside this export's; export into a new folder, or "
                    "remove them"
                )


def _with_exact_ints(df: pandas.DataFrame) -> pandas.DataFrame:
    """``df`` for Parquet, whose columns hold one type: a ``value`` column of Python objects (an integer
    scalar beyond 2**53, :meth:`Trial.to_pandas`) becomes float64, beside a column ``value_int`` with the
    exact value of every integer scalar (null in the other rows): ``Int64``, or decimals of 20 digits
    where one does not fit int64 (a uint64 above 2**63 - 1)."""
    import pandas as pd

    if df["value"].dtype != object:
        return df
    ints = [v if isinstance(v, int) else None for v in df["value"]]
    fits = all(v is None or -(2**63) <= v < 2**63 for v in ints)
    exact = pd.array(ints, dtype="Int64") if fits else [None if v is None else decimal.Decimal(v) for v in ints]
    return df.assign(value=df["value"].astype("float64"), value_int=exact)


def _warn_scalars(name: str, values: Sequence[float]) -> None:
    """Warn once for ``name`` if its TensorBoard scalars (float32, by the format) hold NaN or infinite
    values, or values float32 changes beyond its rounding: an integer it cannot hold (above 2**24), a
    number beyond its range (written as infinite) or below its smallest normal one (zero or subnormal)."""
    if nonfinite := sum(not math.isfinite(v) for v in values):
        logger.warning(
            "tensortap: %r: %d of its %d values written as TensorBoard scalars are NaN or infinite",
            name,
            nonfinite,
            len(values),
        )
    tiny = float(np.finfo(np.float32).tiny)
    with np.errstate(over="ignore", under="ignore"):
        written = [float(np.float32(v)) for v in values]
    changed = [
        (v, f)
        for v, f in zip(values, written, strict=True)
        if math.isfinite(v) and (not math.isfinite(f) or 0 < abs(v) < tiny or (isinstance(v, int) and f != v))
    ]
    if changed:
        logger.warning(
            "tensortap: %r: %d of its %d values change when written as TensorBoard scalars, which are float32 "
            "(%r is written as %r); the CSV, Parquet and JSON exports keep them",
            name,
            len(changed),
            len(values),
            *changed[0],
        )


def _holds_nonfinite(key: str, value: float) -> bool:
    """Whether a tensor's row ``key``, ``value`` (:meth:`Tensor._rows`) shows a NaN or infinite element."""
    if key in ("nan_count", "inf_count"):
        return value > 0
    return key in ("min", "max") and not math.isfinite(value)


def export_tensorboard(
    trial: Trial,
    logdir: str | os.PathLike[str],
    reductions: Sequence[str] | None = None,
    bins: int = 64,
    show_progress: bool | None = None,
    collection: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Write the trial as TensorBoard event files (with tensorboardX), one run per mode (``logdir/train``...).

    Scalar tensors and reductions become scalars (``<name>`` and ``<name>/<reduction>``);
    raw tensors and histogram reductions become histograms. Each event has the
    step's global step and, from format 1.1 on, its wall time (older trials: the
    time of the export). A trial of several workers has one run per mode and
    worker (``logdir/train/worker_1``), each with that worker's values. A tensor whose scalars hold NaN
    or infinite values (written as they are) is named in one warning that counts them (tensorboardX's own
    warning, once per value and naming nothing, is left out). TensorBoard scalars are float32: a tensor
    with values that float32 changes beyond its rounding (integers above 2**24, numbers beyond its range
    or below its smallest normal number) is named in one warning too. Histograms count the finite values
    (a tensor whose reductions show NaN or infinite values is named in a warning), give the outer edges as
    their min and max, and their sums from the bin centres. The event files are put in place once all are
    written (:func:`written_whole`): an export cut short leaves none, nor the run folders it made.

    Parameters
    ----------
    reductions
        Also export these reductions of every tensor (computed from raw tensors).
    bins
        Bins of the histograms of raw tensors (equal bins over their range across all steps).
    collection
        Only the tensors of this collection (an unknown one: :class:`~tensortap.exceptions.UnknownName`,
        before anything is written).
    storage_options
        For a URL ``logdir`` (``s3://``): passed to its fsspec filesystem, as :func:`~tensortap.create_trial`
        takes them.

    Raises
    ------
    FileExistsError
        ``logdir`` holds event files already (an earlier export): nothing is written.

    Returns
    -------
    dict
        How many ``scalars`` and ``histograms`` were written.
    """
    try:
        from tensorboardX.summary import histogram_raw, scalar
    except ImportError as exc:
        raise ImportError('the TensorBoard export needs tensorboardX: pip install "tensortap[tensorboard]"') from exc
    times = trial.wall_times()
    steps = trial._index.steps
    workers = trial.workers()
    several = len(workers) > 1
    writers: dict[tuple[Mode, str], _EventFile] = {}
    files = contextlib.ExitStack()  # the event files: in place at the end, removed on an error (a partial run)

    def writer(gstep: int, worker: str) -> _EventFile:
        mode = steps.get(gstep, (Mode.GLOBAL, gstep))[0]
        run = (mode.name.lower(), worker) if several else (mode.name.lower(),)
        if (mode, worker) not in writers:
            writers[mode, worker] = _EventFile(os.path.join(os.fspath(logdir), *run), files, storage_options)
        return writers[mode, worker]

    counts = {"scalars": 0, "histograms": 0}
    # one view of the trial (on remote storage no listing per tensor); non-finite values: one warning per tensor
    with trial.frozen(), _without_tensorboardx_nan_warning():
        names = trial.tensor_names(collection=collection)  # an unknown collection: before any file is made
        _refuse_earlier_events(os.fspath(logdir), storage_options)
        with files:
            for name in progress(names, desc="tensors", enable=show_progress):
                tensor = trial.tensor(name)
                rows = tensor._rows(None)
                if reductions:
                    written = {row[:3] for row in rows}  # a reduction among the defaults: one event a step
                    rows += [row for row in tensor._rows(reductions) if row[:3] not in written]
                for gstep, worker, key, value in rows:
                    tag = name if key == "value" else f"{name}/{key}"
                    writer(gstep, worker).add(scalar(tag, value), gstep, times.get(gstep))
                counts["scalars"] += len(rows)
                _warn_scalars(name, [value for *_, value in rows])
                shape = tensor.summary()["shape"]
                if shape is not None and int(np.prod(shape)) == 1:
                    continue  # a scalar: its curve is enough
                hists = [(w, item) for w in workers for item in tensor.histogram_values(worker=w, bins=bins).items()]
                if hists and any(_holds_nonfinite(key, value) for *_, key, value in rows):
                    logger.warning(
                        "tensortap: %r holds NaN or infinite values: its TensorBoard histograms count "
                        "its finite values only",
                        name,
                    )
                for worker, (gstep, hist) in hists:
                    c = hist.counts.astype(np.float64)
                    centres = hist.edges[1:] / 2 + hist.edges[:-1] / 2  # halves first: no overflow near the max
                    filled = c > 0  # empty bins add nothing (not 0 * inf: a square beyond float64)
                    with np.errstate(over="ignore"):  # sums beyond float64 (values near its max): inf
                        moments = [float((c[filled] * centres[filled] ** p).sum()) for p in (1, 2)]
                    summary = histogram_raw(
                        name,
                        min=float(hist.edges[0]),
                        max=float(hist.edges[-1]),
                        num=float(c.sum()),
                        sum=moments[0],
                        sum_squares=moments[1],
                        bucket_limits=hist.edges[1:].tolist(),
                        bucket_counts=c.tolist(),
                    )
                    writer(gstep, worker).add(summary, gstep, times.get(gstep))
                    counts["histograms"] += 1
    return counts
