"""The rule contract: :class:`Rule`, its :class:`Verdict`, and :class:`RuleConditionMet`.

A rule looks at one step of a trial at a time (:meth:`Rule.invoke_at_step`)
and answers whether its condition holds there. Built-in rules explain every
firing with :meth:`Rule.fire` (a reason a person can act on, and the tensors
involved) and say what they would need when their inputs are missing
(:meth:`Rule.need`) instead of passing silently. A rule that could use none of
the steps it evaluated (:attr:`Rule.lacks_inputs`) makes the runner raise
:class:`~tensortap.exceptions.RuleInputsMissing`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import re
import reprlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from ... import reductions as red
from ...exceptions import (
    NoMoreData,
    ShardUnreadable,
    StepUnavailable,
    TensortapError,
    TensorUnavailable,
    TensorUnavailableForStep,
    UnknownName,
)

if TYPE_CHECKING:
    from .actions import Action

logger = logging.getLogger("tensortap")

# raised by a rule's own reads at a step: the rule cannot judge that step (smdebug's invoke_rule went on too;
# NoMoreData: a read past the end of an ended training, which smdebug's invoke_rule ended on)
UNREADABLE_INPUT = (TensorUnavailableForStep, StepUnavailable, TensorUnavailable, NoMoreData)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one rule at one step.

    Attributes
    ----------
    rule
        The rule's name (its class name).
    step
        The global step the rule looked at.
    fired
        Whether the rule's condition held.
    reason
        Why it fired, in words a person can act on; for a verdict that did not
        fire, empty, or ``"not judged: ..."`` where the rule could not judge
        the step (what it reads there is missing, see :meth:`Rule.invoke`).
    tensors
        Names of the tensors involved.
    """

    rule: str
    step: int
    fired: bool
    reason: str = ""
    tensors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "rule": self.rule,
            "step": self.step,
            "fired": self.fired,
            "reason": self.reason,
            "tensors": list(self.tensors),
        }


@dataclass(frozen=True)
class Requirement:
    """What a rule needs captured: a collection, with reductions and/or raw tensors.

    Attributes
    ----------
    collection
        Collection name, e.g. ``"gradients"``.
    reductions
        Reduction keys, e.g. ``("abs_mean",)``; computable from a raw tensor too.
    raw
        Whether the raw tensor itself is needed.

    Raises
    ------
    UnknownName
        A reduction key that names no reduction (a ``ValueError`` too): the message names it, the
        collection and the closest keys.
    ValueError
        ``reductions`` given as one string rather than a tuple of keys.
    """

    collection: str
    reductions: tuple[str, ...] = ()
    raw: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.reductions, str):
            raise ValueError(
                f"Requirement({self.collection!r}): reductions: expected a tuple of reduction keys, "
                f"got the string {self.reductions!r} (write ({self.reductions!r},))"
            )
        for key in self.reductions:
            try:
                red.check_key(key)
            except UnknownName as exc:
                kind, name, valid, _, listed = exc.args
                raise UnknownName(
                    kind, name, valid, f" (Requirement({self.collection!r}) reductions)", listed
                ) from None

    def describe(self) -> str:
        """A sentence telling what to capture."""
        if self.raw:
            return (
                f"collection {self.collection!r} with raw tensors "
                "(no ReductionConfig, or ReductionConfig(save_raw_tensor=True))"
            )
        if self.reductions:
            return f"collection {self.collection!r} with reductions {', '.join(self.reductions)} (or raw tensors)"
        return f"collection {self.collection!r}"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {"collection": self.collection, "reductions": list(self.reductions), "raw": self.raw}


@dataclass(frozen=True)
class RuleFailure:
    """Why an in-process rule was switched off (:attr:`Rule.switched_off`): its own code raised.

    Attributes
    ----------
    step
        The global step it was evaluating; None: at the end of the training (:meth:`Rule.on_training_end`).
    error
        What it raised.
    """

    step: int | None
    error: Exception


