"""Trial and Tensor: query a trial's tensors, live or offline."""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import functools
import logging
import math
import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

from .. import reductions as red
from ..backends import layout
from ..backends import storage as storage_module
from ..backends.registry import get_storage
from ..backends.shard import RawSource
from ..backends.storage import Storage
from ..config import Collection
from ..exceptions import (
    NoMoreData,
    ShardUnreadable,
    StepNotYetAvailable,
    StepUnavailable,
    TensortapError,
    TensorUnavailable,
    TensorUnavailableForStep,
    TrialNotFound,
    TrialTooNew,
    UnknownName,
    no_attribute,
    suggest,
)
from ..modes import Mode, StepState, step_label, step_word
from .index import READS_AT_ONCE, Location, TensorInfo, TrialIndex, in_background

if TYPE_CHECKING:
    import pandas
    from matplotlib.axes import Axes

    from .plot import XAxis

logger = logging.getLogger("tensortap")

REFRESH_SECONDS = 0.25
WAIT_POLL_SECONDS = 0.1
SEARCH_DEPTH = 3  # folders below a path searched for trials when it holds none
SEARCH_FOLDERS = 2000  # at most this many folders looked into
# a tensor's raw values in one shard by step, and the one stacked array they are rows of (if read so)
_RawValues: TypeAlias = tuple[dict[int, np.ndarray], tuple[dict[int, int], np.ndarray] | None]


def is_trial(storage: Storage, prefix: str = "") -> bool:
    """Whether ``storage`` (its folder ``prefix``, a relative key or ``""``) holds a tensortap trial.

    A trial is told apart from any other folder by its marker files.
    The markers are what a writer creates before any data: a worker record
    (``workers/<worker>.json``, written when a worker starts), an index folder
    (``index/<worker>/``) or an end marker (``end/<worker>.json``). A folder
    with none of them (empty, or holding other things) is not a trial.
    """

    def key(folder: str) -> str:
        return f"{prefix}/{folder}" if prefix else folder

    return (
        any(k.endswith(".json") for k in storage.list(key(layout.WORKERS)))
        or bool(storage.list_dirs(key(layout.INDEX)))
        or any(k.endswith(".json") for k in storage.list(key(layout.ENDS)))
    )


def run_folders(storage: Storage, prefix: str = "") -> list[str]:
    """The run folders ``run-<n>`` directly in the trial folder ``prefix`` of ``storage`` that hold a trial (the
    later runs a hook with ``if_exists="new_run"`` wrote there), by run number; names relative to ``prefix``."""
    runs = sorted((n, name) for name in storage.list_dirs(prefix) if (n := layout.run_number(name)) is not None)
    keys = [(name, f"{prefix}/{name}" if prefix else name) for _, name in runs]
    return [name for name, key in keys if storage.leads_outside(key) is None and is_trial(storage, key)]


def find_trials(storage: Storage, depth: int = SEARCH_DEPTH) -> list[str]:
    """Folders below ``storage`` (up to ``depth`` levels) that hold a trial, relative to it, sorted; after
    each trial, its run folders (:func:`run_folders`).

    The search does not go into trials (but for their run folders, one level), nor follow a link out of
    ``storage`` (the folder may be a stranger's: such a link is named in one warning), nor into a folder whose
    name a trial's paths may not have (``:`` of a timestamp: named in one warning), and looks into at
    most ``SEARCH_FOLDERS`` folders (a path given by mistake may be a large tree).
    """
    found: dict[str, list[str]] = {}  # trial: its run folders
    level, visited = [""], 0
    for _ in range(depth):
        below: list[str] = []
        for prefix in level:
            for name in storage.list_dirs(prefix):
                if visited >= SEARCH_FOLDERS:
                    return _with_runs(found)
                visited += 1
                key = f"{prefix}/{name}" if prefix else name
                if (why := layout.name_fault(name)) is not None:  # a folder of the user's, as a run's timestamp
                    logger.warning(
                        "tensortap: %s/%s not searched: its name %s, which no path in a trial may; give its path to "
                        "read a trial there",
                        storage.url,
                        key,
                        why,
                    )
                elif (real := storage.leads_outside(key)) is not None:
                    logger.warning(
                        "tensortap: %s/%s not searched: a link that leads outside it (to %s)", storage.url, key, real
                    )
                elif is_trial(storage, key):
                    found[key] = run_folders(storage, key)
                    visited += len(found[key])
                else:
                    below.append(key)
        level = below
    return _with_runs(found)


def _with_runs(found: Mapping[str, Sequence[str]]) -> list[str]:
    """The trials of ``found`` (``{trial: its run folders}``), sorted, each followed by its run folders."""
    return [key for trial in sorted(found) for key in (trial, *(f"{trial}/{run}" for run in found[trial]))]


def trial_storage(path: str | os.PathLike[str] | Storage, **options: Any) -> Storage:
    """The storage of the trial at ``path`` (see :func:`~tensortap.backends.get_storage`).

    Raises
    ------
    TrialNotFound
        If ``path`` is empty: it names no folder (``"."`` names the current one), and is
        more likely a variable left unset than a wish to read the current folder.
    """
    if not isinstance(path, Storage) and not os.fspath(path):
        raise TrialNotFound("''", "the path is empty (give '.' for the current folder)")
    return get_storage(path, **options)


NOT_A_FOLDER = "not a trial folder"
"""How :func:`trial_problem` ends the reason for a path that is no folder (it will never become a trial)."""


def trial_problem(storage: Storage) -> TrialNotFound | None:
    """None if ``storage`` holds a trial (or is an empty folder); else the :class:`TrialNotFound` to raise.

    Its message says what is there instead, and lists the trials found below.
    """
    if is_trial(storage):
        return None
    path = storage.url
    local = "://" not in path
    if not storage.exists():
        why = "nothing exists there"
        if local and Path(path).parent.is_dir():
            siblings = [p.name for p in Path(path).parent.iterdir() if p.is_dir()]
            why += suggest(Path(path).name, siblings).replace("; did", ", did", 1)
        return TrialNotFound(path, why)
    if storage.is_file():  # on an object store, a prefix of that name with marker files is a trial (above)
        return TrialNotFound(path, f"it is a file, {NOT_A_FOLDER}")
    if local and not Path(path).is_dir():
        return TrialNotFound(path, f"it is neither a folder nor a file (a FIFO, device or socket), {NOT_A_FOLDER}")
    if not storage.list("") and not storage.list_dirs(""):
        return None  # an empty folder: a run about to start
    trials = find_trials(storage)
    markers = [f"{f}/" for f in storage.list_dirs("") if f in (layout.WORKERS, layout.INDEX, layout.ENDS)]
    if trials:
        why = "it is a folder of trials, not a trial"
    elif markers:  # their entries are all hidden (a worker named ".w"), or not a worker's
        why = f"its {', '.join(markers)} hold no worker's records (names starting with '.' are hidden and not read)"
    else:
        why = "the folder holds none of a trial's marker files (workers/, index/, end/)"
    return TrialNotFound(path, why, trials)


DEFAULT_RAW_REDUCTIONS = ("min", "max", "mean", "std", "l2")
"""Reductions exported for a raw, non-scalar tensor when none were saved and none are asked for."""


def resolve_names(
    names_or_regex: str | Sequence[str], known: Iterable[str], matching: Callable[..., list[str]], where: str
) -> list[str]:
    """The tensor names ``names_or_regex`` stands for: a list as it is, a string that is a name in ``known``, else
    the names ``matching(regex=...)`` finds for it (a ``ValueError`` for a regex that is not valid).

    Raises :class:`TensorUnavailable` (with the closest names of ``known``) when none matches, naming ``where``.
    """
    if not isinstance(names_or_regex, str):
        return list(names_or_regex)
    if names_or_regex in known:
        return [names_or_regex]
    names = matching(regex=names_or_regex)
    if not names:
        raise TensorUnavailable(f"no tensor name matches {names_or_regex!r} in {where}{suggest(names_or_regex, known)}")
    return names


