"""Rules evaluated inside the training process, on the steps a hook saves (``Hook(..., rules=[...])``).

The hook hands every saved step to :class:`InProcessRunner` before it goes to
the writer. The runner keeps what was saved in a :class:`MemoryTrial`, which
offers the :class:`~tensortap.trial.Trial` methods rules use (others raise an
``AttributeError`` that lists these), and evaluates its rules on it at once. A
rule with the ``StopTraining`` action sets the hook's stop request at the step
that made it fire; the adapter stops the training at its next check: XGBoost
after that round, PyTorch and Keras at the next batch (the step after the
firing one runs). When the hook closes, each rule judges what the last step
left pending (:meth:`~tensortap.rules.Rule.on_training_end`).

A rule object judges one run. :class:`RuleSet` gives a callback that opens
several runs (a second ``xgb.train``, a copy of a Keras callback) rules of
their own for each new run.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import numpy as np

from ... import reductions as red
from ...backends.shard import StepRecord
from ...config import Collection
from ...exceptions import TensorUnavailable, TensorUnavailableForStep, UnknownName
from ...modes import Mode, StepState
from ..index import steps_meet
from ..trial import (
    STEP_FIRST,
    Tensor,
    Trial,
    check_reduction_name,
    collection_name,
    refuse_mode,
    refuse_mode_as_abs,
    select_names,
)
from .actions import Action
from .base import Rule, RuleFailure, Verdict, logger

# saved steps of scalars and reductions kept in memory (raw tensors: each rule's ``history``)
SMALL_HISTORY = 10_000


class SavingHook(Protocol):
    """What a :class:`MemoryTrial` reads of the hook that feeds it (:class:`tensortap.capture.Hook`)."""

    out_dir: str
    worker: str
    included: tuple[str, ...]
    collections: dict[str, Collection]

    @property
    def should_stop(self) -> bool: ...

    @property
    def stop_reason(self) -> str | None: ...

    def request_stop(self, reason: str, **details: Any) -> None: ...


def fresh_copies(rules: Iterable[Rule]) -> list[Rule]:
    """Copies of ``rules`` as they are now, bound to no trial, for a run of their own; their actions are
    the same objects (a notifier, ``StopTraining``: what a firing does, not what the rule has seen).

    Raises
    ------
    ValueError
        A rule cannot be copied (it holds something ``copy.deepcopy`` refuses).
    """
    out = []
    for rule in rules:
        memo: dict[int, Any] = {id(a): a for a in rule.actions}
        if rule.base_trial is not None:
            memo[id(rule.base_trial)] = None
        try:
            out.append(copy.deepcopy(rule, memo))
        except Exception as exc:
            raise ValueError(
                f"rules: {rule!r} cannot be copied ({type(exc).__name__}: {exc}); each new run of a callback is "
                "judged by a copy of its rules as given"
            ) from exc
    return out


class RuleSet:
    """The in-process rules given to a callback that opens several runs, and those of each new run.

    A new run is judged from scratch: its first run by the rule objects given (after training they hold
    its verdicts: ``rule.fired_steps``), each later one by fresh copies of them as they were given
    (:func:`fresh_copies`, made here, before any run), found in the ``rules`` of that run's hook.
    A training that goes on in the same run keeps the rules of that run.

    Parameters
    ----------
    rules
        The rules as given (checked by :func:`tensortap.capture.core.check_rules`).
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.given = list(rules)
        self._given_used = False
        # a rule that cannot be copied judges the first run; the error is raised where a second one needs a copy
        self._template: list[Rule] | ValueError
        try:
            self._template = fresh_copies(self.given)
        except ValueError as exc:
            self._template = exc

    def for_new_run(self) -> list[Rule]:
        """The rules that judge a new run: those given the first time, fresh copies of them after."""
        if not self._given_used:
            self._given_used = True
            return self.given
        return self._copies()

    def copy(self) -> RuleSet:
        """The rule set of a copy of the callback: fresh copies of the rules as given, its own to use."""
        return RuleSet(self._copies())

    def _copies(self) -> list[Rule]:
        if isinstance(self._template, ValueError):
            raise self._template
        return fresh_copies(self._template)