class RuleConditionMet(TensortapError):
    """Raised by :func:`~tensortap.rules.invoke_rule` with ``raise_eval_cond=True`` at the first firing.

    Parameters
    ----------
    rule_name
        Name of the rule that fired.
    step
        The global step at which it fired.
    reason
        Why it fired.
    tensors
        The tensors involved.
    """

    def __init__(self, rule_name: str, step: int, reason: str = "", tensors: Sequence[str] = ()) -> None:
        self.rule_name = rule_name
        self.step = step
        self.reason = reason
        self.tensors = tuple(tensors)
        super().__init__(
            f"{rule_name} fired at step {step}: {reason}" if reason else f"{rule_name} fired at step {step}"
        )


def regex_list(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise a regex parameter: None, one pattern, or a list of patterns."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def name_list(field_name: str, value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise a list-of-names parameter; a string is one name or several separated by commas."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field_name}: expected names, got {value!r}")
    return tuple(value)


def check_regexes(field_name: str, patterns: Iterable[str]) -> None:
    """Raise a ValueError naming the first pattern that does not compile."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{field_name}: {p!r} is not a valid regular expression ({exc})") from None


@overload
def check_number(
    field_name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *, integer: Literal[True]
) -> int: ...


@overload
def check_number(
    field_name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: Literal[False] = False,
) -> float: ...


def check_number(
    field_name: str, value: Any, minimum: float | None = None, maximum: float | None = None, integer: bool = False
) -> float:
    """``value`` as a Python ``int`` or ``float``; a ValueError unless it is a finite number (an integer if asked)
    in ``[minimum, maximum]``.

    NumPy scalars are numbers too (``numbers.Integral``, ``numbers.Real``: a threshold computed with NumPy), and
    come back as Python numbers (a rule's state holds JSON values only); a bool is refused, whatever its type.
    NaN is refused (no value compares with it: a rule with a NaN threshold would never fire), and so are
    the infinities (a threshold no value crosses, or every value does), and values out of the range a
    parameter means something in (a percentage above 100 that no layer reaches, a fraction above 1).
    """
    number: float | None = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and not integer:
        number = float(value)
    if (
        number is None
        or not math.isfinite(number)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
    ):
        what = "an integer" if integer else "a finite number"
        bound = f" >= {minimum}" if minimum is not None else ""
        if maximum is not None:
            bound = f" in [{minimum:g}, {maximum:g}]" if minimum is not None else f" <= {maximum}"
        raise ValueError(f"{field_name}: expected {what}{bound}, got {value!r}")
    return number


def check_bool(field_name: str, value: Any) -> bool:
    """``value`` as a Python ``bool``; a ValueError unless it is one (or a ``numpy.bool_``).

    A string is refused: ``bool("False")`` is True, so a flag read from a configuration as text would mean
    the opposite of what it says (the command line converts ``true``/``false`` itself).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field_name}: expected a bool, got {value!r}")
    return bool(value)


def json_problem(value: Any, where: str) -> str | None:
    """What in ``value`` a JSON round trip would not give back unchanged, described from ``where`` (its name),
    or None: only None, bool, int, float, str, list and dict with str keys come back as they were."""
    if value is None or type(value) in (bool, int, float, str):
        return None
    if type(value) is list:
        return next((p for i, v in enumerate(value) if (p := json_problem(v, f"{where}[{i}]")) is not None), None)
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                return f"{where} has the key {k!r} ({type(k).__name__}), which JSON turns into a string"
            if (p := json_problem(v, f"{where}[{k!r}]")) is not None:
                return p
        return None
    return f"{where} holds {type(value).__name__} {reprlib.repr(value)}, which JSON does not give back as it is"


@dataclass
class _Progress:
    last_step: int = -1
    fired_steps: list[int] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    usable_steps: int = 0  # steps evaluated with (some of) the rule's inputs read
    silent_steps: int = 0  # steps evaluated that neither read an input nor lacked one (see Rule.lacks_inputs)
    tells_reads: bool = False  # the rule called found_input or need(partial=True): it says what it reads
    evaluated_steps: int = 0  # steps evaluated (invoke), however many are skipped before a start step
    skipped_steps: list[int] = field(default_factory=list)  # steps whose shard could not be read
    # a collection named that the trial lacked (Requirement.describe) -> why: it leaves `missing` once it shows
    # (Selection.names_for), also after a resume
    lacked: dict[str, str] = field(default_factory=dict)


