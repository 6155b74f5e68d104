"""How rules pick tensors (collections and regexes) and read them (reductions first, raw when needed).

Everything here works on a :class:`~tensortap.trial.Trial` and on the
in-memory view a hook gives in-process rules, which offer the same methods.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from ... import reductions as red
from ...exceptions import UnknownName
from ...modes import Mode
from ..trial import StepWindow, Tensor
from .base import Requirement, Rule, check_regexes, name_list, regex_list

# a loss is judged in each of these modes, each mode's steps a series of their own (a validation loss against
# validation losses): which mode is judged never depends on which steps exist yet (live, in-process, offline)
LOSS_MODES = (Mode.EVAL, Mode.TRAIN, Mode.GLOBAL)
# weights saved while evaluating or predicting do not change: tensors are judged on their TRAIN steps (GLOBAL: saved
# without a mode), never on EVAL or PREDICT steps (a sanity-check validation before the training)
TRAINING_MODES = (Mode.TRAIN, Mode.GLOBAL)


class Selection:
    """Which tensors a rule inspects.

    ``collection_names`` and ``tensor_regex`` select the union of the tensors of
    those collections and the tensors whose name matches one of the regexes
    (``re.search``). When neither is given, ``default_collections`` are used.

    Parameters
    ----------
    collection_names
        Collection names (a list, or one string with names separated by commas).
    tensor_regex
        One regex or a list of regexes.
    default_collections
        Collections used when nothing is given; empty: every tensor.
    default_exclude
        When nothing is given and ``default_collections`` is empty: collections
        whose tensors "every tensor" leaves out.
    """

    def __init__(
        self,
        collection_names: str | Sequence[str] | None,
        tensor_regex: str | Sequence[str] | None,
        default_collections: Sequence[str],
        default_exclude: Sequence[str] = (),
    ) -> None:
        self.collections = name_list("collection_names", collection_names)
        self.regexes = regex_list(tensor_regex)
        check_regexes("tensor_regex", self.regexes)
        self.exclude: tuple[str, ...] = ()
        if not self.collections and not self.regexes:
            self.collections = tuple(default_collections)
            self.exclude = () if self.collections else tuple(default_exclude)

    def names(self, trial: Any, step: int | None = None) -> list[str]:
        """Selected tensor names saved at global ``step`` (all steps if None), sorted; a collection named that the
        trial lacks adds none (:meth:`names_for` tells the rule)."""
        return self._names(trial, step)[0]

    def _names(self, trial: Any, step: int | None) -> tuple[list[str], list[UnknownName]]:
        """:meth:`names`, and the errors of the collections named that are no collection of ``trial``."""
        if not self.collections and not self.regexes:
            names = trial.tensor_names(step=step)
            left_out: set[str] = set()
            for c in self.exclude:
                try:
                    left_out.update(trial.tensor_names(collection=c, step=step))
                except UnknownName:
                    continue
            return [n for n in names if n not in left_out], []
        out: set[str] = set()
        unknown = []
        for c in self.collections:
            try:
                out.update(trial.tensor_names(collection=c, step=step))
            except UnknownName as exc:
                unknown.append(exc)
        if self.regexes:
            out.update(trial.tensor_names(regex=list(self.regexes), step=step))
        return sorted(out), unknown

    def names_for(self, rule: Rule, step: int, requirement: Requirement, *, partial: bool = False) -> list[str]:
        """:meth:`names` at ``step`` in the trial of ``rule``, recording with :meth:`Rule.need` what it lacks.

        Where the trial holds no selected tensor at all: :meth:`need_in_trial`. Where it holds some, each
        collection named that is no collection of the trial (nor one its hook saves) is a partial need naming
        it and the closest collections (``did you mean 'gradients'?``): a misspelled name among valid ones
        would otherwise judge only the others. Either is decided at each step, as the trial is then (a live
        training may write a collection later), as for a single name; a collection that shows up is no longer
        needed (:meth:`Rule.need_met`).

        Parameters
        ----------
        rule
            The rule reading the tensors.
        step
            The global step being evaluated.
        requirement
            What to capture where the trial holds no selected tensor; its reductions and raw flag also for a
            collection it lacks.
        partial
            Whether the rule judges the step with its other inputs where the trial holds no selected tensor
            (as :meth:`Rule.need`).
        """
        names, unknown = self._names(rule.base_trial, step)
        if not names and not self.names(rule.base_trial):
            self.need_in_trial(rule, step, requirement, partial=partial)
            return names
        lacking = {exc.name: exc for exc in unknown}
        lacked = rule._progress.lacked  # kept with the rule's state: a resumed rule forgets the need too
        for c in self.collections:
            collection = Requirement(c, requirement.reductions, requirement.raw)
            what = collection.describe()
            if c in lacking:  # said once, in the words of the first step that lacked it
                rule.need(step, collection, lacked.setdefault(what, str(lacking[c])), partial=True)
            elif what in lacked:
                rule.need_met(step, collection, lacked.pop(what))
        return names

    def requirements(self, reductions: Sequence[str] = (), raw: bool = False) -> list[Requirement]:
        """One :class:`Requirement` per selected collection."""
        return [Requirement(c, tuple(reductions), raw) for c in self.collections]

    def need_in_trial(self, rule: Rule, step: int, requirement: Requirement, *, partial: bool = False) -> None:
        """Record with :meth:`Rule.need` that the trial holds no selected tensor at all (at ``step``).

        What the rule needs is ``requirement`` (what to capture) where the
        selection names collections or is every tensor; where it is only
        regexes, a tensor they match (a collection the regexes never
        searched would mislead). ``partial``: as :meth:`Rule.need` (the rule
        judges the step with its other inputs).
        """
        if self.regexes and not self.collections:
            rule.need(step, f"a tensor of {self.describe()}", "none in the trial", partial=partial)
        else:
            rule.need(step, requirement, f"no tensor of {self.describe()} in the trial", partial=partial)

    def describe(self) -> str:
        """Words for error messages: which collections and regexes were searched."""
        every = f"collections other than {', '.join(self.exclude)}" if self.exclude else "any tensor"
        parts = [] if self.collections or self.regexes else [every]
        if self.collections:
            parts.append(f"collection(s) {', '.join(self.collections)}")
        if self.regexes:
            parts.append(f"regex(es) {', '.join(self.regexes)}")
        return " or ".join(parts)


def untrained_weights(trial: Any) -> set[str]:
    """The weights and biases of ``trial`` that have no gradient in it while others have one: not trained.

    A frozen layer (PyTorch ``requires_grad=False``, Keras ``trainable=False``)
    is saved with the weights but gets no gradient; every capture names the
    gradient of weight ``w`` ``gradients/w``. Empty when no weight has a
    gradient in the trial (gradients not captured: nothing tells).
    """
    weights = set(Selection(("weights", "biases"), None, ()).names(trial))
    gradients = set(Selection(("gradients",), None, ()).names(trial))
    trained = {w for w in weights if f"gradients/{w}" in gradients}
    return weights - trained if trained else set()


def judged_workers(trial: Any, name: str, step: int) -> list[str | None]:
    """The workers whose value of tensor ``name`` at global ``step`` a rule judges, each on its own: on a trial
    of several workers, every worker that saved it there (each rank trains on its own batches: a NaN on one
    rank alone is a NaN of the training); on a trial of one worker (and in-process, where a hook's view holds
    its own worker), ``[None]``: the one worker, read as before."""
    return trial.tensor(name).workers(step) if len(trial.workers()) > 1 else [None]


def on_worker(name: str, worker: str | None) -> str:
    """``name`` as reasons show it and rules keep its state: ``"losses/loss on worker_1"`` for ``worker``, the
    name alone for None (:func:`judged_workers` on a trial of one worker)."""
    return name if worker is None else f"{name} on {worker}"


class StepRead:
    """One tensor at one global step, as rules read it: whether it holds its raw value and which reductions,
    and these, read through the window of its shard (``Tensor._window``: a loop over steps reads each shard
    once) where the trial offers one, else at the step alone (the in-memory view of in-process rules).

    Raises what :meth:`~tensortap.trial.Tensor.has_raw` raises where ``name`` was not saved at ``step`` (by
    ``worker``).

    Parameters
    ----------
    trial
        A :class:`~tensortap.trial.Trial`, or the in-memory view a hook gives in-process rules.
    name
        The tensor's name.
    step
        The global step.
    worker
        The worker whose value is read; None: the first in sorted order that saved it.
    """

    def __init__(self, trial: Any, name: str, step: int, worker: str | None = None) -> None:
        self.name = name
        self.step = step
        self.worker = worker
        self.tensor = trial.tensor(name)
        self.window: StepWindow | None = None
        self.raw: bool
        self.reductions: tuple[str, ...]
        if isinstance(self.tensor, Tensor):
            self.window = self.tensor._window(step, worker)
            loc = self.window.locations[step]
            self.raw, self.reductions = loc.raw, loc.reductions
        else:
            self.raw = self.tensor.has_raw(step, worker=worker)
            self.reductions = tuple(self.tensor.available_reductions(step, worker=worker))

    def value(self) -> np.ndarray:
        """The raw value (:class:`~tensortap.exceptions.ShardUnreadable` where its shard cannot be read; where
        the shard lacks it, what reading the step alone raises)."""
        got = self.window.value(self.step) if self.window is not None else None
        return got if got is not None else np.asarray(self.tensor.value(self.step, worker=self.worker))

    def reduction(self, key: str) -> float:
        """Reduction ``key`` (e.g. ``"abs_mean"``): the saved one, or computed from the raw value (raises as
        :meth:`value` does)."""
        got = self.window.reduction_value(self.step, key) if self.window is not None else None
        if got is not None:
            return float(got)
        base, absolute = red.split_key(key)
        return float(self.tensor.reduction_value(self.step, base, abs=absolute, worker=self.worker))

    def reduction_for(self, rule: Rule, key: str, requirement: Requirement) -> float | None:
        """:meth:`reduction` for ``rule``, or None after recording with :meth:`Rule.need` that neither the
        reduction nor the raw value was saved (:func:`reduction_at`)."""
        if self.raw or key in self.reductions:
            rule.found_input()
            return self.reduction(key)
        rule.need(
            self.step, requirement, f"{self.name!r} has neither reduction {key!r} nor its raw value", partial=True
        )
        return None

    def value_for(self, rule: Rule, requirement: Requirement) -> np.ndarray | None:
        """:meth:`value` for ``rule``, or None after recording that only reductions were saved (:func:`raw_at`)."""
        if self.raw:
            rule.found_input()
            return self.value()
        rule.need(self.step, requirement, f"{self.name!r} was saved as reductions only", partial=True)
        return None


def reduction_at(
    rule: Rule, trial: Any, name: str, step: int, key: str, requirement: Requirement, worker: str | None = None
) -> float | None:
    """Reduction ``key`` (e.g. ``"abs_mean"``) of ``name`` at ``step``: saved, or computed from the raw value.

    Returns None (after recording what is missing with :meth:`Rule.need`) when
    neither the reduction nor the raw tensor was saved. ``worker``: whose value
    (None: the first worker in sorted order that saved it).
    """
    return StepRead(trial, name, step, worker).reduction_for(rule, key, requirement)


def raw_at(
    rule: Rule, trial: Any, name: str, step: int, requirement: Requirement, worker: str | None = None
) -> np.ndarray | None:
    """The raw value of ``name`` at ``step`` (of ``worker``, as :func:`reduction_at`), or None after recording
    that it is missing."""
    return StepRead(trial, name, step, worker).value_for(rule, requirement)


def scalar_at(
    rule: Rule, trial: Any, name: str, step: int, requirement: Requirement, worker: str | None = None
) -> float | None:
    """A scalar tensor (a loss, a metric) at ``step`` (of ``worker``, as :func:`reduction_at`): its value, or its
    saved ``mean``."""
    read = StepRead(trial, name, step, worker)
    if read.raw:
        rule.found_input()
        v = np.asarray(read.value(), dtype=np.float64)
        return float(v.reshape(-1)[0]) if v.size == 1 else float(np.mean(v))
    if "mean" in read.reductions:
        rule.found_input()
        return read.reduction("mean")
    rule.need(step, requirement, f"{name!r} has neither its value nor its mean", partial=True)
    return None


def mode_steps(trial: Any, tensor: Any, mode: Mode, worker: str | None = None) -> dict[int, int]:
    """``{global step: mode step}`` of the steps of ``mode`` at which ``tensor`` was saved (by ``worker``; None:
    by any worker)."""
    out = {}
    for ms in tensor.steps(mode=mode):
        g = trial.global_step(ms, mode)
        if g is not None and (worker is None or worker in tensor.workers(g)):
            out[g] = ms
    return out


def parse_mode(value: Mode | str | None) -> Mode | None:
    """A rule's ``mode`` parameter: None, a Mode, or a mode name."""
    return None if value is None else Mode.parse(value)