@dataclass
class _Saved:
    """One tensor's kept steps: ``{global step: (raw value or None, reductions)}``."""

    collections: set[str] = field(default_factory=set)
    values: dict[int, tuple[np.ndarray | None, dict[str, float]]] = field(default_factory=dict)

    def __contains__(self, step: object) -> bool:
        return step in self.values

    def any_in(self, steps: np.ndarray) -> bool:
        """Whether one or more of ``steps`` (sorted, unique int64) is kept."""
        return steps_meet(np.sort(np.fromiter(self.values, dtype=np.int64, count=len(self.values))), steps)


def _not_in_memory(offline: type, own: type, kind: str, name: str) -> NoReturn:
    """Raise the ``AttributeError`` for ``name``: a method of ``offline`` (:class:`Trial`, :class:`Tensor`) that
    ``own`` (its in-memory counterpart) lacks is named so, with the methods in-process rules may use."""
    public = {n for n in dir(offline) if not n.startswith("_")}
    if name not in public:
        raise AttributeError(f"{kind!r} object has no attribute {name!r}")
    supported = sorted(public & {n for n in dir(own) if not n.startswith("_")})
    raise AttributeError(
        f"{kind}.{name} is not available to in-process rules (Hook(rules=[...])), which read the steps kept in "
        f"memory; they may use: {', '.join(supported)}. Run the rule on the trial (invoke_rule) to use {name}"
    )


