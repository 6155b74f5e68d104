"""Exporting a trial: a table of reductions (CSV, Parquet) and TensorBoard event files."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..modes import Mode
from .progress import progress

if TYPE_CHECKING:
    from .trial import Trial

logger = logging.getLogger("tensortap")

TABLE_SUFFIXES = (".csv", ".parquet")
TENSORBOARDX_NAN_WARNING = ("tensorboardX.x2num", "NaN or Inf found in input tensor.")
"""tensorboardX's logger and the warning it logs for every NaN or infinite value it writes, naming nothing."""


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


def check_suffix(path: str, suffixes: Sequence[str], *, stdout: bool = False) -> str:
    """The lower-case suffix of the output file ``path``; a ``ValueError`` naming ``suffixes`` unless it is one of
    them, or ``path`` is ``"-"`` (standard output) where ``stdout`` allows it. Without a known suffix the writer
    would choose (matplotlib writes ``path.png``) and the file named would not exist."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in suffixes and not (stdout and path == "-"):
        allowed = f"{', '.join(suffixes[:-1])} or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise ValueError(f"output: {path!r} must end in {allowed}" + (" (or be '-')" if stdout else ""))
    return suffix


def export_table(
    trial: Trial,
    output: str | os.PathLike[str],
    reductions: Sequence[str] | None = None,
    collection: str | None = None,
    show_progress: bool | None = None,
    escape: Callable[[str], str] | None = None,
) -> int:
    """Write :meth:`Trial.to_pandas` (every tensor, raw or not) to ``output``; return the number of rows.

    Parameters
    ----------
    output
        ``*.csv``, ``*.parquet`` (needs pyarrow), or ``"-"`` for CSV on standard output.
    reductions
        Reduction keys to export for every tensor (saved, or computed from the raw tensor).
    show_progress
        A progress bar over tensors (default: when standard error is a terminal).
    escape
        Applied to every text cell (names, workers) written to standard output: the command line
        passes ``tensortap.cli.printable`` when that is a terminal, so that a stranger's tensor
        name cannot act on it (files and pipes get the names as they are).
    """
    path = os.fspath(output)
    suffix = check_suffix(path, TABLE_SUFFIXES, stdout=True)
    df = trial.to_pandas(collection=collection, reductions=reductions, progress=show_progress)
    if path == "-":
        if escape is not None:
            for column in df.select_dtypes(exclude="number").columns:
                df[column] = df[column].map(lambda cell: escape(cell) if isinstance(cell, str) else cell)
        df.to_csv(sys.stdout, index=False)
    elif suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return len(df)


def export_tensorboard(
    trial: Trial,
    logdir: str | os.PathLike[str],
    reductions: Sequence[str] | None = None,
    bins: int = 64,
    show_progress: bool | None = None,
) -> dict[str, int]:
    """Write the trial as TensorBoard event files (with tensorboardX), one run per mode (``logdir/train``...).

    Scalar tensors and reductions become scalars (``<name>`` and ``<name>/<reduction>``);
    raw tensors and histogram reductions become histograms. Each event has the
    step's global step and, from format 1.1 on, its wall time (older trials: the
    time of the export). A trial of several workers has one run per mode and
    worker (``logdir/train/worker_1``), each with that worker's values. A tensor whose scalars hold NaN
    or infinite values (written as they are) is named in one warning that counts them (tensorboardX's own
    warning, once per value and naming nothing, is left out).

    Parameters
    ----------
    reductions
        Also export these reductions of every tensor (computed from raw tensors).
    bins
        Bins of the histograms of raw tensors (equal bins over their range across all steps).

    Returns
    -------
    dict
        How many ``scalars`` and ``histograms`` were written.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError as exc:
        raise ImportError('the TensorBoard export needs tensorboardX: pip install "tensortap[tensorboard]"') from exc
    times = trial.wall_times()
    steps = trial._index.steps
    workers = trial.workers()
    several = len(workers) > 1
    writers: dict[tuple[Mode, str], Any] = {}

    def writer(gstep: int, worker: str) -> Any:
        mode = steps.get(gstep, (Mode.GLOBAL, gstep))[0]
        run = (mode.name.lower(), worker) if several else (mode.name.lower(),)
        if (mode, worker) not in writers:
            writers[mode, worker] = SummaryWriter(os.path.join(os.fspath(logdir), *run))
        return writers[mode, worker]

    counts = {"scalars": 0, "histograms": 0}
    # one view of the trial (on remote storage no listing per tensor); non-finite values: one warning per tensor
    with trial.frozen(), _without_tensorboardx_nan_warning():
        try:
            for name in progress(trial.tensor_names(), desc="tensors", enable=show_progress):
                tensor = trial.tensor(name)
                rows = [(g, w, name if k == "value" else f"{name}/{k}", v) for g, w, k, v in tensor._rows(None)]
                if reductions:
                    written = {row[:3] for row in rows}  # a reduction among the defaults: one event a step
                    more = [(g, w, f"{name}/{k}", v) for g, w, k, v in tensor._rows(reductions)]
                    rows += [row for row in more if row[:3] not in written]
                for gstep, worker, tag, value in rows:
                    writer(gstep, worker).add_scalar(tag, value, gstep, walltime=times.get(gstep))
                counts["scalars"] += len(rows)
                if nonfinite := sum(not math.isfinite(value) for *_, value in rows):
                    logger.warning(
                        "tensortap: %r: %d of its %d values written as TensorBoard scalars are NaN or infinite",
                        name,
                        nonfinite,
                        len(rows),
                    )
                shape = tensor.summary()["shape"]
                if shape is not None and int(np.prod(shape)) == 1:
                    continue  # a scalar: its curve is enough
                for worker, (gstep, hist) in (
                    (w, item) for w in workers for item in tensor.histogram_values(worker=w, bins=bins).items()
                ):
                    c = hist.counts.astype(np.float64)
                    centres = (hist.edges[1:] + hist.edges[:-1]) / 2
                    total = float(c.sum())
                    writer(gstep, worker).add_histogram_raw(
                        name,
                        min=float(hist.edges[0]),
                        max=float(hist.edges[-1]),
                        num=total,
                        sum=float((c * centres).sum()),
                        sum_squares=float((c * centres * centres).sum()),
                        bucket_limits=hist.edges[1:].tolist(),
                        bucket_counts=c.tolist(),
                        global_step=gstep,
                        walltime=times.get(gstep),
                    )
                    counts["histograms"] += 1
        finally:
            for w in writers.values():
                w.close()
    return counts
