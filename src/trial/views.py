"""How a Trial and a Tensor show themselves: plain ``repr`` and notebook HTML (``_repr_html_``).

Everything shown comes from the trial index (no shard is opened) except a
tensor's sparkline. Names come from a trial that may be a stranger's: text
shows their control characters escaped (:func:`printable`, also what the
command line prints) and HTML escapes them that way too (:func:`html_text`).
"""

from __future__ import annotations

import re
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np

from ..exceptions import TensortapError
from ..modes import Mode, step_word
from ..processes import KILLED
from .index import IMPORT_FAILED, MAX_WORKERS_NAMED

if TYPE_CHECKING:
    from .trial import Tensor, Trial

#: Characters that act on a terminal rather than print, or print as nothing: C0 controls (newline and tab
#: too), DEL, C1 controls, the Unicode bidirectional overrides, isolates and marks (text that reads in another
#: order), line and paragraph separators, and the invisible ones (soft hyphen, zero-width spaces and joiners,
#: word joiner, byte order mark) that make two names look the same.
_CONTROLS = "\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
CONTROL_CHARACTERS = re.compile(f"[{_CONTROLS}]")
#: The same and the backslash: what :func:`printable` escapes in a name, so that its escapes read one way.
ESCAPED_IN_NAMES = re.compile(f"[\\\\{_CONTROLS}]")
#: Lone surrogates: the bytes of a path that are not UTF-8, as Python decodes them (``r\udce9sultats``).
SURROGATES = re.compile("[\ud800-\udfff]")


def printable(text: str, message: bool = False, unicode: bool = False) -> str:
    """``text`` with every control character escaped as Python writes it (``\\x1b``, ``\\n``, ``\\u202e``),
    and its backslashes too (``\\\\``) unless it is a ``message``.

    Text output passes every string that comes from a trial (tensor, collection, worker and file
    names, rule reasons, a stranger's folder names) through this, so that a name cannot move the
    cursor, retitle the terminal, colour what follows or add a line that reads as a table row.
    A backslash is escaped too, so that a name holding the four characters ``\\x1b`` (written
    ``\\\\x1b``) never reads as one holding the escape character (written ``\\x1b``).
    ``--json`` output is escaped by JSON itself.

    Parameters
    ----------
    text
        Any string.
    message
        ``text`` is a message (an error, a warning, a line of ``check``) rather than a name: its
        backslashes are kept, since the names a message quotes are quoted with ``repr`` (escaped
        already: escaping them again would double their backslashes); control characters are
        escaped all the same.
    unicode
        The text must be valid Unicode (HTML, a plot's text): lone surrogates (:data:`SURROGATES`, a path
        that is not UTF-8) are escaped too (``\\udce9``); text output writes them back as the bytes they
        stand for.

    Returns
    -------
    str
        ``text`` itself when it has nothing to escape.
    """
    pattern = CONTROL_CHARACTERS if message else ESCAPED_IN_NAMES
    text = pattern.sub(_escaped, text)
    return SURROGATES.sub(_escaped, text) if unicode else text


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


MAX_TEXT = 120
"""Characters of a name shown at most in a plot or a table of ``ls``: a longer one keeps its start and end
around an ellipsis (:func:`shortened`; a stranger's name of two million characters took matplotlib minutes
and a gigabyte, then failed to draw, and one of 3,000 made every row of ``ls`` 3,000 columns wide)."""


def shortened(text: str) -> str:
    """``text`` cut to :data:`MAX_TEXT` characters, its start and end kept around ``…``; ``text`` itself
    when it is no longer."""
    if len(text) <= MAX_TEXT:
        return text
    half = (MAX_TEXT - 1) // 2
    return f"{text[:half]}\u2026{text[-half:]}"


def html_text(text: str, message: bool = False) -> str:
    """``text`` for HTML: escaped as :func:`printable` writes it (a ``message`` keeps its backslashes; lone
    surrogates escaped too: the page is UTF-8), then HTML-escaped."""
    return escape(printable(text, message, unicode=True))


MAX_ROWS = 200  # tensors listed in a trial's HTML table
SPARK_POINTS = 200


def _shape_text(shape: Any) -> str:
    return "-" if shape is None else "x".join(map(str, shape)) or "scalar"


def _range_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"{len(steps)} ({steps[0]}-{steps[-1]})" if len(steps) > 1 else f"1 ({steps[0]})"


def frameworks(trial: Trial) -> set[str]:
    """The frameworks the trial's workers recorded (``"pytorch"``, ``"keras"``, ``"xgboost"``...)."""
    return {str(w.info.get("framework")) for w in trial._index.workers.values() if w.info.get("framework")}