class PerTensorRule(Rule):
    """A rule that checks each selected tensor on its own and fires when any one fails.

    On a trial of several workers, the tensor of each worker that saved it is
    checked on its own (:func:`judged_workers`), and the reason names the worker.
    Subclasses set :attr:`selection` and implement :meth:`check`, which returns
    the reason of a failure or None.
    """

    selection: Selection
    hook_collections: tuple[str, ...] = ("weights", "biases", "gradients", "losses")

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        """Return why tensor ``name`` of ``worker`` (None: the trial's one worker) fails at ``step``, or None."""
        raise NotImplementedError

    def capture(self) -> tuple[tuple[str, ...], bool]:
        """Reduction keys this rule reads, and whether it needs raw tensors."""
        return (), True

    def required_captures(self) -> list[Requirement]:
        """The selected collections (or :attr:`hook_collections` when every tensor is selected)."""
        keys, raw = self.capture()
        collections = self.selection.collections or self.hook_collections
        return [Requirement(c, keys, raw) for c in collections]

    def requirement(self, name: str | None = None) -> Requirement:
        """The requirement reported when an input is missing: for tensor ``name``, that of the first selected
        collection it belongs to, else of its own first collection (an ``outputs/...`` tensor of a rule that
        inspects every tensor needs collection ``outputs``); without ``name``, the first of
        :meth:`required_captures`."""
        first = self.required_captures()[0]
        if name is None:
            return first
        held = self.base_trial.tensor(name).collections
        wanted = [c for c in self.selection.collections if c in held] or held
        return Requirement(wanted[0], first.reductions, first.raw) if wanted else first

    def invoke_at_step(self, step: int) -> bool:
        """Fire when :meth:`check` finds a failing tensor at ``step``; the reason names the first (and its
        worker, and the other workers with a failing tensor, on a trial of several)."""
        trial = self.base_trial
        names = self.selection.names_for(self, step, self.requirement())
        if not names:
            return False
        hits = [
            (n, w, r)
            for n in names
            for w in judged_workers(trial, n, step)
            if (r := self.check(step, n, w)) is not None
        ]
        if not hits:
            return False
        tensors = list(dict.fromkeys(n for n, _, _ in hits))
        _, worker, reason = hits[0]
        more = f" (and {len(tensors) - 1} more tensor(s))" if len(tensors) > 1 else ""
        if worker is not None:
            others = sorted({w for _, w, _ in hits if w is not None and w != worker})
            more = f" on {worker}{more}" + (f" (also on {', '.join(others)})" if others else "")
        return self.fire(step, f"{reason} at step {step}{more}", tensors)


