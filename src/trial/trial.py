"""Trial and Tensor: query a trial's tensors, live or offline."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import reductions as red
from ..backends import layout
from ..backends.registry import get_storage
from ..backends.storage import Storage
from ..config import Collection
from ..exceptions import (
    NoMoreData,
    StepNotYetAvailable,
    StepUnavailable,
    TensorUnavailable,
    TensorUnavailableForStep,
    TrialNotFound,
)
from ..modes import Mode, StepState
from .index import Location, TensorInfo, TrialIndex

if TYPE_CHECKING:
    import pandas

REFRESH_SECONDS = 0.25
WAIT_POLL_SECONDS = 0.1


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
        self.storage = get_storage(path, **{**(storage_options or {}), **options})
        self.path = self.storage.url
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.storage.exists():
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise TrialNotFound(f"no trial at {self.path!r}")
            time.sleep(WAIT_POLL_SECONDS)
        self.refresh_interval = refresh_interval
        self._index = TrialIndex(self.storage)
        self._last_refresh = -float("inf")
        self.refresh()

    def __repr__(self) -> str:
        return f"<Trial {self.path!r}: {len(self._index.steps)} steps, {len(self._index.tensors)} tensors>"

    # ---------------------------------------------------------------- refresh
    def refresh(self) -> None:
        """Look for new shards, workers and end markers now."""
        self._index.refresh()
        self._last_refresh = time.monotonic()

    def _auto_refresh(self) -> None:
        if time.monotonic() - self._last_refresh >= self.refresh_interval:
            self.refresh()

    # ------------------------------------------------------------- listings
    def workers(self) -> list[str]:
        """Names of the workers that wrote to this trial (``worker_0``, ...), sorted."""
        self._auto_refresh()
        return sorted(self._index.workers)

    def modes(self) -> list[Mode]:
        """Modes that have at least one saved step."""
        self._auto_refresh()
        return sorted(self._index.mode_steps)

    @property
    def training_ended(self) -> bool:
        """True once every known worker has recorded the end of its training."""
        self._auto_refresh()
        ws = self._index.workers
        return bool(ws) and all(w.end is not None for w in ws.values())

    def _passed(self, step: int, mode: Mode | None) -> bool:
        """Whether every worker is past ``step`` (a mode step if ``mode``) or has ended."""
        ws = self._index.workers.values()
        if not ws:
            return False
        for w in ws:
            if w.end is not None:
                continue
            last = w.last_step if mode is None else w.last_mode_step.get(mode, -1)
            if last < step:
                return False
        return True

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
        keys: Iterable[int] = self._index.steps if m is None else self._index.mode_steps.get(m, {})
        return sorted(s for s in keys if show_incomplete or self._passed(s, m))

    def last_complete_step(self, mode: Mode | str | None = None) -> int | None:
        """The last step every worker has written (or ended before), or None."""
        steps = self.steps(mode)
        return steps[-1] if steps else None

    def global_step(self, step: int, mode: Mode | str | None = None) -> int | None:
        """The global step of mode step ``step`` (``step`` itself without ``mode``); None if unknown."""
        if mode is None:
            return step
        return self._index.mode_steps.get(Mode.parse(mode), {}).get(step)

    def mode_step(self, step: int) -> tuple[Mode, int] | None:
        """The mode and mode step of saved global step ``step``; None if it was not saved (yet)."""
        self._auto_refresh()
        return self._index.steps.get(step)

    def has_passed_step(self, step: int, mode: Mode | str | None = None) -> StepState:
        """Whether ``step`` (a mode step if ``mode``) is readable, may still come, or never will."""
        self._auto_refresh()
        m = None if mode is None else Mode.parse(mode)
        saved = step in (self._index.steps if m is None else self._index.mode_steps.get(m, {}))
        if self._passed(step, m):
            return StepState.AVAILABLE if saved else StepState.UNAVAILABLE
        return StepState.NOT_YET_AVAILABLE

    def _past_end(self, step: int, mode: Mode | None) -> bool:
        return self.training_ended and step > self._last(mode)

    def wait_for_steps(
        self, steps: Sequence[int], mode: Mode | str | None = None, timeout: float | None = None
    ) -> None:
        """Return once every step in ``steps`` has passed (saved or skipped).

        Raises
        ------
        NoMoreData
            A step lies past the end of a training that has ended.
        StepNotYetAvailable
            ``timeout`` seconds passed first.
        """
        m = None if mode is None else Mode.parse(mode)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = sorted(set(steps))
        while True:
            self.refresh()
            pending = [s for s in pending if self.has_passed_step(s, m) is StepState.NOT_YET_AVAILABLE]
            if not pending:
                break
            if self.training_ended:
                raise NoMoreData(f"training has ended at step {self._last(m)}; step {pending[0]} will never come")
            if deadline is not None and time.monotonic() >= deadline:
                raise StepNotYetAvailable(pending[0], m)
            time.sleep(WAIT_POLL_SECONDS)
        for s in steps:
            if self._past_end(s, m):
                raise NoMoreData(f"training has ended at step {self._last(m)}; step {s} will never come")

    def tensor_names(
        self,
        collection: str | None = None,
        regex: str | Sequence[str] | None = None,
        mode: Mode | str | None = None,
        step: int | None = None,
    ) -> list[str]:
        """Names of saved tensors, sorted, filtered by collection, regex, mode and step."""
        self._auto_refresh()
        entries = ((name, info.collections, info.locations) for name, info in self._index.tensors.items())
        return select_names(entries, self._index.steps, collection, regex, mode, step, self.global_step)

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
        """One collection; KeyError listing the ones that exist."""
        cols = self.collections()
        if name not in cols:
            raise KeyError(f"collection {name!r} is not in this trial; present: {', '.join(cols) or 'none'}")
        return cols[name]

    def tensor(self, name: str) -> Tensor:
        """The tensor called ``name``; :class:`TensorUnavailable` if no such name was saved (yet)."""
        self._auto_refresh()
        if name not in self._index.tensors:
            self.refresh()
            if name not in self._index.tensors:
                raise TensorUnavailable(f"no tensor named {name!r} in {self.path}")
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
        """Why each ended worker stopped (``closed``, ``exit``, ``sigterm``, ``stop_request``)."""
        self._auto_refresh()
        return {n: str(w.end.get("reason")) for n, w in sorted(self._index.workers.items()) if w.end is not None}

    def problems(self) -> dict[str, str]:
        """Files found unreadable so far, with why."""
        return dict(self._index.bad_files)

    def to_pandas(
        self,
        names: Sequence[str] | None = None,
        collection: str | None = None,
        reductions: Sequence[str] | None = None,
    ) -> pandas.DataFrame:
        """A long-format DataFrame: one row per worker, step, tensor and reduction.

        Columns: ``worker, mode, mode_step, step, name, reduction, value``.
        Without ``reductions``, scalar tensors give one row with reduction
        ``"value"`` and others give their saved reductions.
        """
        import pandas as pd

        selected = list(names) if names is not None else self.tensor_names(collection=collection)
        rows: list[tuple[Any, ...]] = []
        for name in selected:
            t = self.tensor(name)
            for step, workers in sorted(t._info.locations.items()):
                mode, mode_step = self._index.steps.get(step, (Mode.GLOBAL, step))
                for worker, loc in sorted(workers.items()):
                    for key, value in t._row_values(step, worker, loc, reductions):
                        rows.append((worker, mode.name, mode_step, step, name, key, value))
        return pd.DataFrame(rows, columns=["worker", "mode", "mode_step", "step", "name", "reduction", "value"])

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

    def __repr__(self) -> str:
        return f"<Tensor {self.name!r}>"

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

    def steps(self, mode: Mode | str | None = None) -> list[int]:
        """Steps at which this tensor was saved (mode steps when ``mode`` is given)."""
        locs = self._info.locations
        if mode is None:
            return sorted(locs)
        m = Mode.parse(mode)
        index = self.trial._index.steps
        return sorted(index[s][1] for s in locs if s in index and index[s][0] is m)

    def _locate(self, step: int, mode: Mode | str | None, worker: str | None) -> tuple[int, str, Location]:
        m = None if mode is None else Mode.parse(mode)
        info = self._info
        gstep = self.trial.global_step(step, m)
        workers = info.locations.get(gstep) if gstep is not None else None
        if workers:
            if worker is None:
                worker = sorted(workers)[0]
            if worker in workers:
                return gstep, worker, workers[worker]  # type: ignore[return-value]
            raise TensorUnavailableForStep(
                f"{self.name!r} at step {step}: worker {worker!r} did not save it; "
                f"workers: {', '.join(sorted(workers))}"
            )
        state = self.trial.has_passed_step(step, m)
        if state is StepState.NOT_YET_AVAILABLE:
            raise StepNotYetAvailable(step, m)
        if self.trial._past_end(step, m):
            raise NoMoreData(f"training has ended at step {self.trial._last(m)}; there is no step {step}")
        if state is StepState.AVAILABLE:
            raise TensorUnavailableForStep(f"{self.name!r} was not saved at step {step} (other tensors were)")
        raise StepUnavailable(step, m)

    def _reader_value(self, step: int, loc: Location) -> np.ndarray:
        index = self.trial._index
        value = index.read(loc.shard, lambda r: r.value(self.name, step))
        if value is None:
            why = index.bad_files.get(loc.shard, "it does not hold this value")
            raise TensorUnavailableForStep(f"{self.name!r} at step {step}: shard {loc.shard} cannot be read: {why}")
        return value

    def value(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> np.ndarray:
        """The raw value at ``step`` (a mode step if ``mode``), from ``worker`` or the first in sorted order."""
        gstep, _, loc = self._locate(step, mode, worker)
        if not loc.raw:
            have = ", ".join(loc.reductions) or "none"
            raise TensorUnavailableForStep(
                f"{self.name!r} at step {step}: only reductions were saved ({have}); "
                "save the raw tensor with ReductionConfig(save_raw_tensor=True)"
            )
        return self._reader_value(gstep, loc)

    def values(self, mode: Mode | str | None = None, worker: str | None = None) -> dict[int, np.ndarray]:
        """Every raw value, by step (mode step if ``mode``); one read per shard."""
        m = None if mode is None else Mode.parse(mode)
        index = self.trial._index
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for gstep, workers in self._info.locations.items():
            if m is not None and (gstep not in index.steps or index.steps[gstep][0] is not m):
                continue
            w = worker if worker is not None else min(workers)
            loc = workers.get(w)
            if loc is None or not loc.raw:
                continue
            key = index.steps[gstep][1] if m is not None else gstep
            by_shard.setdefault(loc.shard, []).append((gstep, key))
        out: dict[int, np.ndarray] = {}
        for shard, wanted in by_shard.items():
            stored = index.read(shard, lambda r: r.values(self.name))
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
        """A reduction at ``step``: the saved one, or computed from the raw tensor with the same formula."""
        key = red.reduction_key(reduction, abs)
        if red.split_key(key)[0] not in red.ALL_REDUCTIONS:
            raise ValueError(f"reduction: {reduction!r} is not valid; valid: {', '.join(red.ALL_REDUCTIONS)}")
        gstep, _, loc = self._locate(step, mode, worker)
        if key in loc.reductions:
            saved = self.trial._index.read(loc.shard, lambda r: r.reductions(self.name))
            if saved is not None and (gstep, key) in saved:
                return saved[(gstep, key)]
        if loc.raw:
            return red.compute(self._reader_value(gstep, loc), key)
        raise TensorUnavailableForStep(
            f"{self.name!r} at step {step}: reduction {key!r} was not saved and no raw tensor was; "
            f"saved: {', '.join(loc.reductions) or 'none'}"
        )

    def reduction_values(
        self, reduction: str, abs: bool = False, mode: Mode | str | None = None, worker: str | None = None
    ) -> dict[int, float]:
        """A reduction at every step where it is saved or computable, by step."""
        out = {}
        for s in self.steps(mode):
            try:
                out[s] = self.reduction_value(s, reduction, abs, mode, worker)
            except TensorUnavailableForStep:
                continue
        return out

    def available_reductions(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> list[str]:
        """Reduction keys saved at ``step`` (any reduction is computable when the raw tensor was saved)."""
        return list(self._locate(step, mode, worker)[2].reductions)

    def has_raw(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> bool:
        """Whether the raw value was saved at ``step``."""
        return self._locate(step, mode, worker)[2].raw

    def workers(self, step: int, mode: Mode | str | None = None) -> list[str]:
        """Workers that saved this tensor at ``step``."""
        m = None if mode is None else Mode.parse(mode)
        gstep = self.trial.global_step(step, m)
        return sorted(self._info.locations.get(gstep, {})) if gstep is not None else []

    def shape(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> tuple[int, ...]:
        """Shape of the raw value at ``step``."""
        return tuple(self.value(step, mode, worker).shape)

    def _row_values(
        self, step: int, worker: str, loc: Location, reductions: Sequence[str] | None
    ) -> list[tuple[str, float]]:
        if reductions is None:
            if loc.raw:
                v = self._reader_value(step, loc)
                if v.size == 1:
                    return [("value", float(v.reshape(()).item()))]
            keys = list(loc.reductions)
        else:
            keys = list(reductions)
        out = []
        for k in keys:
            name, absolute = red.split_key(k)
            try:
                out.append((k, self.reduction_value(step, name, absolute, worker=worker)))
            except TensorUnavailableForStep:
                continue
        return out


def select_names(
    entries: Iterable[tuple[str, AbstractSet[str], Mapping[int, Any]]],
    step_modes: Mapping[int, tuple[Mode, int]],
    collection: str | None,
    regex: str | Sequence[str] | None,
    mode: Mode | str | None,
    step: int | None,
    global_step: Callable[[int, Mode | None], int | None],
) -> list[str]:
    """The filter behind ``tensor_names`` of :class:`Trial` and of the rules' in-memory trial.

    Parameters
    ----------
    entries
        ``(name, collections, {global step: ...})`` of every tensor.
    step_modes
        ``{global step: (mode, mode step)}`` of every saved step.
    collection, regex, mode, step
        As :meth:`Trial.tensor_names` takes them (``step`` is a mode step when ``mode`` is given).
    global_step
        Maps a (mode) step to its global step, None when it is unknown.
    """
    pats = [re.compile(r) for r in ([regex] if isinstance(regex, str) else regex or [])]
    m = None if mode is None else Mode.parse(mode)
    gstep = None if step is None else global_step(step, m)
    if step is not None and gstep is None:
        return []
    out = []
    for name, collections, steps in entries:
        if collection is not None and collection not in collections:
            continue
        if pats and not any(p.search(name) for p in pats):
            continue
        if gstep is not None and gstep not in steps:
            continue
        if m is not None and not any(step_modes[s][0] is m for s in steps if s in step_modes):
            continue
        out.append(name)
    return sorted(out)


def create_trial(
    path: str | os.PathLike[str], wait: bool = False, timeout: float | None = None, **kwargs: Any
) -> Trial:
    """Open the trial at ``path`` (local directory or fsspec URL).

    Raises
    ------
    TrialNotFound
        If nothing exists at ``path`` (with ``wait=True``: after ``timeout`` seconds).
    """
    return Trial(path, wait=wait, timeout=timeout, **kwargs)


open_trial = create_trial