@dataclass
class _StepInputs:
    """What happened to the inputs during the evaluation of one step."""

    found: bool = False  # an input was read
    needed: bool = False  # need() was called
    blocked: bool = False  # need() was called for an input the step cannot do without

    @property
    def usable(self) -> bool:
        return self.found and not self.blocked

    @property
    def silent(self) -> bool:
        """Nothing read and nothing lacked: usable only for a rule that does not tell its reads."""
        return not self.found and not self.needed


class Rule:
    """Base class of every rule.

    Subclasses implement :meth:`invoke_at_step` and call ``super().__init__(base_trial)``::

        class LossAbove(Rule):
            def __init__(self, base_trial=None, threshold=10.0):
                super().__init__(base_trial)
                self.threshold = threshold

            def invoke_at_step(self, step):
                # Selection.names gives [] for a collection the trial lacks (tensor_names raises UnknownName)
                for name in Selection(("losses",), None, ()).names(self.base_trial, step):
                    v = float(self.base_trial.tensor(name).value(step))
                    if v > self.threshold:
                        return self.fire(step, f"{name} = {v} > {self.threshold}", [name])
                return False

    Parameters
    ----------
    base_trial
        The trial the rule reads; None when the rule is given to a hook
        (``Hook(rules=[...])``), which provides a view of the steps being saved.
    action_str, other_trials
        smdebug's arguments (``super().__init__(base_trial, action_str="")`` of a ported rule): refused with a
        TypeError that says what tensortap does instead (``rule.add_action(...)``; other trials given to
        your rule's own ``__init__``).

    Attributes
    ----------
    state_attrs
        Names of the attributes that hold the rule's progress between steps;
        :meth:`state_dict` saves them (JSON values only) so a runner can resume.
    state_version
        The form of those attributes: raised where it changes, so that a state saved by an earlier form is
        refused (:meth:`load_state_dict`) rather than failing later.
    history
        How many saved steps of raw values an in-process rule needs to look back
        over (the hook keeps that many in memory).
    switched_off
        None, or why the rule was switched off (a :class:`RuleFailure`): in-process
        (``Hook(rules=[...])``), a rule whose code raises is no longer evaluated
        and the training goes on; it judged no step after that one.
    """

    state_attrs: tuple[str, ...] = ()
    state_version: int = 1
    history: int = 1

    def __init__(self, base_trial: Any = None, action_str: str | None = None, other_trials: Any = None) -> None:
        if action_str is not None or other_trials is not None:
            given = " and ".join(
                n for n, v in (("action_str", action_str), ("other_trials", other_trials)) if v is not None
            )
            raise TypeError(
                f"{type(self).__name__}: Rule.__init__ takes only base_trial, not smdebug's {given}: call "
                "super().__init__(base_trial); add actions with rule.add_action(...) and give other trials to "
                "your rule's own __init__ (docs/migrating-from-smdebug.md)"
            )
        self.base_trial = base_trial
        self.actions: list[Action] = []
        self._progress = _Progress()
        self._verdict: Verdict | None = None
        self._step_inputs = _StepInputs()
        self.switched_off: RuleFailure | None = None

    # ------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        """The rule's name (its class name), as used in reasons and stop requests."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{self.name} rule>"

    # -------------------------------------------------------- requirements
    def required_captures(self) -> list[Requirement]:
        """What this rule reads: collections with the reductions (or raw tensors) it needs.

        ``Hook(..., rules=[rule])`` configures capture from this list.
        """
        return []

    def required_collections(self) -> list[str]:
        """Names of the collections this rule reads."""
        return list(dict.fromkeys(r.collection for r in self.required_captures()))

    # ----------------------------------------------------------- evaluation
    def invoke_at_step(self, step: int) -> bool:
        """Return whether the rule's condition holds at global step ``step``."""
        raise NotImplementedError(f"{self.name} must implement invoke_at_step(step)")

    def on_idle(self, last_step: int, idle_seconds: float) -> bool:
        """Called while a live runner waits for new steps; return True to fire at ``last_step``.

        ``idle_seconds`` is how long no new step has appeared. Default: never fires.
        """
        return False

    def on_training_end(self, last_step: int) -> bool:
        """Called once the training has ended and every step was evaluated; return True to fire at ``last_step``.

        A rule that judges an input only once it is complete (an evaluation
        saved over several EVAL steps) judges here what the last step left
        pending. Default: never fires.
        """
        return False

    def fire(self, step: int, reason: str, tensors: Iterable[str] = ()) -> bool:
        """Record why the rule fires at ``step`` and return True (``return self.fire(...)``)."""
        self._verdict = Verdict(self.name, step, True, reason, tuple(tensors))
        return True

    def need(self, step: int, requirement: Requirement | str, detail: str = "", *, partial: bool = False) -> None:
        """Record (and log once) that an input is missing at ``step``, and what to capture instead.

        Parameters
        ----------
        step
            The step being evaluated.
        requirement
            What should have been captured: a :class:`Requirement`, or words for it where no collection
            names it (``"a tensor of regex(es) ^val"``).
        detail
            What exactly was missing (a tensor name, a reduction).
        partial
            False (default): the rule cannot judge this step without the input
            (no tensor of a collection in the whole trial, no validation loss
            for an overfit check). True: one input of several lacks something
            and the rule judges the step with the others
            (:meth:`found_input`).

        Notes
        -----
        A rule that evaluated steps but could use none of them (each was
        blocked by a ``need``, or only partial needs and nothing found) has
        :attr:`lacks_inputs` set, and :class:`~tensortap.rules.RuleRunner`
        raises :class:`~tensortap.exceptions.RuleInputsMissing` at the end of
        its run. A rule that never calls ``need`` is never said to lack inputs.
        """
        self._step_inputs.needed = True
        self._step_inputs.blocked |= not partial
        self._progress.tells_reads |= partial
        what = requirement if isinstance(requirement, str) else requirement.describe()
        message = f"{self.name} needs {what}" + (f": {detail}" if detail else "")
        if message not in self._progress.missing:
            self._progress.missing[message] = step
            logger.warning("tensortap: %s (first at step %d)", message, step)

    def need_met(self, step: int, requirement: Requirement | str, detail: str = "") -> None:
        """Forget what :meth:`need` recorded of ``requirement`` with ``detail``: the trial holds it now (a
        collection a live training saves first at a later step), so it leaves :attr:`missing_inputs` (one info
        line says so).

        Parameters
        ----------
        step
            The step being evaluated: the first that holds it.
        requirement, detail
            As given to :meth:`need`.
        """
        what = requirement if isinstance(requirement, str) else requirement.describe()
        message = f"{self.name} needs {what}" + (f": {detail}" if detail else "")
        if self._progress.missing.pop(message, None) is not None:
            logger.info("tensortap: %s needs %s no more: the trial holds it from step %d on", self.name, what, step)

    def found_input(self) -> None:
        """Record that the step being evaluated read one of the rule's inputs.

        The reading helpers (``reduction_at``, ``raw_at``, ``scalar_at``) call
        this; a rule that reads tensors itself and reports partial needs calls
        it after each successful read.
        """
        self._step_inputs.found = True
        self._progress.tells_reads = True

    def not_judged(self) -> str | None:
        """What the rule still needs to judge although it read its inputs, or None (the default).

        A rule that accumulates inputs before judging (``ClassImbalance``:
        ``samples`` labels) returns what it lacks while it has judged nothing,
        e.g. ``"500 labels to judge (samples=500): 400 saved"``. After its
        evaluated steps, such a rule lacks inputs (:attr:`lacks_inputs`) and
        :attr:`missing_inputs` holds ``"<rule> needs <what>"``, so a run that
        judged nothing is not a pass.
        """
        return None

    def _unjudged(self) -> str | None:
        why = self.not_judged() if self._progress.last_step >= 0 else None
        return None if why is None else f"{self.name} needs {why}"

    @property
    def missing_inputs(self) -> dict[str, int]:
        """Messages telling what this rule lacked, with the first step each was seen."""
        missing = dict(self._progress.missing)
        unjudged = self._unjudged()
        if unjudged is not None:
            missing[unjudged] = self._progress.last_step
        return missing

    @property
    def lacks_inputs(self) -> bool:
        """Whether the rule could use none of the steps it evaluated (see :meth:`need` and :meth:`not_judged`).

        A step is usable where the rule read one of its inputs (:meth:`found_input`) and lacked none it cannot
        do without. A step where it neither read nor lacked anything (its inputs are of another mode: no
        gradient at an EVAL step) judged nothing for a rule that tells its reads (one that called
        :meth:`found_input` or ``need(..., partial=True)``, as the reading helpers and the built-in rules do),
        and is usable for one that does not (a custom rule that reads tensors itself).
        """
        progress = self._progress
        usable = progress.usable_steps + (0 if progress.tells_reads else progress.silent_steps)
        no_usable = bool(progress.missing) and not usable
        return self._progress.last_step >= 0 and (no_usable or self._unjudged() is not None)

    @property
    def fired_steps(self) -> list[int]:
        """Steps at which the rule has fired so far."""
        return list(self._progress.fired_steps)

    @property
    def last_step(self) -> int:
        """The last step evaluated (-1 before the first)."""
        return self._progress.last_step

    @property
    def evaluated_steps(self) -> int:
        """How many steps the rule has evaluated (a run from a start step counts only the steps from there)."""
        return self._progress.evaluated_steps

    @property
    def skipped_steps(self) -> list[int]:
        """Steps the rule could not evaluate: an input's shard cannot be read (see :meth:`invoke`)."""
        return list(self._progress.skipped_steps)

    def invoke(self, step: int) -> Verdict:
        """Evaluate the rule at ``step`` and return its :class:`Verdict` (the runners use this).

        A step with a value the rule reads in a shard that cannot be read
        (:class:`~tensortap.exceptions.ShardUnreadable`: damaged, skipped by
        the reader with a warning naming it) is skipped: it is evidence
        neither way, so the rule does not fire there, the step is not counted
        in :attr:`evaluated_steps` but listed in :attr:`skipped_steps`, and the
        runner goes on with the next step.

        A step where the rule's own read raises
        :class:`~tensortap.exceptions.TensorUnavailableForStep`,
        :class:`~tensortap.exceptions.StepUnavailable`,
        :class:`~tensortap.exceptions.TensorUnavailable` (a custom rule that
        reads the gradients at an EVAL step, where none were saved) or
        :class:`~tensortap.exceptions.NoMoreData` (a rule that reads the step
        after ``step``, at the last step of an ended training) cannot be
        judged: the rule does not fire there, the verdict's reason says
        ``"not judged: ..."``, and the runner goes on with the next step, as
        smdebug's ``invoke_rule`` did. It is never silent: the first such step
        of each kind of error is listed in :attr:`missing_inputs` and logged,
        and a rule that could judge none of its steps lacks inputs
        (:attr:`lacks_inputs`: the runner raises
        :class:`~tensortap.exceptions.RuleInputsMissing`). Built-in rules
        check their inputs (:meth:`need`) and do not raise these.

        :meth:`invoke_at_step` answers with a ``bool`` (a ``numpy.bool_``
        too; None, a method that ends without ``return``, is False). Anything
        else raises a ``TypeError`` naming the rule, the step and what was
        returned: a number, a string or a :class:`Verdict` would otherwise
        fire wherever it is not empty or zero (return ``self.fire(step,
        reason, tensors)`` to fire with a reason). So does None from a method
        that called :meth:`fire` without returning its result. Any other
        exception raised by the rule's code propagates as it is (the same
        type), with a note naming the rule and the step (Python 3.11 on;
        before, that is logged as an error).
        """
        self._verdict = None
        self._step_inputs = _StepInputs()
        not_judged = None
        try:
            with self._blamed("invoke_at_step", step):
                result = self.invoke_at_step(step)
        except ShardUnreadable as exc:
            return self.skip(step, str(exc))
        except UNREADABLE_INPUT as exc:
            result, not_judged = False, self._cannot_judge(step, exc)
        fired = self._fired(result, "invoke_at_step", step)
        self._progress.last_step = max(self._progress.last_step, step)
        self._progress.usable_steps += self._step_inputs.usable
        self._progress.silent_steps += self._step_inputs.silent
        self._progress.evaluated_steps += 1
        if not_judged is not None:
            return Verdict(self.name, step, False, not_judged)
        return self._conclude(step, fired, f"condition met at step {step}")

    def _cannot_judge(self, step: int, exc: Exception) -> str:
        """Record that the rule's own read of a tensor at ``step`` raised ``exc`` (one of
        :data:`UNREADABLE_INPUT`): the step cannot be judged.

        Like a ``need`` the step cannot do without: listed (once per kind of error, with the first
        step) in :attr:`missing_inputs` and logged once; a rule that could judge no step lacks inputs.
        Returns the reason of the step's verdict.
        """
        self._step_inputs.needed = self._step_inputs.blocked = True
        kind = f"{self.name} cannot judge the steps where what it reads is missing ({type(exc).__name__}"
        if not any(m.startswith(kind) for m in self._progress.missing):
            message = f"{kind}: {exc})"
            self._progress.missing[message] = step
            logger.warning("tensortap: %s (first at step %d)", message, step)
        else:
            logger.debug("tensortap: %s does not judge step %d: %s", self.name, step, exc)
        return f"not judged: {exc}"

    def skip(self, step: int, why: str) -> Verdict:
        """Record that ``step`` cannot be evaluated (``why``: its shard cannot be read) and return a
        verdict that did not fire; the runners call this for a step whose every shard was skipped."""
        self._progress.last_step = max(self._progress.last_step, step)
        self._progress.skipped_steps.append(step)
        logger.info("tensortap: %s skips step %d: %s", self.name, step, why)
        return Verdict(self.name, step, False)

    def invoke_end(self) -> Verdict:
        """Ask :meth:`on_training_end` at the last step evaluated and return the resulting :class:`Verdict`.

        The runners call this once the training has ended and they evaluated
        its last step: offline, a live runner when it sees the end, in-process
        when the hook closes. A rule evaluated step by step by hand needs this
        call too, after the last step. An input in a shard that cannot be read
        is skipped as in :meth:`invoke`.
        """
        self._verdict = None
        self._step_inputs = _StepInputs()
        step = self._progress.last_step
        try:
            with self._blamed("on_training_end", step):
                result = self.on_training_end(step) if step >= 0 else False
        except ShardUnreadable as exc:
            return self.skip(step, str(exc))
        except UNREADABLE_INPUT as exc:
            return Verdict(self.name, step, False, self._cannot_judge(step, exc))
        fired = self._fired(result, "on_training_end", step)
        return self._conclude(step, fired, f"condition met at the end of the training (step {step})")

    def invoke_idle(self, last_step: int, idle_seconds: float) -> Verdict:
        """Ask :meth:`on_idle` and return the resulting :class:`Verdict` (its answer checked as in :meth:`invoke`)."""
        self._verdict = None
        with self._blamed("on_idle", last_step):
            result = self.on_idle(last_step, idle_seconds)
        fired = self._fired(result, "on_idle", last_step)
        return self._conclude(last_step, fired, f"no new step for {idle_seconds:.0f} s after step {last_step}")

    @contextlib.contextmanager
    def _blamed(self, method: str, step: int) -> Iterator[None]:
        """Name this rule, ``method`` and ``step`` in an exception the rule's code raises (its type unchanged):
        a note (Python 3.11 on) or, before, a logged error. What means the step cannot be judged
        (:data:`UNREADABLE_INPUT`) passes untouched."""
        try:
            yield
        except UNREADABLE_INPUT:
            raise
        except Exception as exc:
            note = f"tensortap: raised by rule {self.name} ({self.name}.{method}) at step {step}"
            if sys.version_info >= (3, 11):
                exc.add_note(note)
            else:
                logger.error("%s: %s: %s", note, type(exc).__name__, exc)
            raise

    def _fired(self, result: object, method: str, step: int) -> bool:
        """Whether ``result``, the answer of ``method`` at ``step``, means the rule fired (see :meth:`invoke`).

        Raises
        ------
        TypeError
            ``result`` is not a bool (nor None for False), naming the rule, the method, the step and the type.
        """
        if isinstance(result, (bool, np.bool_)):
            return bool(result)
        if result is None and self._verdict is None:
            return False
        if result is None:
            hint = "it called self.fire(...) without returning its result: write return self.fire(...)"
        elif isinstance(result, Verdict):
            hint = (
                f"a Verdict (here fired={result.fired}) is what Rule.invoke makes of the answer; "
                "return self.fire(step, reason, tensors) to fire, False not to"
            )
        else:
            hint = "return self.fire(step, reason, tensors) to fire, False not to"
        raise TypeError(
            f"{self.name}.{method} returned {type(result).__name__} {reprlib.repr(result)} at step {step}; "
            f"expected a bool: {hint}"
        )

    def _conclude(self, step: int, fired: bool, default_reason: str) -> Verdict:
        if not fired:
            return Verdict(self.name, step, False)
        verdict = self._verdict if self._verdict is not None else Verdict(self.name, step, True, default_reason)
        self._progress.fired_steps.append(step)
        return verdict

    # -------------------------------------------------------------- actions
    def add_action(self, action: Action) -> Rule:
        """Run ``action`` every time this rule fires; returns the rule, so calls chain."""
        self.actions.append(action)
        return self

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The rule's progress as JSON-serialisable data (see :meth:`load_state_dict`).

        Raises
        ------
        TypeError
            An attribute of :attr:`state_attrs` holds what a JSON round trip would not give back unchanged (a
            dict with an int key, which comes back a string; a tuple, which comes back a list; a NumPy value),
            naming the rule, the attribute and the value: resumed from it, the rule would judge differently.
        """
        for attr in self.state_attrs:
            problem = json_problem(getattr(self, attr), attr)
            if problem is not None:
                raise TypeError(
                    f"{self.name}.state_dict(): state attribute {problem}, so a rule resumed from this state would "
                    "not see what it saved; keep None, bool, int, float, str, list and dict with str keys there"
                )
        state = {
            "rule": self.name,
            "state_version": self.state_version,
            "last_step": self._progress.last_step,
            "fired_steps": list(self._progress.fired_steps),
            "missing": dict(self._progress.missing),
            "usable_steps": self._progress.usable_steps,
            "silent_steps": self._progress.silent_steps,
            "tells_reads": self._progress.tells_reads,
            "evaluated_steps": self._progress.evaluated_steps,
            "skipped_steps": list(self._progress.skipped_steps),
            "lacked": dict(self._progress.lacked),
            "attrs": {a: getattr(self, a) for a in self.state_attrs},
        }
        return json.loads(json.dumps(state))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict`; a runner then resumes after ``last_step``."""
        if state.get("rule") != self.name:
            raise ValueError(f"state: saved by rule {state.get('rule')!r}, cannot load into {self.name}")
        if state.get("state_version", 1) != self.state_version:
            raise ValueError(
                f"state: saved by another form of {self.name} (state_version {state.get('state_version', 1)!r}; "
                f"this tensortap's is {self.state_version}): run the rule from the start"
            )
        unknown = set(state.get("attrs", {})) - set(self.state_attrs)
        if unknown:
            raise ValueError(
                f"state: unknown attribute(s) {', '.join(sorted(unknown))}; "
                f"valid: {', '.join(self.state_attrs) or 'none'}"
            )
        self._progress = _Progress(
            int(state["last_step"]),
            [int(s) for s in state["fired_steps"]],
            {str(k): int(v) for k, v in state.get("missing", {}).items()},
            int(state.get("usable_steps", 0)),
            int(state.get("silent_steps", 0)),
            bool(state.get("tells_reads", False)),
            int(state.get("evaluated_steps", 0)),
            [int(s) for s in state.get("skipped_steps", [])],
            {str(k): str(v) for k, v in state.get("lacked", {}).items()},
        )
        for a, v in state.get("attrs", {}).items():
            setattr(self, a, v)

    # ----------------------------------------------------------- in-process
    def attach_to_hook(self, hook: Any) -> None:
        """Evaluate this rule in-process on every step ``hook`` saves (``Hook(rules=[...])`` calls this)."""
        from .inprocess import attach

        attach(hook, self)