class ModeSeries:
    """Per tensor, worker and mode, the steps in that mode at which the worker saved the tensor, kept up to date
    as steps come in order.

    A step is judged when its mode is one of ``modes``, in the series of the
    tensor's steps of that mode; steps of other modes are skipped. Each worker
    judged (:func:`judged_workers`) has a series of its own, of the steps it
    saved: a step another worker saved alone is not read from it. Whether a
    step is judged depends on its own mode alone, never on the modes of the
    steps saved so far: a rule judges the same steps in-process, live and
    offline. Each series is read from the trial once, then extended step by
    step, so each step costs ``O(log n)``.

    Parameters
    ----------
    modes
        The modes judged.
    """

    def __init__(self, modes: Sequence[Mode]) -> None:
        self.modes = tuple(modes)
        self._series: dict[tuple[str, str | None, Mode], list[tuple[int, int]]] = {}

    def at(
        self, trial: Any, name: str, step: int, worker: str | None = None
    ) -> tuple[Mode, int, list[tuple[int, int]], int] | None:
        """``(mode, mode step, [(mode step, global step), ...], index of step)`` in the series of ``worker`` (None:
        of every worker, the trial's one), or None if ``step`` is not judged."""
        where = trial.mode_step(step)
        if where is None or where[0] not in self.modes:
            return None
        mode: Mode = where[0]
        ms: int = where[1]
        series = self._series.get((name, worker, mode))
        if series is None:
            by_global = mode_steps(trial, trial.tensor(name), mode, worker)
            series = self._series[(name, worker, mode)] = sorted((m, g) for g, m in by_global.items())
        if not series or series[-1][1] < step:
            series.append((ms, step))
        return mode, ms, series, bisect.bisect_right(series, (ms, step)) - 1