def killed_workers(trial: Trial) -> list[str]:
    """The workers whose process ended without writing its end marker (end reason ``killed``), sorted."""
    return [w for w, reason in trial.end_reasons().items() if reason == KILLED]


def killed_note(workers: list[str]) -> str:
    """``"worker_0 killed"``: what a status says of :func:`killed_workers` (names escaped, capped by
    :func:`first_named`)."""
    return f"{printable(first_named(workers))} killed"


def awaited_note(trial: Trial) -> str | None:
    """``"worker_0 has written nothing yet"``: what a status says of the workers of the run's world size
    (``world_size`` in the worker records) that have not written anything; None when there are none."""
    awaited = trial._index.awaited
    if not awaited:
        return None
    return f"{first_named(awaited)} {'has' if len(awaited) == 1 else 'have'} written nothing yet"


def waiting_note(tensor: Tensor, mode: Mode | str | None = None) -> str | None:
    """Why ``tensor`` has no complete step (of ``mode``) though it was saved at some: not every worker of the live
    run has written them yet (``show``, the plots). None where it has a complete step, or no saved one.

    Parameters
    ----------
    tensor
        The tensor.
    mode
        The mode of the steps asked for (None: every step).

    Returns
    -------
    str or None
        ``"'loss' has no complete step yet: 10 saved steps wait for the other workers to write them (worker_1
        has written nothing yet)"`` (:func:`awaited_note`; else ``(see `tensortap ls`)``).
    """
    m = None if mode is None else Mode.parse(mode)
    if tensor.steps(m):
        return None
    saved = tensor._info.locations
    waiting = len(saved) if m is None else int(saved.saved_of(tensor.trial._index.steps_of_mode(m)[0]).sum())
    if not waiting:
        return None
    awaited = awaited_note(tensor.trial)
    return (
        f"{tensor.name!r} has no complete {step_word(m)} yet: {waiting} saved "
        + (
            "step waits for the other workers to write it"
            if waiting == 1
            else "steps wait for the other workers to write them"
        )
        + (f" ({awaited})" if awaited else " (see `tensortap ls`)")
    )


def first_named(workers: list[str]) -> str:
    """``"worker_0, worker_1 and 30 more"``: the first :data:`MAX_WORKERS_NAMED` of ``workers``, the rest
    counted."""
    more = len(workers) - MAX_WORKERS_NAMED
    return ", ".join(workers[:MAX_WORKERS_NAMED]) + (f" and {more} more" if more > 0 else "")


FAILED_REASONS = ("exception", "error", IMPORT_FAILED)
"""End reasons of a training that failed (an exception; capture turned itself off), or of an smdebug import
that stopped midway (what it wrote is removed; a trial an older tensortap left holds part of the steps)."""

MAX_ERROR_TEXT = 500  # characters of an end marker's error shown (a stranger's may be of any length)


def failure_notes(trial: Trial) -> list[str]:
    """What a status says of the workers whose end marker says their training failed (:data:`FAILED_REASONS`):
    the first worker's error in full, the others by name (a job that times out fails on every rank).

    Parameters
    ----------
    trial
        The trial.

    Returns
    -------
    list of str
        ``"worker_0 ended with reason 'exception': RuntimeError: boom"`` for the first of the workers in the
        order of their names (the text cut at :data:`MAX_ERROR_TEXT` characters), then one line per reason of
        the others, ``"worker_1, worker_2 and 30 more also ended with reason 'exception'"`` (names capped by
        :func:`first_named`); names and texts escaped by :func:`printable`. Empty when none failed.
    """
    failed = [(name, w.end or {}) for name, w in sorted(trial._index.workers.items())]
    failed = [(name, end) for name, end in failed if end.get("reason") in FAILED_REASONS]
    if not failed:
        return []
    (name, end), others = failed[0], failed[1:]
    error = str(end.get("error") or "")
    shown = error if len(error) <= MAX_ERROR_TEXT else error[:MAX_ERROR_TEXT] + "..."
    text = f": {printable(shown, message=True)}" if error else ""
    notes = [f"{printable(name)} ended with reason {end['reason']!r}{text}"]
    for reason in FAILED_REASONS:
        if alike := [other for other, e in others if e["reason"] == reason]:
            notes.append(f"{printable(first_named(alike))} also ended with reason {reason!r}")
    return notes


RUNNING = "running (or stopped without an end marker)"
"""The status of a trial whose workers have not all written their end marker (``ls``, the notebook views)."""
NO_DATA = "no data yet (no worker has started)"
"""The status of a trial with no worker (an empty folder: a run about to start)."""