class MemoryTensor:
    """One tensor of a :class:`MemoryTrial` (the subset of :class:`~tensortap.trial.Tensor` rules use)."""

    def __init__(self, trial: MemoryTrial, name: str) -> None:
        self.trial = trial
        self.name = name
        self._saved = trial._tensors[name]

    def __getattr__(self, name: str) -> NoReturn:
        _not_in_memory(Tensor, MemoryTensor, "MemoryTensor", name)

    @property
    def collections(self) -> list[str]:
        """Collections this tensor belongs to."""
        return sorted(self._saved.collections)

    def steps(self, mode: Mode | str | None = None) -> list[int]:
        """Steps kept in memory (mode steps when ``mode`` is given)."""
        return sorted(self._kept(mode))

    def _kept(self, mode: Mode | str | None) -> dict[int, int]:
        """``{step or mode step: global step}`` of the steps kept in memory."""
        if mode is None:
            return {s: s for s in self._saved.values}
        m = Mode.parse(mode)
        placed = ((s, self.trial.mode_step(s)) for s in self._saved.values)
        return {where[1]: s for s, where in placed if where is not None and where[0] is m}

    def _entry(
        self, step: int, mode: Mode | str | None = None, worker: str | None = None
    ) -> tuple[np.ndarray | None, dict[str, float]]:
        g = self.trial.global_step(step, mode)
        if g is None or g not in self._saved.values or worker not in (None, self.trial.worker):
            raise TensorUnavailableForStep(f"{self.name!r} was not saved at step {step} (or is no longer in memory)")
        return self._saved.values[g]

    def workers(self, step: int, mode: Mode | str | None = None) -> list[str]:
        """``[this worker]`` if the tensor is kept at ``step``, else ``[]``."""
        g = self.trial.global_step(step, mode)
        return [self.trial.worker] if g in self._saved.values else []

    def has_raw(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> bool:
        """Whether the raw value is kept at ``step``."""
        return self._entry(step, mode, worker)[0] is not None

    def available_reductions(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> list[str]:
        """Reduction keys saved at ``step``."""
        return list(self._entry(step, mode, worker)[1])

    def value(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> np.ndarray:
        """The raw value at ``step``."""
        raw, reds = self._entry(step, mode, worker)
        if raw is None:
            raise TensorUnavailableForStep(
                f"{self.name!r} at step {step}: only reductions were saved ({', '.join(reds) or 'none'})"
            )
        return raw

    def shape(self, step: int, mode: Mode | str | None = None, worker: str | None = None) -> tuple[int, ...]:
        """Shape of the raw value at ``step``."""
        return tuple(self.value(step, mode, worker).shape)

    def values(self, mode: Mode | str | None = None, worker: str | None = None) -> dict[int, np.ndarray]:
        """Every raw value kept in memory, by step (mode step if ``mode``)."""
        if worker not in (None, self.trial.worker):
            return {}
        kept = self._saved.values
        return {s: raw for s, g in sorted(self._kept(mode).items()) if (raw := kept[g][0]) is not None}

    def reduction_value(
        self,
        step: int,
        reduction: str,
        abs: bool = False,
        mode: Mode | str | None = None,
        worker: str | None = None,
    ) -> float:
        """A reduction at ``step``: the saved one, or computed from the raw value."""
        check_reduction_name(reduction)
        refuse_mode_as_abs(abs, "reduction_value(step, reduction")
        key = red.reduction_key(reduction, abs)
        raw, reds = self._entry(step, mode, worker)
        if key in reds:
            return float(reds[key])
        if raw is not None:
            return red.compute(raw, key)
        raise TensorUnavailableForStep(f"{self.name!r} at step {step}: reduction {key!r} was not saved")

    def reduction_values(
        self, reduction: str, abs: bool = False, mode: Mode | str | None = None, worker: str | None = None
    ) -> dict[int, float]:
        """A reduction at every step kept in memory where it is saved or computable, by step (mode step if
        ``mode``)."""
        check_reduction_name(reduction)
        refuse_mode_as_abs(abs, "reduction_values(reduction")
        key = red.reduction_key(reduction, abs)
        red.check_key(key)
        out = {}
        for s, g in sorted(self._kept(mode).items() if worker in (None, self.trial.worker) else ()):
            raw, reds = self._saved.values[g]
            if key in reds:
                out[s] = float(reds[key])
            elif raw is not None:
                out[s] = red.compute(raw, key)
        return out


class MemoryTrial:
    """The steps a hook saved, kept in memory, with the :class:`~tensortap.trial.Trial` methods rules use.

    Raw tensors of more than one element are kept for the last ``keep`` saved
    steps of each tensor in each mode (a rule that compares TRAIN steps reads
    the one before an evaluation); scalars and reductions for the last
    ``SMALL_HISTORY``.
    A ``Trial`` method it lacks raises an ``AttributeError`` that lists those it has.
    """

    training_ended = False

    def __init__(self, hook: SavingHook) -> None:
        self.hook = hook
        self.path = hook.out_dir
        self.worker = hook.worker
        self.keep = 1
        self._steps: dict[int, tuple[Mode, int]] = {}
        self._by_mode: dict[Mode, dict[int, int]] = {}
        self._tensors: dict[str, _Saved] = {}

    def __repr__(self) -> str:
        return f"<MemoryTrial of {self.path!r}: {len(self._steps)} steps in memory>"

    def __getattr__(self, name: str) -> NoReturn:
        _not_in_memory(Trial, MemoryTrial, "MemoryTrial", name)

    def __reduce__(self) -> tuple[type[None], tuple[()]]:
        """A copy or pickle of a rule a hook evaluates is bound to no trial (its hook, its writer cannot be
        copied): the hook it is given to binds it (a callback copied after a training, ``sklearn.base.clone``)."""
        return type(None), ()

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def add(self, record: StepRecord) -> None:
        """Keep one saved step."""
        mode = Mode(record.mode)
        self._steps[record.step] = (mode, record.mode_step)
        self._by_mode.setdefault(mode, {})[record.mode_step] = record.step
        for t in record.tensors:
            saved = self._tensors.setdefault(t.name, _Saved())
            saved.collections.update(t.collections)
            saved.values[record.step] = (t.raw, dict(t.reductions))
            self._trim(saved)

    def _trim(self, saved: _Saved) -> None:
        big: dict[Mode, list[int]] = {}
        for s, (raw, _) in saved.values.items():
            if raw is not None and raw.size > 1:
                big.setdefault(self._steps[s][0], []).append(s)
        for steps in big.values():
            for s in sorted(steps)[: -self.keep]:
                del saved.values[s]
        if len(saved.values) > SMALL_HISTORY:
            for s in sorted(saved.values)[: len(saved.values) - SMALL_HISTORY]:
                del saved.values[s]

    def refresh(self) -> None:
        """Nothing to do: the hook adds every step as it is saved."""

    def workers(self) -> list[str]:
        """``[this worker]``: a hook's rules see its own steps."""
        return [self.worker]

    def steps(self, mode: Mode | str | None = None, show_incomplete: bool = False) -> list[int]:
        """Saved steps (mode steps when ``mode`` is given)."""
        if mode is None:
            return sorted(self._steps)
        return sorted(self._by_mode.get(Mode.parse(mode), {}))

    def last_complete_step(self, mode: Mode | str | None = None) -> int | None:
        """The last saved step (mode step when ``mode`` is given), or None."""
        steps = self._steps if mode is None else self._by_mode.get(Mode.parse(mode), {})
        return max(steps, default=None)

    def has_passed_step(self, step: int, mode: Mode | str | None = None) -> StepState:
        """Whether ``step`` (a mode step if ``mode``) was saved, was passed without saving, or is still to come."""
        refuse_mode(step, STEP_FIRST + "has_passed_step(step, mode={mode})")
        steps = self._steps if mode is None else self._by_mode.get(Mode.parse(mode), {})
        if step in steps:
            return StepState.AVAILABLE
        if self.training_ended or step <= max(steps, default=-1):
            return StepState.UNAVAILABLE
        return StepState.NOT_YET_AVAILABLE

    def modes(self) -> list[Mode]:
        """Modes with saved steps."""
        return sorted(self._by_mode)

    def mode_step(self, step: int) -> tuple[Mode, int] | None:
        """The mode and mode step of global ``step``."""
        return self._steps.get(step)

    def global_step(self, step: int, mode: Mode | str | None = None) -> int | None:
        """The global step of mode step ``step`` (``step`` itself without ``mode``)."""
        refuse_mode(step, STEP_FIRST + "global_step(step, mode) (smdebug's was global_step(mode, mode_step))")
        if mode is None:
            return step
        return self._by_mode.get(Mode.parse(mode), {}).get(step)

    def _collection_names(self) -> set[str]:
        """The collections the hook saves and those of the tensors saved (what a trial's worker record and
        index list)."""
        return set(self.hook.included).union(*(saved.collections for saved in self._tensors.values()))

    def tensor_names(
        self,
        collection: str | Collection | None = None,
        regex: str | Sequence[str] | None = None,
        mode: Mode | str | None = None,
        step: int | None = None,
    ) -> list[str]:
        """Names kept in memory, filtered like :meth:`tensortap.trial.Trial.tensor_names`.

        Raises
        ------
        UnknownName
            ``collection`` is neither saved by the hook nor one of a saved tensor (as on the trial: a
            collection the hook saves but holds no tensor yet gives ``[]``).
        """
        name = collection_name(collection)
        if name is not None and name not in (known := self._collection_names()):
            raise UnknownName("collection", name, known, f" saved by the hook of {self.path}")
        entries = ((n, saved.collections, saved) for n, saved in self._tensors.items())
        return select_names(entries, self._steps_of_mode, name, regex, mode, step, self.global_step)

    def _steps_of_mode(self, mode: Mode) -> np.ndarray:
        by_mode = self._by_mode.get(mode, {})
        return np.unique(np.fromiter(by_mode.values(), dtype=np.int64, count=len(by_mode)))

    def collections(self) -> dict[str, Collection]:
        """The collections the hook saves, with the names of their tensors kept in memory."""
        out = {}
        for name in sorted(self._collection_names()):
            config = self.hook.collections.get(name) or Collection(name)
            members = {n for n, saved in self._tensors.items() if name in saved.collections}
            out[name] = dataclasses.replace(config, tensor_names=members)
        return out

    def collection(self, name: str) -> Collection:
        """One collection; :class:`~tensortap.exceptions.UnknownName` if the hook has no such collection."""
        cols = self.collections()
        if name not in cols:
            raise UnknownName("collection", name, cols, f" saved by the hook of {self.path}")
        return cols[name]

    def tensor(self, name: str) -> MemoryTensor:
        """One tensor; :class:`~tensortap.TensorUnavailable` if it was never saved."""
        if name not in self._tensors:
            raise TensorUnavailable(f"no tensor named {name!r} saved by this hook")
        return MemoryTensor(self, name)

    def stop_request(self) -> dict[str, Any] | None:
        """The stop request the hook has seen, if any."""
        return {"reason": self.hook.stop_reason} if self.hook.should_stop else None

    def request_stop(self, reason: str, **details: Any) -> None:
        """Write a stop request into the trial; the hook sees it at once."""
        self.hook.request_stop(reason, **details)


class InProcessRunner:
    """Evaluates its rules on every step a hook saves (a hook step listener)."""

    def __init__(self, hook: SavingHook) -> None:
        self.trial = MemoryTrial(hook)
        self.rules: list[Rule] = []
        self._fired: dict[int, list[int]] = {}  # id of a rule -> the steps it fired at under this hook

    def add(self, rule: Rule) -> None:
        """Evaluate ``rule`` from the next saved step on (again, if an earlier hook's training switched it off:
        :attr:`Rule.switched_off` is of the last training)."""
        rule.base_trial = self.trial
        rule.switched_off = None
        self.rules.append(rule)
        self._fired[id(rule)] = []
        self.trial.keep = max(self.trial.keep, rule.history)

    def on_step(self, record: StepRecord) -> None:
        """Keep ``record`` and evaluate every rule at its step; a rule that raises is switched off."""
        self.trial.add(record)
        self._evaluate(record.step, lambda rule: rule.invoke(record.step))

    def on_end(self) -> None:
        """The hook closes: the training has ended; every rule judges what its last step left pending, and each
        rule that fired is summed up in one line (its firings after the first were logged at DEBUG)."""
        self.trial.training_ended = True
        self._evaluate(None, lambda rule: rule.invoke_end())
        for rule in self.rules:
            if steps := self._fired[id(rule)]:
                logger.warning(
                    "tensortap: rule %s fired at %d step(s) of this training, first at step %d, last at step %d",
                    rule.name,
                    len(steps),
                    steps[0],
                    steps[-1],
                )

    def _evaluate(self, step: int | None, invoke: Callable[[Rule], Verdict]) -> None:
        """Run ``invoke`` on every rule still on, and its actions where it fires (``step``: None at the end).

        A rule that raises is switched off (:attr:`Rule.switched_off`). Its first firing is logged as a
        warning, the later ones at DEBUG (a diverged training fires at every step). An action that raises is
        logged, naming it and its rule; the rule's other actions still run and the rule stays on.
        """
        for rule in self.rules:
            if rule.switched_off is not None:
                continue
            try:
                verdict = invoke(rule)
            except Exception as exc:
                rule.switched_off = RuleFailure(step, exc)
                logger.error(
                    "tensortap: rule %s failed %s and is switched off: %s",
                    rule.name,
                    "at the end of the training" if step is None else f"at step {step}",
                    exc,
                    exc_info=exc,
                )
                continue
            if verdict.fired:
                fired = self._fired[id(rule)]
                fired.append(verdict.step)
                log = logger.warning if len(fired) == 1 else logger.debug
                log("tensortap: rule %s fired at step %d: %s", rule.name, verdict.step, verdict.reason)
                for action in rule.actions:
                    self._act(action, rule, verdict)

    def _act(self, action: Action, rule: Rule, verdict: Verdict) -> None:
        """Run one action of a firing; its error is logged (the rule stays on, its other actions run)."""
        try:
            action(rule, verdict, self.trial)
        except Exception as exc:
            logger.error(
                "tensortap: action %r of rule %s failed at step %d: %s (the rule stays on; its other actions ran)",
                action,
                rule.name,
                verdict.step,
                exc,
                exc_info=exc,
            )


class RuleHook(SavingHook, Protocol):
    """What :func:`attach` needs of a hook (:class:`tensortap.capture.Hook`)."""

    step_listeners: list[Callable[[StepRecord], None]]
    end_listeners: list[Callable[[], None]]

    def require_capture(self, collection: str, reductions: Sequence[str] = (), raw: bool = False) -> None: ...


def attach(hook: RuleHook, rule: Rule) -> None:
    """Make ``hook`` capture what ``rule`` needs and evaluate it on every saved step.

    Raises
    ------
    ValueError
        What ``rule.required_captures()`` asks for is not valid (a reduction that does not exist): the
        message names the rule.
    """
    runner = next(
        (
            getattr(fn, "__self__", None)
            for fn in hook.step_listeners
            if isinstance(getattr(fn, "__self__", None), InProcessRunner)
        ),
        None,
    )
    if runner is None:
        runner = InProcessRunner(hook)
        hook.step_listeners.append(runner.on_step)
        hook.end_listeners.append(runner.on_end)
    try:
        for req in rule.required_captures():
            hook.require_capture(req.collection, req.reductions, req.raw)
    except ValueError as exc:
        raise ValueError(f"rules: {rule.name}.required_captures(): {exc}") from exc
    runner.add(rule)
