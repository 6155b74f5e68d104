"""The ``tensortap`` command: ls, show, check, export, plot, rules.

Exit status, one meaning each: 0 ok (no rule fired, no problem found); 1 a
rule fired or ``check`` found problems; 2 a usage error, no trial at the path,
unreadable input, an unknown name, a rule that found none of its inputs; 130
interrupted (Ctrl-C); 141 standard output closed early (``... | head``).
Results go to standard output, diagnostics (the ``tensortap`` logger) to
standard error. See ``docs/trial.md`` for every ``--json`` schema; with
``--json`` an exit 2 also prints :func:`error_json` on standard output (all
errors end in :func:`_fail`, argparse's in :func:`main`).

Subcommands live in modules that expose ``PARSERS``: functions that each add
one subcommand to the subparsers and return its parser, with ``func`` set to
a function of the parsed arguments returning the exit status;
:data:`COMMAND_MODULES` lists those modules.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import json
import logging
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, NoReturn

import numpy as np

from . import __version__
from .exceptions import (
    ShardUnreadable,
    StorageOptionsError,
    StorageUnreachable,
    TensortapError,
    TensorUnavailable,
    TensorUnavailableForStep,
    TrialNotFound,
    TrialTooNew,
    UnknownName,
    UsageError,
)
from .modes import Mode, step_word
from .reductions import split_key
from .trial import Trial, create_trial
from .trial.check import storage_problems
from .trial.trial import run_folders
from .trial.views import (
    first_named,
    killed_note,
    killed_workers,
    printable,
    shortened,
    status_parts,
    status_summary,
    waiting_note,
)

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141
MAX_RUNS_NAMED = 5  # run folders `ls` of a trial names; more are counted
STATUS_COLOURS = {"ok": "green", "wait": "yellow", "bad": "red"}  # of the tones of views.status_parts

#: Modules (in this package) whose ``PARSERS`` add subcommands, after the ones of this module.
COMMAND_MODULES: list[str] = ["cli_rules", "cli_view", "cli_smdebug"]

#: Optional dependencies (top-level module) and the extra that installs them.
EXTRAS = {
    "pandas": "notebook",
    "matplotlib": "notebook",
    "tqdm": "notebook",
    "pyarrow": "notebook",  # Parquet export
    "torch": "torch",
    "keras": "keras",
    "tensorflow": "keras-tf",
    "jax": "keras-jax",
    "xgboost": "xgboost-cpu",
    "s3fs": "s3",
}

logger = logging.getLogger("tensortap")

#: The error handler that standard output and error take while a command runs where theirs would raise
#: (an ASCII locale, ``PYTHONIOENCODING=ascii``): see :func:`escaping_unencodable`.
ESCAPE_ERRORS = "tensortap.escape"


# ------------------------------------------------------------------ output
def _escape_unencodable(exc: UnicodeError) -> tuple[str | bytes, int]:
    """:data:`ESCAPE_ERRORS`: the bytes that surrogate escapes stand for (an undecodable path given in the command
    line, written back as it was), any other character the encoding cannot hold as a backslash escape (``\\xe9``)."""
    try:
        return codecs.lookup_error("surrogateescape")(exc)
    except UnicodeError:
        return codecs.backslashreplace_errors(exc)


codecs.register_error(ESCAPE_ERRORS, _escape_unencodable)


@contextlib.contextmanager
def escaping_unencodable() -> Iterator[None]:
    """Let standard output and error write any text while a command runs.

    A stream whose error handler would raise ``UnicodeEncodeError`` for a character its encoding cannot
    hold (``strict``, or ``surrogateescape`` in an ASCII locale) takes :data:`ESCAPE_ERRORS` instead:
    a tensor name ``größe`` prints as ``gr\\xf6\\xdfe`` on an ASCII terminal. ``--json`` is ASCII anyway. The
    streams get their handlers back afterwards, so that ``main`` called in a program leaves them as they were.
    """
    changed = [
        (stream, stream.errors)
        for stream in (sys.stdout, sys.stderr)
        if isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "surrogateescape")
    ]
    for stream, _ in changed:
        stream.reconfigure(errors=ESCAPE_ERRORS)
    try:
        yield
    finally:
        for stream, errors in changed:
            with contextlib.suppress(OSError, ValueError):  # reconfigure flushes: a stream gone or closed
                stream.reconfigure(errors=errors)


def columns(text: str, encoding: str = "utf-8") -> int:
    """How many columns of a terminal ``text`` takes once written in ``encoding``: an East Asian wide or
    full-width character two, a combining character none, a character ``encoding`` cannot hold as many as
    its escape (:data:`ESCAPE_ERRORS`), any other one."""
    if text.isascii():
        return len(text)
    width = 0
    for char in text:
        try:
            char.encode(encoding)
        except UnicodeEncodeError:
            width += len(char.encode(encoding, ESCAPE_ERRORS))
            continue
        width += 0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
    return width


class Style:
    """ANSI colour on a terminal only, never when ``NO_COLOR`` is set (https://no-color.org)."""

    CODES = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "dim": "2"}

    def __init__(self, stream: Any) -> None:
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.enabled = bool(tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")

    def __call__(self, text: str, style: str) -> str:
        """``text`` in ``style`` (a key of :attr:`CODES`), or plain."""
        return f"\033[{self.CODES[style]}m{text}\033[0m" if self.enabled else text


def fmt(value: Any, digits: int = 4) -> str:
    """A number to ``digits`` significant digits (integers in full); anything else as ``str``."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}g}"
    return str(value)


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: arrays and NumPy scalars become lists and numbers, a complex
    number ``{"real": ..., "imag": ...}``, and the non-finite floats the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, complex):
        return {"real": json_safe(value.real), "imag": json_safe(value.imag)}
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def print_json(value: Any) -> None:
    """Print ``value`` as JSON (never a ``NaN`` or ``Infinity`` literal: see :func:`json_safe`)."""
    print(json.dumps(json_safe(value), indent=2, allow_nan=False))


class Toned(NamedTuple):
    """A cell of :func:`table` escaped already (a trial's status, :func:`~tensortap.trial.views.status_summary`),
    in the colour of ``tone`` (:data:`STATUS_COLOURS`) on a terminal."""

    text: str
    tone: str


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], style: Style | None = None) -> str:
    """A plain text table with a rule under the header; numbers to significant digits, control
    characters escaped (:func:`printable`; a :class:`Toned` cell is escaped already), a cell longer than
    :data:`~tensortap.trial.views.MAX_TEXT` characters cut as plots cut it
    (:func:`~tensortap.trial.views.shortened`: one name of 3,000 characters made every row as wide); columns
    aligned on a terminal (:func:`columns`: wide characters, and those standard output writes as escapes,
    count as wide as they print); :class:`Toned` cells coloured by ``style``, where given."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    cells = [[printable(str(c)) for c in header]] + [
        [shortened(c.text if isinstance(c, Toned) else printable(fmt(c))) for c in r] for r in rows
    ]
    sized = [[(c, columns(c, encoding)) for c in r] for r in cells]
    widths = [max(r[i][1] for r in sized) for i in range(len(header))]
    if style is not None:  # colour after the widths are measured: its codes take no column
        tones = [[None] * len(header)] + [[c.tone if isinstance(c, Toned) else None for c in r] for r in rows]
        sized = [
            [(style(c, STATUS_COLOURS[t]) if t else c, n) for (c, n), t in zip(r, ts, strict=True)]
            for r, ts in zip(sized, tones, strict=True)
        ]
    lines = ["  ".join(c + " " * (w - n) for (c, n), w in zip(r, widths, strict=True)).rstrip() for r in sized]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def step_ranges(steps: Iterable[int], saved: Sequence[int] | None = None, limit: int = 8) -> str:
    """``"17-19, 40"``: runs of consecutive steps joined into ranges.

    Steps are consecutive when nothing lies between them in ``saved`` (the
    saved steps, so every 10th step saved reads ``0-90``), else when they
    differ by one. More than ``limit`` runs are shortened with ``...``.
    """
    order = {s: i for i, s in enumerate(saved)} if saved is not None else None
    runs: list[list[int]] = []
    for s in sorted(set(steps)):
        if runs:
            last = runs[-1][-1]
            adjacent = order[s] == order[last] + 1 if order and s in order and last in order else s == last + 1
            if adjacent:
                runs[-1].append(s)
                continue
        runs.append([s])
    text = [f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
    if len(text) > limit:
        text = [*text[: limit - 2], "...", *text[-2:]]
    return ", ".join(text)


def count(n: int, noun: str) -> str:
    """``"1 step"``, ``"4 steps"``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _steps_summary(steps: Sequence[int], saved: Sequence[int]) -> str:
    """``"0-10 (6 steps)"``: ``steps`` as :func:`step_ranges` of the ``saved`` steps (every other step saved
    reads as one range), and how many; ``"none"``."""
    return f"{step_ranges(steps, saved)} ({count(len(steps), 'step')})" if steps else "none"


# ---------------------------------------------------------------- errors
class _UsageExit(SystemExit):
    """argparse's exit on a usage error (status 2), with the message it printed."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors keep their message (for the ``--json`` error object)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``PROG: error: message`` on stderr; exit 2."""
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        print(text, file=sys.stderr)
        raise _UsageExit(text)


#: ``--json``'s ``error.kind`` by exception, the first that matches (else ``input``, or ``unexpected``).
ERROR_KINDS: list[tuple[type[BaseException], str]] = [
    (UsageError, "usage"),
    (StorageOptionsError, "usage"),  # --storage-options that the URL's plugin does not take
    (ImportError, "missing_dependency"),
    (TrialNotFound, "not_found"),
    (UnknownName, "unknown_name"),
    (TensorUnavailable, "unknown_name"),
    (StorageUnreachable, "storage"),
]


def error_json(command: str | None, message: str, kind: str) -> dict[str, Any]:
    """What a ``--json`` command prints on stdout when it exits 2: one object, never nothing.

    Parameters
    ----------
    command
        The subcommand (``show``), or ``None`` when it could not be parsed.
    message
        The message also printed on stderr (without the ``tensortap COMMAND:`` prefix).
    kind
        ``usage``, ``not_found``, ``unknown_name``, ``storage`` (not reached: no connection, no
        credentials), ``missing_dependency``, ``input`` (unreadable or
        wrong input), ``unexpected`` (see :data:`ERROR_KINDS`) or ``interrupted`` (a Ctrl-C; exit 130).

    Returns
    -------
    dict
        ``{"error": {"command": ..., "kind": ..., "message": ...}}``.
    """
    return {"error": {"command": command, "kind": kind, "message": message}}


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for ``--json`` (or an abbreviation argparse accepts), before a ``--``."""
    for a in argv:
        if a == "--":
            return False
        if len(a) > 3 and "--json".startswith(a):
            return True
    return False


# ------------------------------------------------------------- arguments
def storage_options(text: str) -> dict[str, Any]:
    """Parse ``--storage-options``: a JSON object (never eval'd)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_trial_arguments(parser: argparse.ArgumentParser, path_nargs: str | None = None) -> None:
    """The trial's path and, for object storage, its fsspec options (every subcommand takes them)."""
    parser.add_argument("path", nargs=path_nargs, help="trial directory or URL (s3://bucket/prefix, ...)")
    parser.add_argument(
        "--storage-options",
        type=storage_options,
        default={},
        metavar="JSON",
        help='fsspec options for URLs, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
    )


def add_mode_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--mode``: a mode's name in any case (``eval``, ``EVAL``), as :meth:`Mode.parse` takes it."""
    parser.add_argument("--mode", type=str.lower, choices=[m.name.lower() for m in Mode], help=help)


def add_json_argument(parser: argparse.ArgumentParser, schema: str = "docs/trial.md") -> None:
    """``--json``: the command's result as one JSON object on standard output (:func:`print_json`)."""
    parser.add_argument("--json", action="store_true", help=f"machine-readable output (schema: {schema})")


def add_verbosity_arguments(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """``-v`` (repeatable) and ``-q``; only the top-level parser sets defaults, so both places work."""
    kw: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="count", help="more diagnostics on stderr (-vv: debug)", **({"default": 0} | kw)
    )
    group.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr", **({"default": False} | kw))


def open_trial(args: argparse.Namespace, **kwargs: Any) -> Trial:
    """The trial at ``args.path``; :class:`TrialNotFound` (exit 2) if no trial is there."""
    return create_trial(args.path, storage_options=args.storage_options, **kwargs)


# --------------------------------------------------------------------- ls
def _last_loss(trial: Trial) -> dict[str, Any] | None:
    """The last saved value of the trial's first loss (``losses/loss`` first), or None."""
    names = trial.tensor_names(collection="losses") if "losses" in trial.collections() else []
    if not names:
        return None
    name = "losses/loss" if "losses/loss" in names else names[0]
    tensor = trial.tensor(name)
    for step in reversed(tensor.steps()):
        try:
            if tensor.has_raw(step):
                value = float(np.mean(tensor.value(step)))
            else:
                value = tensor.reduction_value(step, "mean")
        except TensortapError:
            continue
        return {"name": name, "step": step, "value": value}
    return None


def _trials_overview(path: str, options: dict[str, Any], found: Sequence[str]) -> list[tuple[dict[str, Any], Toned]]:
    """Each trial of the folder ``path`` (``found``, relative to it): its row of ``ls --json``, and its status as
    ``ls`` of the trial says it (:func:`status_summary`; ``newer format`` for one a newer tensortap wrote)."""
    rows = []
    base = path.rstrip("/")
    for rel in found:
        try:
            trial = create_trial(f"{base}/{rel}", storage_options=options)
        except TrialTooNew as exc:  # listed as such: the others are still listed
            logger.warning("tensortap: %s", exc)
            unread = dict.fromkeys(("framework", "workers", "steps", "last_step", "ended", "end_reasons", "last_loss"))
            rows.append(
                ({"name": rel, "path": f"{base}/{rel}", **unread, "error": str(exc)}, Toned("newer format", "wait"))
            )
            continue
        frameworks = {str(w.info.get("framework") or "") for w in trial._index.workers.values()}
        steps = trial.steps()
        row = {
            "name": rel,
            "path": trial.path,
            "framework": ",".join(sorted(f for f in frameworks if f)) or None,
            "workers": len(trial.workers()),
            "steps": len(steps),
            "last_step": steps[-1] if steps else None,
            "ended": trial.training_ended,
            "end_reasons": trial.end_reasons(),
            "last_loss": _last_loss(trial),
            "error": None,
        }
        rows.append((row, Toned(*status_summary(trial))))
        trial.close()
    return rows


def _ls_parent(args: argparse.Namespace, found: Sequence[str]) -> int:
    rows = _trials_overview(args.path, args.storage_options, found)
    if args.json:
        print_json({"path": args.path, "trials": [row for row, _ in rows]})
        return EXIT_OK
    style = Style(sys.stdout)
    print(f"{style(printable(args.path), 'bold')} is not a trial; it holds {count(len(rows), 'trial')}:")
    print()
    lines = []
    for r, status in rows:
        loss = r["last_loss"]
        lines.append(
            (
                r["name"],
                r["framework"] or "-",
                "-" if r["steps"] is None else r["steps"],
                status,
                "-" if loss is None else f"{fmt(loss['value'])} ({loss['name']} at step {loss['step']})",
            )
        )
    print(table(lines, ("trial", "framework", "steps", "status", "last loss"), style))
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    """Print workers, modes, steps and tensors of a trial (or the trials in a folder that holds several)."""
    try:
        trial = open_trial(args)
    except TrialNotFound as exc:
        if not exc.trials_below:
            raise
        given = [f"--{option}" for option in ("collection", "regex") if getattr(args, option) is not None]
        if given:  # the listing of a folder has no tensors to select
            raise UsageError(
                f"{' and '.join(given)} {'select' if len(given) > 1 else 'selects'} tensors of one trial; "
                f"{args.path} is a folder of "
                f"{count(len(exc.trials_below), 'trial')}: give one of them, e.g. "
                f"{args.path.rstrip('/')}/{exc.trials_below[0]}"
            ) from None
        return _ls_parent(args, exc.trials_below)
    names = trial.tensor_names(collection=args.collection, regex=args.regex)
    runs = run_folders(trial.storage)  # later runs of if_exists="new_run": trials of their own
    if args.json:
        print_json(
            {
                "path": trial.path,
                "runs": runs,
                "workers": trial.workers(),
                "training_ended": trial.training_ended,
                "end_reasons": trial.end_reasons(),
                "modes": {m.name: trial.steps(mode=m) for m in trial.modes()},
                "steps": trial.steps(show_incomplete=True),
                "complete_steps": trial.steps(),
                "tensors": {n: trial.tensor(n).summary() for n in names},
            }
        )
        return EXIT_OK
    style = Style(sys.stdout)
    status = ": ".join(style(text, STATUS_COLOURS[tone]) for text, tone in status_parts(trial))
    print(f"trial    {style(printable(trial.path), 'bold')}")
    print(f"workers  {printable(first_named(trial.workers())) or 'none'}  [{status}]")
    for m in trial.modes():
        mode_steps = trial.steps(mode=m)
        print(f"{m.name.lower():8} {_steps_summary(mode_steps, mode_steps)}")
    complete, saved = trial.steps(), trial.steps(show_incomplete=True)
    incomplete = len(saved) - len(complete)
    print(f"steps    {_steps_summary(complete, saved)}" + (f" (+{incomplete} incomplete)" if incomplete else ""))
    if runs:
        more = len(runs) - MAX_RUNS_NAMED
        named = printable(", ".join(runs[:MAX_RUNS_NAMED])) + (f" and {more} more" if more > 0 else "")
        first = printable(f"{trial.path.rstrip('/')}/{runs[0]}")
        print(f"runs     {named}: later runs in this folder, each a trial (tensortap ls {first})")
    rows = []
    for n in names:
        info = trial.tensor(n).summary()
        shape = info["shape"]
        shape_text = "-" if shape is None else "x".join(map(str, shape)) or "()"
        dtype = info["dtype"] or "reductions only"
        if info["orig_dtype"]:
            dtype += f" (from {info['orig_dtype']})"
        rows.append((n, ",".join(info["collections"]), dtype, shape_text, info["steps"]))
    print()
    print(table(rows, ("tensor", "collections", "dtype", "shape", "steps")) if rows else "no tensors")
    return EXIT_OK


# ------------------------------------------------------------------- show
def array_summary(value: np.ndarray, orig_dtype: str | None = None) -> dict[str, Any]:
    """Dtype (and ``orig_dtype``, the framework's dtype it was converted from, or None), shape and size;
    for a numeric dtype also min, mean and max of the finite elements (None where there are none; of the
    magnitudes ``|z|`` for complex, as the reductions; integers' min and max exact, in their own dtype)
    and the NaN and infinite counts."""
    data = np.asarray(value)
    out: dict[str, Any] = {"dtype": str(data.dtype), "orig_dtype": orig_dtype, "shape": list(data.shape)}
    out["size"] = int(data.size)
    if data.dtype.kind not in "biufc":
        return out
    convert: Callable[[Any], float | int]
    if data.dtype.kind in "iu":  # all finite, their min and max exact (float64 rounds above 2**53)
        finite, convert = data, int
    else:
        as_float = (np.abs(data) if data.dtype.kind == "c" else data).astype(np.float64, copy=False)
        finite, convert = as_float[np.isfinite(as_float)], float
    out["min"] = convert(finite.min()) if finite.size else None
    with np.errstate(over="ignore"):  # values near the largest float64: their sum overflows
        mean = float(finite.mean(dtype=np.float64)) if finite.size else None
    if mean is not None and not math.isfinite(mean):
        mean = float(np.sum(finite / finite.size))  # each term at most the largest / n: no overflow
    out["mean"] = mean
    out["max"] = convert(finite.max()) if finite.size else None
    out["nan_count"] = int(np.isnan(data).sum())
    out["inf_count"] = int(np.isinf(data).sum())
    return out


def summary_text(summary: dict[str, Any]) -> str:
    """One line of :func:`array_summary`: ``float32 (5,) min -10 mean 6.667 max 25 nan 1 inf 1``
    (``float32 (from bfloat16) (5,) ...`` for a converted dtype; ``|z| min`` ... for complex); an array
    without elements says ``no values``, one of NaNs alone ``all NaN (4 values)``, one without a finite
    element otherwise ``no finite value: nan 1 inf 2``."""
    dtype = summary["dtype"] + (f" (from {summary['orig_dtype']})" if summary.get("orig_dtype") else "")
    head = f"{dtype} {tuple(summary['shape'])}"
    counts = f"nan {summary['nan_count']} inf {summary['inf_count']}" if "nan_count" in summary else ""
    if summary["size"] == 0:
        return f"{head} no values"
    if "min" not in summary:
        return head  # not a number (bytes, strings): no min, mean or max
    if summary["min"] is None:
        if summary["nan_count"] == summary["size"]:
            return f"{head} all NaN ({count(summary['size'], 'value')})"
        return f"{head} no finite value: {counts}"
    of = "|z| " if np.dtype(summary["dtype"]).kind == "c" else ""
    return f"{head} {of}" + " ".join(f"{k} {fmt(summary[k])}" for k in ("min", "mean", "max")) + f" {counts}"


def _show_entry(tensor: Any, step: int, mode: Mode | None, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``show``'s entry (for ``--json``) and text for ``tensor`` at ``step``: with ``--reduction`` that
    reduction; where only reductions were saved, each of them (``reductions``); else the value."""
    entry: dict[str, Any] = {"step": step}
    if args.reduction:
        name, absolute = split_key(args.reduction)
        entry["value"] = tensor.reduction_value(step, name, abs=absolute, mode=mode, worker=args.worker)
        return entry, fmt(entry["value"], 6)
    saved = tensor.available_reductions(step, mode, args.worker)
    if saved and not tensor.has_raw(step, mode, args.worker):  # a ReductionConfig without save_raw_tensor
        entry["reductions"] = {
            key: tensor.reduction_value(step, *split_key(key), mode=mode, worker=args.worker) for key in saved
        }
        return entry, "reductions only: " + " ".join(f"{k} {fmt(v, 6)}" for k, v in entry["reductions"].items())
    value = np.asarray(tensor.value(step, mode=mode, worker=args.worker))
    if value.size == 1 and value.dtype.kind in "biuf":
        entry["value"] = value.reshape(()).item()
        return entry, fmt(entry["value"], 6)
    entry.update(array_summary(value, tensor.summary()["orig_dtype"]))
    text = summary_text(entry)
    if args.full:
        entry["value"] = value
        with np.printoptions(threshold=sys.maxsize, linewidth=120):
            text += "\n" + np.array2string(value)
    return entry, text


def _mode_step_text(trial: Trial, step: int) -> str:
    """`` (eval step 0)``: the mode step of global ``step``; empty where it is a TRAIN step of the same number."""
    found = trial.mode_step(step)
    if found is None or found == (Mode.TRAIN, step):
        return ""
    return f" ({found[0].name.lower()} step {found[1]})"


def _show_steps(tensor: Any, mode: Mode | None, worker: str | None) -> list[int]:
    """The steps ``show`` prints without ``--step``: those of ``mode`` (every step without), those that
    ``worker`` saved when it is given; :class:`TensorUnavailableForStep` saying why when there are none."""
    steps = tensor.steps(mode, worker)  # an unknown worker: UnknownName
    if steps:
        return steps
    where = f"no {step_word(mode)}"
    if worker is not None:
        where += f" saved by worker {worker!r} (workers: {', '.join(tensor.trial.workers())})"
    elif (waiting := waiting_note(tensor, mode)) is not None:  # saved, but not by every worker yet
        raise TensorUnavailableForStep(waiting)
    saved = [
        f"{m.name.lower()} steps {_steps_summary(s, tensor.trial.steps(mode=m))}"
        for m in Mode
        if (s := tensor.steps(m))
    ]
    raise TensorUnavailableForStep(
        f"{tensor.name!r} has {where}" + (f"; it was saved at {', '.join(saved)}" if saved else "")
    )


@contextlib.contextmanager
def _shard_named_once() -> Iterator[None]:
    """Name a damaged shard once: what the ``tensortap`` logger says in the block is held back and said after
    it, but for what names the shard that a :class:`ShardUnreadable` the block raises names (its message
    says which shard and why, as the reader's warning about that shard did)."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    named = ""
    logger.addFilter(hold)
    try:
        yield
    except ShardUnreadable as exc:
        named = exc.shard
        raise
    finally:
        logger.removeFilter(hold)
        for record in held:
            if not named or named not in record.getMessage():
                logger.handle(record)


def cmd_show(args: argparse.Namespace) -> int:
    """Print one tensor at one step or every step: a scalar, a summary of an array, or a reduction.

    Over every step, a step whose shard cannot be read (damaged: the reader warns, naming it) is
    skipped and the others are shown; a warning lists the skipped steps, ``--json`` gives them as
    ``skipped_steps``. One ``--step`` that cannot be read, or no step readable at all, is an error; for
    ``--step`` the error alone names the shard and why (:func:`_shard_named_once`).
    """
    if args.full and args.reduction:
        logger.warning("tensortap show: --reduction shows one number a step: --full ignored")
    trial = open_trial(args)
    tensor = trial.tensor(args.name)
    mode = Mode.parse(args.mode) if args.mode else None
    steps = [args.step] if args.step is not None else _show_steps(tensor, mode, args.worker)
    entries: list[dict[str, Any]] = []
    skipped: list[int] = []
    style = Style(sys.stdout)
    for s in steps:
        try:
            with _shard_named_once() if args.step is not None else contextlib.nullcontext():
                entry, text = _show_entry(tensor, s, mode, args)
        except ShardUnreadable:
            if args.step is not None:
                raise
            skipped.append(s)
            continue
        entries.append(entry)
        if not args.json:
            label = style(f"step {s}" + (f" ({mode.name.lower()})" if mode else _mode_step_text(trial, s)), "bold")
            lines = text.split("\n")  # --full: the array's lines after the summary
            print(f"{label}: " + "\n".join(printable(line) for line in lines))
    if skipped:
        logger.warning(
            "tensortap show: %s skipped at %s: their shards cannot be read",
            count(len(skipped), "step"),
            step_ranges(skipped, steps),
        )
        if not entries:
            raise ShardUnreadable(f"no step of {args.name!r} could be read: the shards of every step are damaged")
    if args.json:
        print_json(
            {
                "path": trial.path,
                "tensor": args.name,
                "mode": mode.name if mode else None,
                "reduction": args.reduction,
                "worker": args.worker,
                "steps": entries,
                "skipped_steps": skipped,
            }
        )
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Report unreadable files and workers of an import that failed (:func:`storage_problems`); exit 1 when
    there are any. Say which workers wrote no end marker (still running, stopped where no reader can tell, or
    killed), which does not make it fail."""
    trial = open_trial(args)  # once: the workers said unended are those of the storage checked
    problems = storage_problems(trial.storage)
    running = sorted(set(trial.workers()) - set(trial.end_reasons()))
    killed = killed_workers(trial)  # no end marker either
    unended = sorted(running + killed)
    if args.json:
        print_json({"path": args.path, "ok": not problems, "problems": problems, "unended_workers": unended})
        return EXIT_FOUND if problems else EXIT_OK
    for p in problems:
        print(printable(p, message=True))
    if running:
        print(
            f"note: {printable(first_named(running))} wrote no end marker: the training is still running, or it "
            "stopped without one (killed, or a machine lost; a reader on its machine would say killed)"
        )
    if killed:
        print(
            f"note: {killed_note(killed)}: its process ended without writing its end marker; the steps it had not "
            "published are lost"
        )
    if problems:
        logger.warning("tensortap: %d problem(s) found in %s", len(problems), args.path)
        return EXIT_FOUND
    print(f"ok: no problems in {printable(args.path)}")
    return EXIT_OK


# ---------------------------------------------------------------- parsers
def add_ls_parser(sub: Any) -> argparse.ArgumentParser:
    """``tensortap ls``."""
    p = sub.add_parser(
        "ls",
        help="list workers, modes, steps and tensors of a trial (or the trials in a folder)",
        description="List a trial; on a folder that holds several trials, list them.",
    )
    add_trial_arguments(p)
    p.add_argument("--collection", help="only tensors of this collection")
    p.add_argument("--regex", help="only tensors whose name matches")
    add_json_argument(p)
    p.set_defaults(func=cmd_ls)
    return p


def add_show_parser(sub: Any) -> argparse.ArgumentParser:
    """``tensortap show``."""
    p = sub.add_parser("show", help="print a tensor's values (a summary of arrays) or reductions")
    add_trial_arguments(p)
    p.add_argument("name", help="tensor name (see `tensortap ls`)")
    p.add_argument("--step", type=int, help="only this step (default: every step)")
    add_mode_argument(p, "interpret --step as a step of this mode")
    p.add_argument("--reduction", help="print a reduction instead of the value, e.g. mean, abs_max, l2, nan_count")
    p.add_argument("--worker", help="worker to read (default: the first)")
    p.add_argument("--full", action="store_true", help="print every element of arrays, not only a summary")
    add_json_argument(p)
    p.set_defaults(func=cmd_show)
    return p


def add_check_parser(sub: Any) -> argparse.ArgumentParser:
    """``tensortap check``."""
    p = sub.add_parser("check", help="find unreadable shards and records, and half imports; exit 1 if any")
    add_trial_arguments(p)
    add_json_argument(p)
    p.set_defaults(func=cmd_check)
    return p


PARSERS: list[Callable[[Any], argparse.ArgumentParser]] = [
    add_ls_parser,
    add_show_parser,
    add_check_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tensortap`` command (every subcommand takes ``-v``/``-q``)."""
    parser = _Parser(
        prog="tensortap",
        description="Inspect and judge tensortap trials. Exit status: 0 ok, 1 a rule fired or check found "
        "problems, 2 usage or input error (no trial at the path, unknown name, rule inputs missing).",
    )
    parser.add_argument("--version", action="version", version=f"tensortap {__version__}")
    add_verbosity_arguments(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders = list(PARSERS)
    for module in COMMAND_MODULES:
        adders.extend(importlib.import_module(f".{module}", __package__).PARSERS)
    for add in adders:
        add_verbosity_arguments(add(sub), defaults=False)
    return parser


# ------------------------------------------------------------------- main
class _Formatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        text = printable(super().formatMessage(record), message=True)  # names of a stranger's trial in warnings
        return text if text.startswith("tensortap") else f"tensortap: {text}"


@contextlib.contextmanager
def logging_to_stderr(verbose: int, quiet: bool) -> Iterator[None]:
    """Send the ``tensortap`` logger to stderr while a command runs: warnings (default), errors only (-q),
    info (-v), debug (-vv). Its handlers, level and propagation come back afterwards, so that ``main``
    called in a program (a notebook, a test) leaves that program's logging as it was."""
    saved = (logger.handlers[:], logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))
    logger.propagate = False
    try:
        yield
    finally:
        handlers, level, logger.propagate = saved
        logger.handlers = handlers
        logger.setLevel(level)  # not `.level =`: setLevel also clears the loggers' cached levels
        handler.flush()


def missing_dependency_hint(exc: ImportError) -> str:
    """``exc``'s message, with the ``pip install "tensortap[...]"`` that installs the missing module."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return str(exc)
    return f'this needs {module}, which is not installed: pip install "tensortap[{extra}]"'


def _stdout_gone() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    A Ctrl-C is an interruption (:func:`interrupted`) from the moment this runs, also while the subcommands'
    modules are still being imported; output is written whatever the streams' encoding (:func:`escaping_unencodable`).
    """
    command: str | None = None  # known once the command line is parsed
    if sys.stdout is None:  # file descriptor 1 closed (`>&-`): Python gives no stream, print() writes nothing
        print("tensortap: standard output is closed: give the command one (> FILE, > /dev/null)", file=sys.stderr)
        return EXIT_USAGE
    with escaping_unencodable():
        try:
            parser = build_parser()
            argv = sys.argv[1:] if argv is None else list(argv)
            try:
                args = parser.parse_args(argv)
                if args.verbose and args.quiet:  # one before the subcommand, one after: each parser saw one
                    parser.error("argument -v/--verbose: not allowed with argument -q/--quiet")
            except _UsageExit as exc:
                if _wants_json(argv):
                    named = next((a for a in argv if a in parser_commands(parser)), None)
                    _print_error_json(named, exc.message, "usage")
                raise
            command = args.command
            with logging_to_stderr(args.verbose or 0, args.quiet):
                return _run(args)
        except KeyboardInterrupt:
            return interrupted(command, _wants_json(sys.argv[1:] if argv is None else argv))


def parser_commands(parser: argparse.ArgumentParser) -> list[str]:
    """The names of the subcommands of ``parser``."""
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


def usage_after_output(command: str, message: str) -> int:
    """Exit 2 after ``command`` printed its result (``--json``: its object is the one on stdout, with the
    :func:`error_json` member): ``message`` on stderr."""
    print(f"tensortap {command}: {printable(message, message=True)}", file=sys.stderr)
    return EXIT_USAGE


def _print_error_json(command: str | None, message: str, kind: str) -> None:
    """Print :func:`error_json` on stdout, unless stdout cannot be written (the error may be that very
    write: a full disk, ``> /dev/full``, a closed pipe): then nothing more, and stdout is sent to
    /dev/null so that the interpreter's last flush does not fail again (a second traceback, exit 1)."""
    try:
        print_json(error_json(command, message, kind))
        sys.stdout.flush()
    except OSError:  # BrokenPipeError too: the stderr line said what went wrong
        _stdout_gone()


def _fail(args: argparse.Namespace, exc: BaseException, message: str, kind: str | None = None) -> int:
    """Report an error (one line on stderr; with ``--json`` also :func:`error_json` on stdout, where it can
    still be written); exit 2."""
    print(f"tensortap {args.command}: {printable(message, message=True)}", file=sys.stderr)
    if getattr(args, "json", False):
        if kind is None:
            kind = next((k for cls, k in ERROR_KINDS if isinstance(exc, cls)), "input")
        _print_error_json(args.command, message, kind)
    return EXIT_USAGE


def _by_ctrl_c(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a Ctrl-C was being handled: a ``KeyboardInterrupt`` that lands in
    a lock's ``with`` block of the standard library (``Condition.wait``) turns into ``RuntimeError('cannot
    release un-acquired lock')`` with the interrupt as its context."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; return the exit status (user errors: a one-line message on stderr)."""
    try:
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_PIPE
    except Exception as exc:
        if not _by_ctrl_c(exc):
            return _error(args, exc)
    except KeyboardInterrupt:
        pass
    return interrupted(args.command, getattr(args, "json", False))


def interrupted(command: str | None, json: bool) -> int:
    """Say on stderr that ``command`` (None: before the command line was parsed) was interrupted, with
    ``json`` also on stdout (:func:`error_json`, kind ``interrupted``); exit 130."""
    print(f"tensortap{f' {command}' if command else ''}: interrupted", file=sys.stderr)
    if json:
        _print_error_json(command, "interrupted", "interrupted")
    return EXIT_INTERRUPTED


def _error(args: argparse.Namespace, exc: Exception) -> int:
    """The exit status of a command that raised ``exc`` (not a Ctrl-C): one line on stderr, exit 2."""
    if isinstance(exc, ImportError):
        return _fail(args, exc, missing_dependency_hint(exc))
    if isinstance(exc, (UsageError, TensortapError, OSError, ValueError, KeyError)):
        message = str(exc) if not isinstance(exc, KeyError) or isinstance(exc, TensortapError) else exc.args[0]
        return _fail(args, exc, str(message))
    # unreadable input from a stranger, or a bug: still exit 2, never 1
    logger.info("tensortap %s: the error's traceback", args.command, exc_info=exc)
    hint = "" if logger.isEnabledFor(logging.INFO) else " (-v shows the traceback)"
    return _fail(args, exc, f"unexpected error: {exc!r}{hint}", "unexpected")


if __name__ == "__main__":
    sys.exit(main())