def status_parts(trial: Trial) -> list[tuple[str, str]]:
    """The parts of a trial's status (``ls``, the notebook views, the report), each with its tone.

    Parameters
    ----------
    trial
        The trial.

    Returns
    -------
    list of (str, str)
        ``(text, tone)``, texts escaped already: first :data:`NO_DATA`, ``"ended"`` or :data:`RUNNING`; then
        :func:`awaited_note`, :func:`killed_note` and each of :func:`failure_notes`, where they apply. Tone
        ``"ok"`` (ended), ``"wait"`` (no data, running, awaited) or ``"bad"`` (killed, failed).
    """
    if not trial.workers():
        parts = [(NO_DATA, "wait")]
    else:
        parts = [("ended", "ok") if trial.training_ended else (RUNNING, "wait")]
    if awaited := awaited_note(trial):  # a worker of the run's world size that has not started writing
        parts.append((awaited, "wait"))
    if killed := killed_workers(trial):  # its process ended without its end marker
        parts.append((killed_note(killed), "bad"))
    parts += [(note, "bad") for note in failure_notes(trial)]  # its training raised: "ended" alone read as a success
    return parts


TONES = ("ok", "wait", "bad")
"""The tones of :func:`status_parts`, the best first."""


def status_summary(trial: Trial) -> tuple[str, str]:
    """``("ended: worker_0 killed", "bad")``: the texts of :func:`status_parts` joined, and the worst of their
    tones (:data:`TONES`: what ``ls`` of a folder of trials colours a trial's status by)."""
    parts = status_parts(trial)
    return ": ".join(text for text, _ in parts), max((tone for _, tone in parts), key=TONES.index)


def status_text(trial: Trial) -> str:
    """``"ended: worker_0 killed"``: the texts of :func:`status_parts` joined."""
    return status_summary(trial)[0]


def _kv_rows(rows: list[tuple[str, str]]) -> str:
    """Table rows of (already escaped) label and value."""
    cell = "style='text-align:left'"
    return "".join(f"<tr><th {cell}>{k}</th><td {cell}>{v}</td></tr>" for k, v in rows)


def trial_text(trial: Trial) -> str:
    """One line: path, steps per mode, tensors, workers and status (:func:`status_text`, as the HTML view)."""
    modes = ", ".join(f"{m.name.lower()} {len(trial.steps(m)) or 'none'}" for m in trial.modes())  # as `ls`
    idx = trial._index
    complete = len(trial.steps())
    incomplete = len(idx.steps) - complete + len(idx.held_steps())
    more = f" (+{incomplete} incomplete)" if incomplete else ""
    return (
        f"<Trial {trial.path!r}: {complete} steps{more} ({modes or 'none'}), {len(idx.tensors)} tensors, "
        f"{len(trial.workers())} worker(s), {status_text(trial)}>"
    )


def trial_html(trial: Trial) -> str:
    """A summary table, the collections with their sizes and a table of tensors."""
    idx = trial._index
    rows = [
        ("path", html_text(trial.path)),
        ("framework", html_text(", ".join(sorted(frameworks(trial))) or "unknown")),
        ("workers", html_text(", ".join(trial.workers()) or "none")),
        ("status", html_text(status_text(trial), message=True)),  # its names escaped already
    ]
    for m in trial.modes():
        rows.append((f"{m.name.lower()} steps", _range_text(trial.steps(m, show_incomplete=True))))
    speed = trial.steps_per_second()
    if speed is not None:
        rows.append(("speed", f"{speed:.3g} steps/s"))
    cols = trial.collections()
    rows.append(
        ("collections", html_text(", ".join(f"{n} ({len(c.tensor_names)})" for n, c in cols.items()) or "none"))
    )
    problems = trial.problems()
    if problems:
        rows.append(("problems", html_text(f"{len(problems)} unreadable file(s)")))
    names = sorted(idx.tensors)
    body = []
    for name in names[:MAX_ROWS]:
        info = idx.tensors[name]
        dtype = info.dtype or "reductions only"
        body.append(
            f"<tr><td style='text-align:left'>{html_text(name)}</td>"
            f"<td>{html_text(', '.join(sorted(info.collections)))}</td>"
            f"<td>{html_text(_shape_text(info.shape))}</td><td>{html_text(dtype)}</td><td>{len(info.locations)}</td></tr>"
        )
    more = f"<p>… and {len(names) - MAX_ROWS} more tensors</p>" if len(names) > MAX_ROWS else ""
    return (
        "<div class='tensortap-trial'>"
        f"<strong>tensortap trial</strong><table>{_kv_rows(rows)}</table>"
        "<table><thead><tr><th style='text-align:left'>tensor</th><th>collections</th><th>shape</th>"
        f"<th>dtype</th><th>steps</th></tr></thead><tbody>{''.join(body)}</tbody></table>{more}</div>"
    )