def refuse_mode(step: object, order: str) -> None:
    """A TypeError when ``step`` is a :class:`Mode`: an IntEnum, so ``global_step(Mode.EVAL, 1)``
    (smdebug's order) read as step 2 of mode 1 and answered for another step. ``order`` tells the right
    call; ``{mode}`` in it stands for the mode given (``Mode.EVAL``)."""
    if isinstance(step, Mode):
        raise TypeError(
            f"step: expected a step (an integer), got Mode.{step.name}, a mode; "
            + order.format(mode=f"Mode.{step.name}")
        )


STEP_FIRST = "tensortap takes the step first, then the mode: "


def refuse_mode_as_abs(abs: object, call: str) -> None:
    """A TypeError when ``abs`` is a :class:`Mode`: smdebug's ``reduction_value(step, name, mode, worker, abs)``
    takes the mode third, where tensortap takes ``abs`` (a Mode there read as ``abs=True``)."""
    if isinstance(abs, Mode):
        raise TypeError(
            f"abs: expected True or False, got Mode.{abs.name}, a mode; tensortap's order is "
            f"{call}, abs=False, mode=None, worker=None) (a mode there read as abs=True): "
            f"pass mode=Mode.{abs.name}"
        )


def check_reduction_name(reduction: object, hint: str = "") -> None:
    """A TypeError naming the argument when ``reduction`` is not a reduction name (a string)."""
    if not isinstance(reduction, str):
        raise TypeError(f"reduction: expected a reduction name (a string, e.g. 'mean'), got {reduction!r}{hint}")


def collection_name(collection: object) -> str | None:
    """The collection name a ``collection=`` argument stands for: a name, or a :class:`Collection` (its
    name, as smdebug took it); a TypeError for anything else."""
    if collection is None or isinstance(collection, str):
        return collection
    if isinstance(collection, Collection):
        return collection.name
    raise TypeError(f"collection: expected a collection name (a string) or a Collection, got {collection!r}")


# smdebug's names of Trial and Tensor attributes that tensortap spells otherwise: the AttributeError says how
_SMDEBUG_TRIAL = {
    "has_tensor": "name in trial.tensor_names() (or trial.tensor(name), which raises TensorUnavailable)",
    "mode_modestep": "trial.mode_step(step) gives the (mode, mode step) of a global step",
    "mode": "trial.mode_step(step)[0]",
    "loaded_all_steps": "trial.training_ended",
    "num_workers": "len(trial.workers())",
    "worker_set": "set(trial.workers())",
    "maybe_refresh": "trial.refresh()",
    "refresh_data": "trial.refresh()",
    "name": "trial.path (a tensortap trial has no other name)",
    "index_mode": "nothing: tensortap always reads the trial's index; drop it",
    "inputs": "[trial.tensor(n).value(step) for n in trial.tensor_names(collection='inputs', step=step)]",
    "labels": "[trial.tensor(n).value(step) for n in trial.tensor_names(collection='labels', step=step)]",
    "predictions": "[trial.tensor(n).value(step) for n in trial.tensor_names(collection='predictions', step=step)]",
}
_SMDEBUG_TENSOR = {
    "prev_steps": (
        "[s for s in tensor.steps(mode=mode) if s <= step][-n:] (smdebug's included step itself; "
        "without n, leave out [-n:])"
    ),
    "step": "tensor.value(step), tensor.reduction_value(step, reduction), tensor.workers(step)",
}


class Trial:
    """A trial: every tensor one training run saved, from all its workers.

    Create one with :func:`create_trial`. While training runs, every query
    first looks for new data (at most every ``refresh_interval`` seconds), so
    new steps and names appear without re-creating the trial.

    Parameters
    ----------
    path
        Local directory or fsspec URL of the trial.
    wait
        Wait for the path to appear instead of raising :class:`TrialNotFound`.
    timeout
        Seconds to wait with ``wait=True`` (None: forever).
    refresh_interval
        Minimum seconds between two automatic refreshes.
    storage_options
        Passed to the storage backend (fsspec) for URLs, as :class:`~tensortap.capture.Writer` takes them.
    options
        More storage options as keyword arguments (``create_trial(url, key=..., secret=...)``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        wait: bool = False,
        timeout: float | None = None,
        refresh_interval: float = REFRESH_SECONDS,
        storage_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.storage = trial_storage(path, **{**(storage_options or {}), **options})
        self.path = self.storage.url
        deadline = None if timeout is None else time.monotonic() + timeout
        while (problem := self._problem()) is not None:
            late = deadline is not None and time.monotonic() >= deadline
            never = bool(problem.trials_below) or problem.why.endswith(NOT_A_FOLDER)
            if not wait or late or never:  # a file (FIFO, device), or a folder of trials, never becomes a trial
                raise problem
            time.sleep(WAIT_POLL_SECONDS)
        self.refresh_interval = refresh_interval
        self._index = TrialIndex(self.storage)
        self._last_refresh = -float("inf")
        self._one_view = False
        # per tensor and worker asked for (None: the first), the last shard Tensor._window read
        self._windows: dict[tuple[str, str | None], StepWindow] = {}
        self.refresh()

    def _problem(self) -> TrialNotFound | None:
        """:func:`trial_problem` of this trial's storage; TimeoutError where remote storage (of any backend)
        does not answer within :data:`~tensortap.backends.storage.ANSWER_SECONDS` (an endpoint that accepts
        connections and never answers held it more than 400 s through s3fs's own timeouts and retries)."""
        if self.storage.is_local:
            return trial_problem(self.storage)
        answer = in_background(functools.partial(trial_problem, self.storage), "open")
        limit = storage_module.ANSWER_SECONDS
        try:
            return answer.result(limit)
        except (TimeoutError, concurrent.futures.TimeoutError):  # not a TimeoutError on Python 3.10
            if answer.done():  # the storage's own bound, within this one
                raise
            raise TimeoutError(f"{self.path}: the storage did not answer within {limit:.0f} s") from None

    if not TYPE_CHECKING:  # mypy keeps checking attribute names

        def __getattr__(self, name: str) -> Any:
            raise no_attribute(f"{type(self).__name__!r} object", name, _SMDEBUG_TRIAL, "trial")

    def __repr__(self) -> str:
        from .views import trial_text

        return trial_text(self)

    def _repr_html_(self) -> str:
        from .views import trial_html

        return trial_html(self)

    # ---------------------------------------------------------------- refresh
    def refresh(self) -> None:
        """Look for new shards, workers and end markers now.

        Raises
        ------
        TrialTooNew
            A record of the trial is of a newer format version than this tensortap reads.
        """
        self._index.refresh()
        self._last_refresh = time.monotonic()
        if self._index.newer:
            raise TrialTooNew(self.path, self._index.newer)

    def _auto_refresh(self) -> None:
        if not self._one_view and time.monotonic() - self._last_refresh >= self.refresh_interval:
            self.refresh()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[Trial]:
        """``with trial.frozen(): ...``: within, the trial as it was when the block began.

        It looks for new data once, at the start, and not again inside (call :meth:`refresh` to),
        so that a read of many tensors sees one consistent trial; on remote storage that read makes
        no listing per tensor and asks each shard's metadata once (:meth:`Storage.one_view`).
        ``to_pandas``, ``export_tensorboard`` and the report read this way.
        """
        self._auto_refresh()
        outer, self._one_view = self._one_view, True
        try:
            with self.storage.one_view():
                yield self
        finally:
            self._one_view = outer

    # ------------------------------------------------------------- listings
    def workers(self) -> list[str]:
        """Names of the workers of this trial (``worker_0``, ...), sorted: those that wrote to it, and those
        that have not written anything yet of the run's world size (``world_size`` in the worker records)."""
        self._auto_refresh()
        return sorted([*self._index.workers, *self._index.awaited])

    def modes(self) -> list[Mode]:
        """Modes that have at least one saved step."""
        self._auto_refresh()
        return sorted(self._index.mode_steps)

    @property
    def training_ended(self) -> bool:
        """True once every worker of :meth:`workers` has recorded the end of its training (a worker of the
        run's world size that has not written anything yet has not)."""
        self._auto_refresh()
        return self._ended()

    def _ended(self) -> bool:
        """:attr:`training_ended` as the trial stands, without looking for new data."""
        ws = self._index.workers
        return bool(ws) and not self._index.awaited and all(w.end is not None for w in ws.values())

    def _complete_up_to(self, mode: Mode | None) -> float:
        """The last step (mode step if ``mode``) every worker has passed or ended before: the smallest
        last step the workers still running have passed (:meth:`WorkerState.passed`; -1 while one of the run's
        world size has written nothing); -inf without workers, inf once all have ended."""
        ws = self._index.workers.values()
        if not ws:
            return -math.inf
        running = [w.passed(mode) for w in ws if w.end is None]
        if self._index.awaited:
            running.append(-1)  # a worker that has written nothing has passed no step
        return min(running, default=math.inf)

    def _passed(self, step: int, mode: Mode | None) -> bool:
        """Whether every worker is past ``step`` (a mode step if ``mode``) or has ended."""
        return step <= self._complete_up_to(mode)

    def _last(self, mode: Mode | None) -> int:
        """Last step (or mode step) counted by any worker, from the end markers and the data."""
        last = -1
        for w in self._index.workers.values():
            last = max(last, w.last_step if mode is None else w.last_mode_step.get(mode, -1))
            if w.end is not None:
                if mode is None:
                    end_last = w.end.get("last_step")
                else:
                    end_last = (w.end.get("mode_steps") or {}).get(mode.name)
                if end_last is not None:
                    last = max(last, int(end_last))
        return last

    def steps(self, mode: Mode | str | None = None, show_incomplete: bool = False) -> list[int]:
        """Saved steps, sorted: global steps, or mode steps when ``mode`` is given.

        Parameters
        ----------
        mode
            Return the steps of this mode, numbered within the mode.
        show_incomplete
            Include steps not every worker has written yet.
        """
        self._auto_refresh()
        m = None if mode is None else Mode.parse(mode)
        saved = self._index.sorted_steps(m)
        return saved[: len(saved) if show_incomplete else bisect.bisect_right(saved, self._complete_up_to(m))]

    def last_complete_step(self, mode: Mode | str | None = None) -> int | None:
        """The last step every worker has written (or ended before), or None."""
        steps = self.steps(mode)
        return steps[-1] if steps else None

    def global_step(self, step: int, mode: Mode | str | None = None) -> int | None:
        """The global step of mode step ``step`` (``step`` itself without ``mode``); None if unknown.

        The step comes first: ``global_step(1, Mode.EVAL)``. smdebug's order,
        ``global_step(Mode.EVAL, 1)``, raises a TypeError (a :class:`Mode` is an
        integer too, and was read as a step of another mode).
        """
        refuse_mode(step, STEP_FIRST + "global_step(step, mode) (smdebug's was global_step(mode, mode_step))")
        if mode is None:
            return step
        self._auto_refresh()
        return self._index.mode_steps.get(Mode.parse(mode), {}).get(step)

    def mode_step(self, step: int) -> tuple[Mode, int] | None:
        """The mode and mode step of saved global step ``step``; None if it was not saved (yet)."""
        refuse_mode(step, "mode_step(step) takes a global step and gives its (mode, mode step)")
        self._auto_refresh()
        return self._index.steps.get(step)

    def has_passed_step(self, step: int, mode: Mode | str | None = None) -> StepState:
        """Whether ``step`` (a mode step if ``mode``) is readable, may still come, or never will."""
        refuse_mode(step, STEP_FIRST + "has_passed_step(step, mode={mode})")
        self._auto_refresh()
        m = None if mode is None else Mode.parse(mode)
        saved = step in (self._index.steps if m is None else self._index.mode_steps.get(m, {}))
        if self._passed(step, m):
            return StepState.AVAILABLE if saved else StepState.UNAVAILABLE
        return StepState.NOT_YET_AVAILABLE

    def _past_end(self, step: int, mode: Mode | None) -> bool:
        return self._ended() and step > self._last(mode)

    def _ended_message(self, step: int, mode: Mode | None) -> str:
        """``"training has ended at eval step 4; there is no eval step 9"``: ``step`` lies past the end."""
        last = self._last(mode)
        where = f"at {step_label(last, mode)}" if last >= 0 else f"before saving any {step_word(mode)}"
        return f"training has ended {where}; there is no {step_label(step, mode)}"

    def wait_for_steps(
        self, steps: Sequence[int], mode: Mode | str | None = None, timeout: float | None = None
    ) -> None:
        """Return once every step in ``steps`` has passed (saved or skipped).

        Steps known to have passed return at once, without asking the storage. On remote storage a look for
        new data is given no longer than what is left of ``timeout`` (at least ``WAIT_POLL_SECONDS``).

        Raises
        ------
        NoMoreData
            A step lies past the end of a training that has ended.
        StepNotYetAvailable
            ``timeout`` seconds passed first (also while the storage did not answer).
        TimeoutError
            The storage did not answer within its own bound (:data:`~tensortap.backends.storage.ANSWER_SECONDS`),
            shorter than ``timeout``.
        TypeError, ValueError
            ``steps`` is not a sequence of integers >= 0, or ``timeout`` not a number >= 0 (nor None).
        """
        if isinstance(steps, (int, str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"steps: expected a sequence of steps, got {steps!r}")
        steps = list(steps)
        for s in steps:
            refuse_mode(s, STEP_FIRST + "wait_for_steps(steps, mode={mode})")
            if not isinstance(s, (int, np.integer)) or s < 0:
                raise ValueError(f"steps: expected integers >= 0, got {s!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):  # nan is not >= 0
            raise ValueError(f"timeout: expected a number of seconds >= 0 or None, got {timeout!r}")
        m = None if mode is None else Mode.parse(mode)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = sorted(set(steps))
        refreshed = False
        while True:
            # as known: a silent storage holds no step known; past an end known, the run may have been resumed
            pending = [s for s in pending if not self._passed(s, m) or self._past_end(s, m)]
            if not pending:
                break
            if refreshed:
                if self._ended():
                    raise NoMoreData(self._ended_message(pending[0], m))
                if deadline is not None and time.monotonic() >= deadline:
                    raise StepNotYetAvailable(pending[0], m)
                time.sleep(WAIT_POLL_SECONDS)
            answer_by = None if deadline is None else max(deadline, time.monotonic() + WAIT_POLL_SECONDS)
            try:
                with storage_module.answer_by(answer_by):  # a storage that does not answer holds no longer
                    self.refresh()
            except TimeoutError as exc:
                if deadline is None or time.monotonic() < deadline:
                    raise  # the storage's own bound, shorter than the wait
                raise StepNotYetAvailable(pending[0], m) from exc
            refreshed = True
        for s in steps:
            if self._past_end(s, m):
                raise NoMoreData(self._ended_message(s, m))

    def tensor_names(
        self,
        collection: str | Collection | None = None,
        regex: str | Sequence[str] | None = None,
        mode: Mode | str | None = None,
        step: int | None = None,
    ) -> list[str]:
        """Names of saved tensors, sorted, filtered by collection, regex, mode and step.

        ``collection`` is a collection's name, or a :class:`~tensortap.Collection` (its name is used).

        Raises
        ------
        UnknownName
            ``collection`` is not a collection of this trial (the message suggests close names).
        TypeError
            ``collection`` is neither a name nor a Collection, or ``step`` is a :class:`Mode`.
        ValueError
            ``regex`` is not a valid regular expression, or ``mode`` names no mode.
        """
        collection = collection_name(collection)
        self._auto_refresh()
        if collection is not None:
            known = self._collection_names()
            if collection not in known:
                raise UnknownName("collection", collection, known, f" in {self.path}")
        entries = ((name, info.collections, info.locations) for name, info in self._index.tensors.items())
        of_mode = self._index.steps_of_mode
        return select_names(entries, lambda m: of_mode(m)[0], collection, regex, mode, step, self.global_step)

    def _collection_names(self) -> set[str]:
        """Names of the collections the workers configured or saved tensors in."""
        names = {c for info in self._index.tensors.values() for c in info.collections}
        for w in self._index.workers.values():
            configured = w.info.get("collections")
            if isinstance(configured, dict):
                names.update(str(c) for c in configured)
        return names

    def collections(self) -> dict[str, Collection]:
        """Collections with their tensor names (and configuration, from the workers' records)."""
        self._auto_refresh()
        out: dict[str, Collection] = {}
        for w in self._index.workers.values():
            configs = w.info.get("collections")
            for name, cfg in configs.items() if isinstance(configs, dict) else ():
                if name not in out:
                    try:
                        out[name] = Collection.from_json(cfg)
                    except (ValueError, KeyError, TypeError, AttributeError):  # a record from a stranger
                        out[name] = Collection(name)
        for tname, info in self._index.tensors.items():
            for c in info.collections:
                out.setdefault(c, Collection(c)).tensor_names.add(tname)
        return dict(sorted(out.items()))

    def collection(self, name: str) -> Collection:
        """One collection; :class:`UnknownName` (a KeyError) naming close ones if there is no such collection."""
        cols = self.collections()
        if name not in cols:
            raise UnknownName("collection", name, cols, f" in {self.path}")
        return cols[name]

    def tensor(self, name: str) -> Tensor:
        """The tensor called ``name``; :class:`TensorUnavailable` if no such name was saved (yet)."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected a tensor name (a string), got {name!r}")
        self._auto_refresh()
        if name not in self._index.tensors:
            self.refresh()
            if name not in self._index.tensors:
                raise TensorUnavailable(f"no tensor named {name!r} in {self.path}{suggest(name, self._index.tensors)}")
        return Tensor(self, name)

    def stop_request(self) -> dict[str, Any] | None:
        """The stop request written into this trial, if any."""
        if not self.storage.exists(layout.STOP_REQUEST):
            return None
        request = self.storage.read_json(layout.STOP_REQUEST)
        return request if isinstance(request, dict) else {"reason": repr(request)}

    def request_stop(self, reason: str, **details: Any) -> None:
        """Ask the training that writes this trial to stop; adapters poll for it."""
        self.storage.write_json(layout.STOP_REQUEST, {"reason": reason, "time": time.time(), **details})

    def end_reasons(self) -> dict[str, str]:
        """Why each ended worker stopped: ``closed``, ``exit``, ``sigterm``, ``stop_request``, ``error``,
        ``exception`` (an uncaught exception, or Lightning's), ``incomplete`` or ``import failed``
        (``tensortap import-smdebug``); see ``docs/format.md``. ``killed``: its process, on this machine,
        ended without writing its end marker (:mod:`tensortap.processes`)."""
        self._auto_refresh()
        return {n: str(w.end.get("reason")) for n, w in sorted(self._index.workers.items()) if w.end is not None}

    def wall_times(self, mode: Mode | str | None = None) -> dict[int, float]:
        """When each saved step was written (``time.time()`` at its end), by step (mode step if ``mode``).

        Empty for trials written before format 1.1, which did not record it.
        """
        self._auto_refresh()
        m = None if mode is None else Mode.parse(mode)
        index = self._index.steps
        out = {}
        for gstep, t in self._index.wall_times.items():
            if m is None:
                out[gstep] = t
            elif gstep in index and index[gstep][0] is m:
                out[index[gstep][1]] = t
        return dict(sorted(out.items()))

    def steps_per_second(self, mode: Mode | str | None = None) -> float | None:
        """Training speed: steps counted between the first and last saved step over the seconds between them.

        None when fewer than two saved steps have a wall time (or they share one).
        """
        times = self.wall_times(mode)
        if len(times) < 2:
            return None
        (s0, t0), (s1, t1) = min(times.items()), max(times.items())
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def plot(
        self,
        names_or_regex: str | Sequence[str],
        reduction: str | None = None,
        mode: Mode | str | None = None,
        x: XAxis | None = None,
        ax: Axes | None = None,
        logy: bool = False,
    ) -> Axes:
        """Plot tensors across steps, one line per tensor and mode; return the matplotlib Axes.

        Parameters
        ----------
        names_or_regex
            Tensor names, or one string: a tensor name, else a regular expression.
        reduction
            A reduction key (``"mean"``, ``"abs_max"``, ``"l2"``...); default: the value
            of scalar tensors, the mean of the others.
        mode
            Only steps of this mode (default: every mode, as separate lines).
        x
            ``"step"`` (the mode step), ``"global_step"`` or ``"time"`` (seconds since the first saved step);
            default: the global step where the lines hold several modes (a validation loss where it was
            computed in the training), else the mode step.
        ax
            Draw into these Axes (default: a new figure).
        logy
            Logarithmic y axis.
        """
        from .plot import plot_tensors

        names = resolve_names(names_or_regex, self._index.tensors, self.tensor_names, self.path)
        return plot_tensors([self], names, reduction, mode, x=x, ax=ax, logy=logy)

    def problems(self) -> dict[str, str]:
        """Files found unreadable so far, with why."""
        return dict(self._index.bad_files)

    def to_pandas(
        self,
        names: str | Sequence[str] | None = None,
        collection: str | None = None,
        reductions: str | Sequence[str] | None = None,
        progress: bool | None = None,
        exact_ints: bool = False,
    ) -> pandas.DataFrame:
        """A long-format DataFrame: one row per worker, step, tensor and reduction.

        Columns: ``worker, mode, mode_step, step, name, reduction, value``. ``value``
        is float64, which rounds an integer beyond 2**53 (a ``time.time_ns()``
        saved as a scalar); with ``exact_ints``, where the trial holds such an
        integer scalar, the column holds Python objects instead, integer scalars
        as exact ints (what the exports write).
        With ``reductions`` (keys such as ``"mean"``, ``"abs_max"``, ``"l2"``), each
        is the saved value or is computed from the raw tensor; a tensor's shard is
        read once for all its steps. Without, scalar tensors give one row with
        reduction ``"value"``, others their saved reductions, and raw tensors that
        have none :data:`DEFAULT_RAW_REDUCTIONS`. Histograms are not rows (see
        :meth:`Tensor.histogram_values`). A reduction asked for that a tensor
        neither saved nor can compute (no raw tensor saved) gives it no row; one
        warning names those tensors.

        Parameters
        ----------
        names
            The tensors (a name, or a list of them; default: every tensor).
        collection
            Only the tensors of this collection (of ``names``, when given).
        reductions
            The reductions of each tensor (a key, or a list of them; default: as above).
        progress
            Show a progress bar over tensors (default: when standard error is a terminal).
        exact_ints
            Keep integer scalars beyond 2**53 exact, as above (default: ``value`` is float64).
        """
        import pandas as pd

        from .progress import progress as bar

        if isinstance(reductions, str):
            reductions = [reductions]  # as names: "mean" was read as the keys "m", "e", "a", "n"
        for k in reductions or ():
            red.check_key(k)
        rows: list[tuple[Any, ...]] = []
        with self.frozen():
            selected = self.tensor_names(collection=collection)
            if names is not None:
                wanted = [names] if isinstance(names, str) else list(names)
                for name in wanted:
                    self.tensor(name)  # an unknown name: TensorUnavailable, with the closest names
                in_collection = set(selected)
                selected = [n for n in wanted if n in in_collection]
            lacking: dict[str, list[str]] = {k: [] for k in reductions or ()}  # reduction: tensors without it
            for name in bar(selected, desc="tensors", enable=progress):
                found = set()
                for step, worker, key, value in self.tensor(name)._rows(reductions, every_worker=True):
                    mode, mode_step = self._index.steps.get(step, (Mode.GLOBAL, step))
                    rows.append((worker, mode.name, mode_step, step, name, key, value))
                    found.add(key)
                for key, names_without in lacking.items():
                    if key not in found:
                        names_without.append(name)
        for key, names_without in lacking.items():
            if names_without:
                logger.warning(
                    "tensortap: %r left out for %d tensor(s) that saved neither it nor their raw values: %s",
                    key,
                    len(names_without),
                    ", ".join(names_without),
                )
        df = pd.DataFrame(rows, columns=["worker", "mode", "mode_step", "step", "name", "reduction", "value"])
        if rows:  # float64, unless asked to keep an integer scalar float64 rounds (above 2**53): Python objects
            values = [row[-1] for row in rows]
            rounded = exact_ints and any(isinstance(v, int) and float(v) != v for v in values)
            df["value"] = pd.Series(values, dtype=object if rounded else "float64")
        return df

    def close(self) -> None:
        """Close open shard files."""
        self._index.close()

    def __enter__(self) -> Trial:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tensor:
    """One tensor name in a trial: its steps, values and reductions."""

    def __init__(self, trial: Trial, name: str) -> None:
        self.trial = trial
        self.name = name

    if not TYPE_CHECKING:  # mypy keeps checking attribute names

        def __getattr__(self, name: str) -> Any:
            raise no_attribute(f"{type(self).__name__!r} object", name, _SMDEBUG_TENSOR, "tensor")

    def __repr__(self) -> str:
        from .views import tensor_text

        return tensor_text(self)

    def _repr_html_(self) -> str:
        from .views import tensor_html

        return tensor_html(self)

    @property
    def _info(self) -> TensorInfo:
        self.trial._auto_refresh()
        return self.trial._index.tensors[self.name]

    @property
    def collections(self) -> list[str]:
        """Collections this tensor belongs to."""
        return sorted(self._info.collections)

    def summary(self) -> dict[str, Any]:
        """What the index knows without opening a shard: collections, dtype, shape and
        original dtype of the last raw value (None if only reductions were saved), saved steps."""
        info = self._info
        return {
            "collections": sorted(info.collections),
            "dtype": info.dtype,
            "orig_dtype": info.orig_dtype,
            "shape": info.shape,
            "steps": len(info.locations),
        }

    def steps(self, mode: Mode | str | None = None, worker: str | None = None) -> list[int]:
        """Complete steps at which this tensor was saved (mode steps when ``mode`` is given): as
        :meth:`Trial.steps`, not those some worker of a live run has not written yet. With ``worker``, every
        step that worker saved it at, as ``values(worker=...)`` reads them (also those another worker has not
        reached yet); a worker the trial does not have raises :class:`UnknownName`."""
        info = self._info
        if worker is not None:
            m = None if mode is None else Mode.parse(mode)
            index = self.trial._index
            located = self._located(m, self._complete(worker))
            return sorted(g if m is None else index.steps[g][1] for g, workers in located if worker in workers)
        complete = self.trial._complete_up_to(None)
        if mode is None:
            saved = info.saved_steps()
            return saved[saved <= complete].tolist()
        steps, mode_steps = self.trial._index.steps_of_mode(Mode.parse(mode))
        steps = steps[steps <= complete]
        return np.sort(mode_steps[: len(steps)][info.locations.saved_of(steps)]).tolist()

    def _complete(self, worker: str | None) -> float:
        """The last step the readers of every worker's values give (:meth:`Trial.steps`' complete steps); any
        step for one ``worker``'s values, which are there as soon as it wrote them. An unknown ``worker``
        raises :class:`UnknownName`."""
        if worker is None:
            return self.trial._complete_up_to(None)
        self._check_worker(worker)
        return math.inf

    def _check_worker(self, worker: str) -> None:
        """Raise :class:`UnknownName` (with the closest names) for a ``worker`` the trial does not have, a
        ``TypeError`` for one that is no name (a rank)."""
        workers = self.trial.workers()
        if not isinstance(worker, str):
            raise TypeError(
                f"worker= takes a worker's name, a str such as 'worker_1' (trial.workers() lists those of "
                f"{self.trial.path}), not {worker!r} ({type(worker).__name__})"
            )
        if worker not in workers:
            raise UnknownName("worker", worker, workers, f" in {self.trial.path}")

    def _located(self, mode: Mode | None, last: float) -> Iterator[tuple[int, dict[str, Location]]]:
        """``(global step, {worker: location})`` of this tensor's saved steps up to ``last`` (:meth:`_complete`),
        of ``mode`` if given."""
        steps = self.trial._index.steps
        for gstep, workers in self._info.locations.items():
            if gstep <= last and (mode is None or (gstep in steps and steps[gstep][0] is mode)):
                yield gstep, workers

    def _locate(self, step: int, mode: Mode | str | None, worker: str | None) -> tuple[int, str, Location]:
        refuse_mode(step, STEP_FIRST + "(step, mode={mode})")
        step = _step_number(step)
        m = None if mode is None else Mode.parse(mode)
        info = self._info
        gstep = self.trial.global_step(step, m)
        workers = info.locations.get(gstep) if gstep is not None else None
        if workers and worker is None and gstep is not None and gstep > self.trial._complete_up_to(None):
            raise StepNotYetAvailable(step, m)  # the first worker's value, whichever comes first, may be to come
        if workers:
            if worker is None:
                worker = sorted(workers)[0]
            if worker in workers:
                return gstep, worker, workers[worker]  # type: ignore[return-value]
            self._check_worker(worker)
            raise TensorUnavailableForStep(
                f"{self.name!r} at {step_label(step, m)}: worker {worker!r} did not save it; "
                f"workers: {', '.join(sorted(workers))}"
            )
        raise self._not_saved(step, m)

    def _not_saved(self, step: int, m: Mode | None) -> TensortapError:
        """The error for ``step`` (of mode ``m``), at which no worker saved this tensor: its shard was found
        unreadable, the step is to come, past the training's end, a step of the trial without this tensor
        (:class:`TensorUnavailableForStep`), or never saved."""
        lost_in = self.trial._index.lost_in(step, m)
        if lost_in is not None:  # its steps were forgotten when it was found unreadable
            return self._unreadable(step_label(step, m), lost_in)
        state = self.trial.has_passed_step(step, m)
        if state is StepState.NOT_YET_AVAILABLE:
            return StepNotYetAvailable(step, m)
        if self.trial._past_end(step, m):
            return NoMoreData(self.trial._ended_message(step, m))
        if state is StepState.AVAILABLE:
            return TensorUnavailableForStep(
                f"{self.name!r} was not saved at {step_label(step, m)} (other tensors were)"
            )
        return StepUnavailable(step, m)

    def _reader_value(self, step: int, loc: Location) -> np.ndarray:
        index = self.trial._index
        value = index.read_raw(self.name, loc.shard, lambda r: r.value(self.name, step), one_value=True)
        if value is None:
            raise self._unreadable(step_label(step, None), loc.shard)
        return value

    def _unreadable(self, where: str, shard: str) -> ShardUnreadable:
        """The error for a value at ``where`` (``"step 3"``, ``"eval step 1"``) that its shard, skipped as
        unreadable, held."""
        why = self.trial._index.bad_files.get(shard, "it does not hold this value")
        return ShardUnreadable(f"{self.name!r} at {where}: shard {shard} cannot be read: {why}", shard, why)

    def value(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> np.ndarray:
        """The raw value at ``step`` (a mode step if ``mode``), from ``worker`` or the first in sorted order."""
        gstep, _, loc = self._locate(step, mode, worker)
        if not loc.raw:
            have = ", ".join(loc.reductions) or "none"
            raise TensorUnavailableForStep(
                f"{self.name!r} at {step_label(step, mode)}: only reductions were saved ({have}): read one with "
                "reduction_value(step, REDUCTION), or capture the raw tensor with ReductionConfig(save_raw_tensor=True)"
            )
        return self._reader_value(gstep, loc)

    def values(self, mode: Mode | str | None = None, worker: str | None = None) -> dict[int, np.ndarray]:
        """Every raw value, by step (mode step if ``mode``); one read per shard."""
        m = None if mode is None else Mode.parse(mode)
        index = self.trial._index
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for gstep, workers in self._located(m, self._complete(worker)):
            w = worker if worker is not None else min(workers)
            loc = workers.get(w)
            if loc is None or not loc.raw:
                continue
            key = index.steps[gstep][1] if m is not None else gstep
            by_shard.setdefault(loc.shard, []).append((gstep, key))
        out: dict[int, np.ndarray] = {}
        read = index.read_raw_many(self.name, list(by_shard), lambda r: r.values(self.name))
        for shard, wanted in by_shard.items():
            stored = read[shard]
            if stored is not None:  # else skipped with a warning naming the shard
                out.update({key: stored[g] for g, key in wanted if g in stored})
        return dict(sorted(out.items()))

    def reduction_value(
        self,
        step: int,
        reduction: str,
        abs: bool = False,
        mode: Mode | str | None = None,
        worker: str | None = None,
    ) -> float:
        """A reduction at ``step``: the saved one, or computed from the raw tensor with the same formula.

        The order is tensortap's: ``abs`` third (smdebug's third parameter was
        the mode; a :class:`Mode` given as ``abs`` raises a TypeError).
        """
        check_reduction_name(reduction)
        refuse_mode_as_abs(abs, "reduction_value(step, reduction")
        key = red.reduction_key(reduction, abs)
        red.check_key(key)
        gstep, _, loc = self._locate(step, mode, worker)
        held: Sequence[str] = loc.reductions
        if key in loc.reductions:
            saved = self.trial._index.read(loc.shard, lambda r: r.reductions(self.name))
            if saved is None:
                raise self._unreadable(step_label(step, mode), loc.shard)
            if (gstep, key) in saved:
                return saved[(gstep, key)]
            held = sorted(k for s, k in saved if s == gstep)  # the shard's: its record listed one it lacks
        if loc.raw:
            return red.compute(self._reader_value(gstep, loc), key)
        raise TensorUnavailableForStep(
            f"{self.name!r} at {step_label(step, mode)}: reduction {key!r} was not saved and no raw tensor was; "
            f"saved: {', '.join(held) or 'none'}"
        )

    def reduction_values(
        self, reduction: str, abs: bool = False, mode: Mode | str | None = None, worker: str | None = None
    ) -> dict[int, float]:
        """A reduction at every step where it is saved or computable, by step (mode step if ``mode``).

        Reads each shard once. Without ``worker``, each step comes from the first
        worker (in sorted order) that saved it. (smdebug's ``reduction_values(step)``
        gave every reduction at one step: here ``available_reductions(step)``
        and ``reduction_value(step, reduction)``; a step given raises a TypeError saying so.)
        """
        check_reduction_name(
            reduction,
            "; reduction_values(reduction) gives one reduction at every step (smdebug's reduction_values(step) "
            "gave every reduction at one step: use available_reductions(step) and reduction_value(step, reduction))",
        )
        refuse_mode_as_abs(abs, "reduction_values(reduction")
        key = red.reduction_key(reduction, abs)
        red.check_key(key)
        return self._keyed(self._rows([key], worker, mode), mode)

    def _keyed(self, rows: list[tuple[int, str, str, float]], mode: Mode | str | None) -> dict[int, float]:
        """``{step or mode step: value}`` from rows of one key, the first worker per step."""
        index = self.trial._index.steps
        out: dict[int, float] = {}
        for gstep, _, _, value in sorted(rows, key=lambda r: (r[0], r[1])):
            key = gstep if mode is None else index[gstep][1]
            out.setdefault(key, value)
        return dict(sorted(out.items()))

    def _raw_values(self, source: RawSource) -> _RawValues:
        """This tensor's raw values in one shard, and, when they are one stacked array (read once), that
        array with the row of each step."""
        stacked = source.stacked(self.name)
        if stacked is None:
            return source.values(self.name), None
        position = {int(s): i for i, s in enumerate(stacked[0])}
        return {s: stacked[1][i] for s, i in position.items()}, (position, stacked[1])

    def _shard_values(
        self, shard: str, entries: list[tuple[int, str, Location]], read: Mapping[str, _RawValues | None]
    ) -> tuple[dict[tuple[int, str], float], dict[int, np.ndarray], tuple[dict[int, int], np.ndarray] | None] | None:
        """This tensor's saved reductions and raw values in ``shard`` (:meth:`_raw_values`, or ``read[shard]``
        if read before); None if the shard cannot be read (the index warned once and forgot it)."""
        index = self.trial._index
        saved: dict[tuple[int, str], float] | None = {}
        if any(loc.reductions for _, _, loc in entries):
            saved = index.read(shard, lambda r: r.reductions(self.name))
        if saved is None:
            return None
        if not any(loc.raw for _, _, loc in entries):
            return saved, {}, None
        raw = read[shard] if shard in read else index.read_raw(self.name, shard, self._raw_values)
        return None if raw is None else (saved, *raw)

    def _rows(
        self,
        keys: Sequence[str] | None,
        worker: str | None = None,
        mode: Mode | str | None = None,
        every_worker: bool = False,
    ) -> list[tuple[int, str, str, float]]:
        """``(global step, worker, key, value)`` of every saved location, sorted, reading each shard once:
        of the complete steps without ``worker`` (:meth:`_complete`), unless ``every_worker`` asks for every
        row of every worker (each row is its worker's, also at a step another has not written yet).

        ``keys=None``: the value of a scalar (key ``"value"``), else the saved
        reductions, else (raw only) :data:`DEFAULT_RAW_REDUCTIONS`.
        """
        m = None if mode is None else Mode.parse(mode)
        index = self.trial._index
        by_shard: dict[str, list[tuple[int, str, Location]]] = {}
        for gstep, workers in self._located(m, math.inf if every_worker else self._complete(worker)):
            for w, loc in workers.items():
                if worker is None or w == worker:
                    by_shard.setdefault(loc.shard, []).append((gstep, w, loc))
        rows: list[tuple[int, str, str, float]] = []
        shards = list(by_shard)
        at_once = 1 if index.storage.is_local else READS_AT_ONCE  # shards whose values are held together
        for first in range(0, len(shards), at_once):
            batch = shards[first : first + at_once]
            raw_only = [  # read first, at once on remote storage (shards with saved reductions are opened anyway)
                shard
                for shard in batch
                if any(loc.raw for _, _, loc in by_shard[shard])
                and not any(loc.reductions for _, _, loc in by_shard[shard])
            ]
            read = index.read_raw_many(self.name, raw_only, self._raw_values)
            index.fetch([shard for shard in batch if shard not in read])
            for shard in batch:
                rows.extend(self._shard_rows(shard, by_shard[shard], keys, read))
        order = {k: i for i, k in enumerate(keys or ())}
        return sorted(rows, key=lambda r: (r[0], r[1], order.get(r[2], len(order)), r[2]))

    def _shard_rows(
        self,
        shard: str,
        entries: list[tuple[int, str, Location]],
        keys: Sequence[str] | None,
        read: Mapping[str, _RawValues | None],
    ) -> list[tuple[int, str, str, float]]:
        """:meth:`_rows` of one shard (``read``: raw values read before, by shard)."""
        rows: list[tuple[int, str, str, float]] = []
        got = self._shard_values(shard, entries, read)
        if got is not None:  # else unreadable: the index warned once and forgot it
            saved, raw, stacked = got
            todo: dict[tuple[tuple[str, ...], tuple[int, ...], str], list[tuple[int, str]]] = {}
            for gstep, w, loc in entries:
                value = raw.get(gstep) if loc.raw else None
                if keys is None and value is not None and value.size == 1:
                    rows.append((gstep, w, "value", _scalar_row_value(value)))
                    continue
                want = keys if keys is not None else loc.reductions or (DEFAULT_RAW_REDUCTIONS if loc.raw else ())
                missing = []
                for k in want:
                    if k in loc.reductions and (gstep, k) in saved:
                        rows.append((gstep, w, k, saved[(gstep, k)]))
                    elif value is not None:
                        missing.append(k)
                if missing and value is not None:
                    todo.setdefault((tuple(missing), value.shape, value.dtype.str), []).append((gstep, w))
            for (ks, _, _), members in todo.items():
                arrays: np.ndarray | list[np.ndarray] = [raw[g] for g, _ in members]
                if stacked is not None:  # rows of the one array read: no per-step copy
                    position, data = stacked
                    rows_at = np.array([position[g] for g, _ in members])
                    arrays = data if np.array_equal(rows_at, np.arange(len(data))) else data[rows_at]
                computed = red.compute_rows(arrays, ks)
                for i, (gstep, w) in enumerate(members):
                    rows.extend((gstep, w, k, float(computed[k][i])) for k in ks)
        return rows

    def to_series(
        self, reduction: str | None = None, mode: Mode | str | None = None, worker: str | None = None
    ) -> pandas.Series:
        """A pandas Series of floats indexed by step (mode step if ``mode``).

        Parameters
        ----------
        reduction
            A reduction key (``"mean"``, ``"abs_max"``...); None: the values of a scalar tensor.
        mode, worker
            Only steps of this mode; read this worker (default: the first that saved each step).

        Raises
        ------
        ValueError
            ``reduction=None`` and the tensor is not a scalar, or saved only reductions (a scalar too,
            such as a loss captured under a ``ReductionConfig``): the message names the reductions to pass.
        """
        import pandas as pd

        if reduction is None:
            info = self._info
            if info.shape is None or int(np.prod(info.shape)) != 1:
                saved = sorted(info.saved_reductions())
                if info.shape is None:  # no raw value: whether it is a scalar is not known
                    raise ValueError(
                        f"{self.name!r} has no values, only reductions were saved: pass reduction= one of "
                        f"{', '.join(saved) or 'none'}"
                    )
                raise ValueError(
                    f"{self.name!r} is not a scalar (its shape is {info.shape}); pass reduction= one of "
                    f"{', '.join(saved) or ', '.join(DEFAULT_RAW_REDUCTIONS)}"
                )
            data = self._keyed([r for r in self._rows(None, worker, mode) if r[2] == "value"], mode)
        else:
            name, absolute = red.split_key(reduction)
            data = self.reduction_values(name, absolute, mode, worker)
        m = None if mode is None else Mode.parse(mode)
        index = pd.Index(list(data), dtype="int64", name=step_word(m))
        return pd.Series(list(data.values()), index=index, dtype="float64", name=self.name)

    def histogram_value(
        self,
        step: int,
        mode: Mode | str | None = None,
        worker: str | None = None,
        bins: int | Sequence[float] = red.DEFAULT_BINS,
    ) -> red.Histogram:
        """The histogram ``(edges, counts)`` at ``step``: the saved one, else binned from the raw tensor.

        Parameters
        ----------
        bins
            For a raw tensor: equal bins over its finite range, or explicit edges.
            A saved histogram keeps the bins it was captured with.

        Raises
        ------
        ValueError
            ``bins`` is neither a number of bins (1 to 4096) nor strictly increasing edges.
        """
        checked = red.check_bins(bins)
        gstep, _, loc = self._locate(step, mode, worker)
        if loc.histogram:
            saved = self.trial._index.read(loc.shard, lambda r: r.histograms(self.name))
            if saved is not None and gstep in saved:
                return saved[gstep]
        if loc.raw:
            hist = red.histogram(self._reader_value(gstep, loc), checked)
            if hist is None:
                raise TensorUnavailableForStep(f"{self.name!r} at {step_label(step, mode)}: no finite value to bin")
            return hist
        raise TensorUnavailableForStep(
            f"{self.name!r} at {step_label(step, mode)}: neither a histogram nor the raw tensor was saved; "
            "capture with ReductionConfig(histogram=64) or save_raw_tensor=True"
        )

    def histogram_values(
        self,
        mode: Mode | str | None = None,
        worker: str | None = None,
        bins: int | Sequence[float] = red.DEFAULT_BINS,
    ) -> dict[int, red.Histogram]:
        """Histograms at every step where one was saved or the raw tensor was, by step (mode step if ``mode``).

        Saved histograms are returned as captured. Raw tensors are binned on
        common edges: ``bins`` equal bins over the finite range of all their
        steps (or explicit edges). Each shard is read once. ``bins`` is checked as in
        :meth:`histogram_value`.
        """
        checked = red.check_bins(bins)
        m = None if mode is None else Mode.parse(mode)
        index = self.trial._index
        by_shard: dict[str, list[tuple[int, Location]]] = {}
        for gstep, workers in self._located(m, self._complete(worker)):
            w = worker if worker is not None else min(workers)
            if (loc := workers.get(w)) is not None and (loc.histogram or loc.raw):
                by_shard.setdefault(loc.shard, []).append((gstep, loc))
        found: dict[int, red.Histogram] = {}
        raw: dict[int, np.ndarray] = {}
        for shard, entries in by_shard.items():
            want_saved = any(loc.histogram for _, loc in entries)
            want_raw = any(loc.raw and not loc.histogram for _, loc in entries)
            got = index.read(
                shard,
                lambda r, h=want_saved, v=want_raw, s=shard: (  # type: ignore[misc]
                    r.histograms(self.name) if h else {},
                    index.agreeing(r, self.name, s).values(self.name) if v else {},
                ),
            )
            if got is None:
                continue
            saved, values = got
            for gstep, _ in entries:
                if gstep in saved:
                    found[gstep] = saved[gstep]
                elif gstep in values:
                    raw[gstep] = values[gstep]
        if raw:
            edges = _common_edges(raw.values(), checked)
            if edges is not None:
                found.update({g: red.Histogram(edges, red.histogram_counts(v, edges)) for g, v in raw.items()})
        keyed = {(g if m is None else index.steps[g][1]): h for g, h in found.items()}
        return dict(sorted(keyed.items()))

    def plot(
        self,
        reduction: str | None = "mean",
        mode: Mode | str | None = None,
        x: XAxis | None = None,
        ax: Axes | None = None,
        logy: bool = False,
    ) -> Axes:
        """Plot a reduction (``None``: the value of a scalar) across steps, one line per mode.

        ``x`` is ``"step"`` (mode step), ``"global_step"`` or ``"time"`` (seconds since the
        trial's first saved step); default: the global step where the tensor has steps of several
        modes (an eval loss where it was computed in the training), else the mode step. Returns the
        matplotlib Axes.
        """
        from .plot import plot_tensors

        shape = self._info.shape
        if reduction == "mean" and shape is not None and int(np.prod(shape)) == 1:
            reduction = None  # the mean of a scalar is its value: label it so
        return plot_tensors([self.trial], [self.name], reduction, mode, x=x, ax=ax, logy=logy)

    def histogram(
        self,
        step: int,
        mode: Mode | str | None = None,
        bins: int | Sequence[float] = red.DEFAULT_BINS,
        ax: Axes | None = None,
    ) -> Axes:
        """Plot the histogram at ``step`` (see :meth:`histogram_value`); return the matplotlib Axes."""
        from .plot import plot_histogram

        return plot_histogram(self, step, mode, bins, ax)

    def plot_histograms(
        self,
        mode: Mode | str | None = None,
        bins: int | Sequence[float] = red.DEFAULT_BINS,
        x: XAxis = "step",
        ax: Axes | None = None,
        log: bool = True,
        worker: str | None = None,
    ) -> Axes:
        """The distribution over steps as a heat map (x: step, y: value, colour: count), as TensorBoard's.

        Without ``mode``: the TRAIN steps if there are any, else the first mode's. ``log``: the
        counts coloured on a logarithmic scale (the default: a tail of a few values shows beside
        a peak of thousands), else a linear one. ``worker``: that worker's values (default: where
        several workers saved the tensor, the first one's, named in the title).
        """
        from .plot import plot_histograms

        return plot_histograms(self, mode, bins, x, ax, log, worker)

    def available_reductions(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> list[str]:
        """Reduction keys saved at ``step`` (any reduction is computable when the raw tensor was saved)."""
        return list(self._locate(step, mode, worker)[2].reductions)

    def has_raw(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> bool:
        """Whether the raw value was saved at ``step``."""
        return self._locate(step, mode, worker)[2].raw

    def workers(self, step: int, mode: Mode | str | None = None) -> list[str]:
        """Workers that saved this tensor at ``step``, so far at a step not complete yet; ``[]`` at a step of
        the trial where no worker saved it. Raises what :meth:`value` raises for a step the trial has not
        (not reached yet, past the training's end, never saved)."""
        refuse_mode(step, STEP_FIRST + "workers(step, mode={mode})")
        step = _step_number(step)
        m = None if mode is None else Mode.parse(mode)
        gstep = self.trial.global_step(step, m)
        workers = self._info.locations.get(gstep) if gstep is not None else None
        if workers:
            return sorted(workers)
        error = self._not_saved(step, m)
        if type(error) is TensorUnavailableForStep:  # not ShardUnreadable: who saved what it held is unknown
            return []
        raise error

    def shape(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> tuple[int, ...]:
        """Shape of the raw value at ``step``."""
        return tuple(self.value(step, mode, worker).shape)

    def _window(self, step: int, worker: str | None = None) -> StepWindow:
        """The saved steps of the shard that holds global ``step``, for a loop over steps (the rules' reads).

        Each step of the window is one whose value :meth:`value` and
        :meth:`reduction_value` take from that shard (from ``worker``, or the
        first worker in sorted order); the window reads the shard's values or
        reductions once, when first asked, and answers every step of the shard
        from them. The trial keeps the last window of each tensor and worker
        asked for while the tensor's shards stay those it was made from: a loop
        over steps reads each shard once, and holds one shard's values of a
        tensor (per worker asked for) at a time. Raises what :meth:`has_raw`
        raises where ``step`` was not saved (by ``worker``).
        """
        kept = self.trial._windows.get((self.name, worker))
        if kept is not None and kept.saved_steps is self._info.saved_steps() and step in kept.locations:
            return kept  # saved_steps is a new array once a shard of the tensor is added or dropped
        gstep, first, loc = self._locate(step, None, worker)
        info = self._info
        segment = next(seg for seg in info.segments_spanning(gstep) if seg.shard == loc.shard)
        steps = segment.steps
        # the first worker's window: leave out the steps a worker first in order saved too
        if worker is None and len(self.trial._index.workers) > 1:
            for seg in info.segments_spanning(int(steps[0]), int(steps[-1])):
                if seg.worker < first:
                    steps = steps[~np.isin(steps, seg.steps)]
        codes = segment.codes[np.searchsorted(segment.steps, steps)]
        locations = {s: segment.variants[c] for s, c in zip(steps.tolist(), codes.tolist(), strict=True)}
        window = StepWindow(self, loc.shard, first, locations, info.saved_steps())
        self.trial._windows[(self.name, worker)] = window
        return window


class StepWindow:
    """The saved steps of one tensor in one shard, and their values and reductions, each read once.

    Made by :meth:`Tensor._window`. Reading a value or reduction raises
    :class:`~tensortap.exceptions.ShardUnreadable` where the shard cannot be read
    (the index warned and forgot it), as :meth:`Tensor.value` did at a step of it.

    Parameters
    ----------
    tensor
        The tensor.
    shard
        The shard.
    worker
        The worker that wrote the shard.
    locations
        ``{global step: where the step's value lies}`` of the steps read from the shard.
    saved_steps
        The tensor's saved steps when the window was made (:meth:`TensorInfo.saved_steps
        <tensortap.trial.index.TensorInfo.saved_steps>`, a new array whenever a shard is added or dropped).
    """

    def __init__(
        self, tensor: Tensor, shard: str, worker: str, locations: dict[int, Location], saved_steps: np.ndarray
    ) -> None:
        self.tensor = tensor
        self.shard = shard
        self.worker = worker
        self.locations = locations
        self.saved_steps = saved_steps
        self._raw: dict[str, _RawValues | None] = {}  # {shard: its raw values} once read
        self._reductions: dict[str, dict[int, float]] = {}

    def _readable(self, step: int) -> None:
        """Raise :class:`~tensortap.exceptions.ShardUnreadable` for ``step`` if the shard was found unreadable."""
        if self.shard in self.tensor.trial._index.bad_files:
            raise self.tensor._unreadable(step_label(step, None), self.shard)

    def _raw_values(self) -> _RawValues | None:
        if self.shard not in self._raw:
            t = self.tensor
            self._raw[self.shard] = t.trial._index.read_raw(t.name, self.shard, t._raw_values)
        return self._raw[self.shard]

    def value(self, step: int) -> np.ndarray | None:
        """The raw value at global ``step`` (one of :attr:`locations`); None if the shard does not hold it."""
        raw = self._raw_values()
        self._readable(step)
        return None if raw is None else raw[0].get(step)

    def reduction_value(self, step: int, key: str) -> float | None:
        """Reduction ``key`` (e.g. ``"abs_mean"``) at global ``step``, as :meth:`Tensor.reduction_value` gives it:
        the saved one, else computed from the raw value (every step's at once); None if neither is there."""
        if key not in self._reductions:
            if any(loc.raw for loc in self.locations.values()):
                self._raw_values()  # read once for every key
            entries = [(s, self.worker, loc) for s, loc in self.locations.items()]
            rows = self.tensor._shard_rows(self.shard, entries, [key], self._raw)
            self._reductions[key] = {s: v for s, _, _, v in rows}
        self._readable(step)
        return self._reductions[key].get(step)


def _step_number(step: Any) -> int:
    """``step`` as an int: a TypeError for one that is not an integer (2.0 or "2" named no step, and read as one
    that other tensors had), a ValueError for a negative one (steps count from 0: -1 is not the last step)."""
    try:
        number = operator.index(step)
    except TypeError:
        raise TypeError(f"step: expected an integer, got {step!r}") from None
    if number < 0:
        raise ValueError(f"step: expected a step >= 0, got {number}")
    return number


def _scalar_row_value(value: np.ndarray) -> float | int:
    """The ``value`` row of a scalar tensor (one element): an integer as a Python int (exact beyond
    2**53, which float64 is not), any other number as float64 (complex: its magnitude)."""
    if value.dtype.kind in "iu":
        return int(value.reshape(()).item())
    return red.compute(value, "sum")


def _common_edges(values: Iterable[np.ndarray], bins: int | np.ndarray) -> np.ndarray | None:
    """Edges shared by histograms of several arrays: ``bins`` checked (:func:`~tensortap.reductions.check_bins`):
    its edges, or that many equal bins over their joint finite range."""
    if not isinstance(bins, int):
        return bins
    lo, hi = np.inf, -np.inf
    for v in values:
        a = np.asarray(v)
        a = np.abs(a) if a.dtype.kind == "c" else a
        finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a.ravel()
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not np.isfinite(lo):
        return None
    return red.histogram_edges(np.array([lo, hi]), bins)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regex: {pattern!r} is not a valid regular expression ({exc})") from None


class SavedSteps(Protocol):
    """The global steps one tensor was saved at, as :func:`select_names` asks about them
    (:class:`~tensortap.trial.index.Locations` is one)."""

    def __contains__(self, step: object, /) -> bool: ...

    def any_in(self, steps: np.ndarray, /) -> bool:
        """Whether one or more of ``steps`` (sorted, unique int64) is saved."""
        ...


def select_names(
    entries: Iterable[tuple[str, AbstractSet[str], SavedSteps]],
    steps_of_mode: Callable[[Mode], np.ndarray],
    collection: str | Collection | None,
    regex: str | Sequence[str] | None,
    mode: Mode | str | None,
    step: int | None,
    global_step: Callable[[int, Mode | None], int | None],
) -> list[str]:
    """The filter behind ``tensor_names`` of :class:`Trial` and of the rules' in-memory trial.

    Parameters
    ----------
    entries
        ``(name, collections, saved steps)`` of every tensor.
    steps_of_mode
        The saved global steps of a mode, sorted and unique (int64).
    collection, regex, mode, step
        As :meth:`Trial.tensor_names` takes them (``step`` is a mode step when ``mode`` is given).
    global_step
        Maps a (mode) step to its global step, None when it is unknown.
    """
    collection = collection_name(collection)
    refuse_mode(step, STEP_FIRST + "tensor_names(step=step, mode={mode})")
    pats = [_compile(r) for r in ([regex] if isinstance(regex, str) else regex or [])]
    m = None if mode is None else Mode.parse(mode)
    gstep = None if step is None else global_step(step, m)
    if step is not None and gstep is None:
        return []
    in_mode = None if m is None else steps_of_mode(m)
    out = []
    for name, collections, steps in entries:
        if collection is not None and collection not in collections:
            continue
        if pats and not any(p.search(name) for p in pats):
            continue
        if gstep is not None and gstep not in steps:
            continue
        if in_mode is not None and not steps.any_in(in_mode):
            continue
        out.append(name)
    return sorted(out)


def create_trial(
    path: str | os.PathLike[str], wait: bool = False, timeout: float | None = None, **kwargs: Any
) -> Trial:
    """Open the trial at ``path`` (local directory or fsspec URL).

    A trial is a folder holding a trial's marker files (see :func:`is_trial`),
    or an empty folder (a run about to start); either may have no data yet,
    and is then a trial with no steps. Anything else is not a trial. With
    ``wait=True`` the call waits for the path to appear, or for a folder
    without markers to get them, unless it is a file or holds trials below it.

    Raises
    ------
    TrialNotFound
        If ``path`` holds no trial: nothing there or a folder without a
        trial's marker files (with ``wait=True``: after ``timeout`` seconds),
        or a file (at once); the message lists trials found in the folders
        below it.
    """
    return Trial(path, wait=wait, timeout=timeout, **kwargs)


open_trial = create_trial