def tensor_text(tensor: Tensor) -> str:
    """One line: name, steps, dtype and shape, collections."""
    info = tensor.summary()
    what = f"{info['dtype']} {_shape_text(info['shape'])}" if info["dtype"] else "reductions only"
    collections = printable(", ".join(info["collections"]))
    return f"<Tensor {tensor.name!r}: {info['steps']} steps, {what}, collections {collections}>"


def nonfinite_note(values: np.ndarray) -> str | None:
    """``"2 NaN, 1 inf of 8 values (red marks)"``: the non-finite ``values`` a sparkline marks rather than
    draws; None when all are finite."""
    counts = {
        "NaN": int(np.isnan(values).sum()),
        "inf": int(np.isposinf(values).sum()),
        "-inf": int(np.isneginf(values).sum()),
    }
    shown = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    return f"{shown} of {len(values)} values (red marks)" if shown else None


def sparkline(series: dict[int, float], width: int = 160, height: int = 32) -> str:
    """An inline SVG of ``series`` (step: value): a polyline of its finite values (at most SPARK_POINTS,
    evenly sampled) placed by step, so that missing steps leave a gap, and a red mark across the height at
    each step of a NaN or infinite value (a diverged loss read as a smooth one when they were left out),
    with :func:`nonfinite_note` under it; ``""`` when there is nothing to draw."""
    steps = np.asarray(sorted(series), dtype=np.float64)
    y = np.asarray([series[s] for s in sorted(series)], dtype=np.float64)
    if len(y) < 2:
        return ""
    first, span_x = steps[0], steps[-1] - steps[0] or 1.0
    xs = 1 + (steps - first) / span_x * (width - 2)
    finite = np.isfinite(y)
    fx, fy = xs[finite], y[finite]
    if len(fy) > SPARK_POINTS:
        keep = np.linspace(0, len(fy) - 1, SPARK_POINTS).astype(int)
        fx, fy = fx[keep], fy[keep]
    parts = []
    if len(fy) >= 2:
        lo, hi = float(fy.min()), float(fy.max())
        span = hi - lo or 1.0
        ys = height - 1 - (fy - lo) / span * (height - 2)
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(fx, ys, strict=True))
        parts.append(f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{points}'/>")
    for x in sorted({round(float(x)) for x in xs[~finite]}):  # one mark a pixel: at most `width` of them
        parts.append(f"<line x1='{x}' x2='{x}' y1='0' y2='{height}' stroke='#d62728' stroke-width='1'/>")
    if not parts:
        return ""
    note = nonfinite_note(y)
    svg = f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>"
    return svg + (f"<br><small>{note}</small>" if note else "")


def tensor_workers(tensor: Tensor) -> list[str]:
    """The workers that saved ``tensor`` at any step, sorted."""
    return sorted({w for workers in tensor._info.locations.values() for w in workers})


def default_series(tensor: Tensor) -> tuple[str, dict[int, float]]:
    """The series a tensor is summarised by: its value if scalar, else a saved reduction or the mean; of its
    TRAIN steps where it has some (an eval loss between them would read as spikes), labelled so; of its
    first worker where several saved it (labelled so: one series never joins two workers' values)."""
    info = tensor.summary()
    workers = tensor_workers(tensor)
    worker = workers[0] if len(workers) > 1 else None
    shape = info["shape"]
    train = tensor.steps(Mode.TRAIN)
    mode = Mode.TRAIN if train and len(train) < len(tensor.steps()) else None
    suffix = (" (train)" if mode else "") + (f" [{worker}]" if worker else "")
    if shape is not None and int(np.prod(shape)) == 1:
        return f"value{suffix}", dict(tensor.to_series(None, mode, worker).items())
    if shape is None:
        saved = sorted({k for w in tensor._info.locations.values() for loc in w.values() for k in loc.reductions})
        key = next((k for k in ("mean", "abs_mean", "l2", "max") if k in saved), saved[0] if saved else "mean")
    else:
        key = "mean"
    name, absolute = (key[4:], True) if key.startswith("abs_") else (key, False)
    return f"{key}{suffix}", tensor.reduction_values(name, absolute, mode, worker)


def tensor_html(tensor: Tensor) -> str:
    """Name, collections, steps, shape, dtype and a sparkline of :func:`default_series`."""
    info = tensor.summary()
    steps = tensor.steps()
    rows = [
        ("tensor", html_text(tensor.name)),
        ("collections", html_text(", ".join(info["collections"]))),
        ("steps", _range_text(steps)),
        ("shape", html_text(_shape_text(info["shape"]))),
        ("dtype", html_text(info["dtype"] or "reductions only")),
    ]
    try:
        key, values = default_series(tensor)
    except (TensortapError, ValueError, KeyError):
        key, values = "", {}
    spark = sparkline(values)
    if spark:
        rows.append((html_text(key), spark))
    return f"<div class='tensortap-tensor'><table>{_kv_rows(rows)}</table></div>"
