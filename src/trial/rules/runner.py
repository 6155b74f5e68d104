"""Running rules on a trial: :func:`invoke_rule` and :class:`RuleRunner` (offline or alongside a training)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ...backends.storage import STORAGE_FAILURES, permanent
from ...exceptions import RuleInputsMissing
from ...modes import StepState
from ..progress import progress
from .actions import Action
from .base import Rule, RuleConditionMet, Verdict, logger

POLL_SECONDS = 0.2


def rule_labels(rules: Sequence[Rule], tags: Sequence[str]) -> list[str]:
    """Each rule's name, followed by its tag where another rule of ``rules`` has the same name.

    Parameters
    ----------
    rules
        The rules of one run.
    tags
        One per rule, telling it apart from the others of its name: its position (``"#2"``), its spec.

    Returns
    -------
    list of str
        ``"LossNotDecreasing"``, or ``"LossNotDecreasing #2"`` beside another ``LossNotDecreasing``.
    """
    names = [r.name for r in rules]
    return [f"{name} {tag}" if names.count(name) > 1 else name for name, tag in zip(names, tags, strict=True)]


RULE_STATUSES = ("fired", "passed", "inputs_missing", "no_step", "switched_off")
"""The outcomes of a rule's run (:func:`rule_status`)."""


def rule_status(rule: Rule) -> str:
    """The outcome of the run of ``rule`` so far, as ``tensortap rules`` and ``tensortap report`` give it.

    Returns
    -------
    str
        ``"switched_off"``: in-process, its code raised before it fired and it judged no step after that one
        (:attr:`Rule.switched_off`; one that fired before it raised is ``"fired"``);
        ``"inputs_missing"``: it found none of its inputs (:attr:`Rule.lacks_inputs`; a runner raised
        :class:`~tensortap.exceptions.RuleInputsMissing`); ``"fired"``: it fired at a step; ``"passed"``: it
        judged steps and did not fire; ``"no_step"``: it evaluated no step (none complete, or none readable).
    """
    if rule.switched_off is not None and not rule.fired_steps:  # one that fired before is "fired": it did
        return "switched_off"
    if rule.lacks_inputs:
        return "inputs_missing"
    if rule.fired_steps:
        return "fired"
    return "passed" if rule.evaluated_steps else "no_step"


def _relabel(message: str, name: str, label: str) -> str:
    """``message`` of rule ``name`` (``"LossNotDecreasing needs ..."``) starting with its ``label`` instead."""
    return label + message.removeprefix(name) if message.startswith(name) else message


class RuleRunner:
    """Evaluate several rules on one trial, step by step, in step order.

    Parameters
    ----------
    trial
        The trial (a :class:`~tensortap.trial.Trial`).
    rules
        Rules whose ``base_trial`` is ``trial``; each rule object once (several rules may share a name: two
        ``LossNotDecreasing`` of different parameters, a custom rule named like a built-in one).
    actions
        Actions run on every firing of every rule, after the rule's own actions.
    poll_seconds
        Pause between two looks for new steps while a training runs.

    Raises
    ------
    ValueError
        No rule, or one rule object given twice: it would judge each step twice, and its progress (fired
        steps, evaluated steps, counters) would count each twice. Build a rule per evaluation instead.
    """

    def __init__(
        self, trial: Any, rules: Sequence[Rule], actions: Sequence[Action] = (), poll_seconds: float = POLL_SECONDS
    ) -> None:
        if not rules:
            raise ValueError("rules: expected at least one rule")
        for i, rule in enumerate(rules):
            first = next(j for j, other in enumerate(rules) if other is rule)
            if first != i:
                raise ValueError(
                    f"rules: rule {i + 1} is rule {first + 1} again (the same {rule!r} object), which would judge "
                    f"each step twice; give each rule once (to evaluate two, build two: {rule.name}(trial, ...))"
                )
        self.trial = trial
        self.rules = list(rules)
        self.actions = list(actions)
        self.poll_seconds = poll_seconds

    def _storage_failed(self, exc: BaseException, since: float | None, outage: float) -> float:
        """Since when the storage fails, now that a look at the trial raised ``exc``; ``exc`` is raised again
        where it cannot be waited out: an error no other attempt cures (credentials refused), or the storage
        failing for ``outage`` seconds."""
        now = time.monotonic()
        first = since is None
        since = now if since is None else since
        if permanent(exc) or now - since >= outage:
            raise exc
        if first:
            logger.warning(
                "tensortap: rules: %s; trying again every %g s for up to %g s", exc, self.poll_seconds, outage
            )
        return since

    def _act(
        self, rule: Rule, verdict: Verdict, raise_eval_cond: bool, on_verdict: Callable[[Rule, Verdict], None] | None
    ) -> None:
        logger.info("tensortap: rule %s fired at step %d: %s", rule.name, verdict.step, verdict.reason)
        for action in [*rule.actions, *self.actions]:
            action(rule, verdict, self.trial)
        if on_verdict is not None:
            on_verdict(rule, verdict)
        if raise_eval_cond:
            raise RuleConditionMet(rule.name, verdict.step, verdict.reason, verdict.tensors)

    def run(
        self,
        start_step: int | None = None,
        end_step: int | None = None,
        wait: bool = True,
        raise_eval_cond: bool = False,
        idle_timeout: float | None = None,
        on_verdict: Callable[[Rule, Verdict], None] | None = None,
        show_progress: bool | None = False,
        outage: float = 0.0,
    ) -> dict[Rule, list[int]]:
        """Evaluate every rule on every complete step in ``[start_step, end_step)``.

        Parameters
        ----------
        start_step
            First global step; default: after the last step each rule evaluated
            (0 for a fresh rule, or where :meth:`Rule.load_state_dict` left it).
        end_step
            Stop before this global step; default: at the end of the training, once
            each rule judged what its last step left pending (:meth:`Rule.on_training_end`;
            also when a step before ``end_step`` is the training's last).
        wait
            While the training runs, wait for steps that are not written yet
            (calling :meth:`Rule.on_idle` meanwhile). False: stop at the last complete step.
        raise_eval_cond
            Raise :class:`RuleConditionMet` at the first firing (after its actions ran).
        idle_timeout
            Stop waiting after this many seconds without a new step (None: wait until the training ends).
        on_verdict
            Called with ``(rule, verdict)`` at every firing.
        show_progress
            A progress bar over the steps on standard error when not waiting for new
            steps: True always, None only on a terminal, False never (the default).
        outage
            With ``wait``: for how many seconds a storage that fails (``StorageUnreachable``,
            ``TimeoutError``: a restart, a network outage) is tried again, every ``poll_seconds``,
            before its error is raised; one warning when it starts failing, one when it answers
            again. Credentials it refuses are raised at once. 0 (the default): raised at once.

        Returns
        -------
        dict
            The steps at which each rule fired during this run.

        Raises
        ------
        RuleInputsMissing
            At the end of the run, when a rule evaluated steps but found none
            of its inputs (:attr:`Rule.lacks_inputs`); the exception carries
            the steps where the other rules fired. Its dicts are keyed by the
            rules' names; rules of the run that share a name are told apart by
            their position in ``rules`` (``"LossNotDecreasing #2"``, also in
            their messages). :meth:`lacking` gives the rules themselves.
        """
        fired = self._run(
            start_step,
            end_step,
            wait,
            raise_eval_cond,
            idle_timeout,
            on_verdict,
            show_progress,
            outage if wait else 0.0,
        )
        lacking = self.lacking()
        if lacking:
            positions = [f"#{i}" for i in range(1, len(self.rules) + 1)]
            labels = dict(zip(self.rules, rule_labels(self.rules, positions), strict=True))
            missing = {labels[r]: [_relabel(m, r.name, labels[r]) for m in needs] for r, needs in lacking.items()}
            raise RuleInputsMissing(missing, {labels[r]: steps for r, steps in fired.items()})
        return fired

    def lacking(self) -> dict[Rule, list[str]]:
        """The rules that found none of their inputs so far (:attr:`Rule.lacks_inputs`), with their messages.

        Returns
        -------
        dict
            ``{rule: [what it needs, ...]}`` (:attr:`Rule.missing_inputs`), in the order of the rules.
        """
        return {r: list(r.missing_inputs) for r in self.rules if r.lacks_inputs}

    def _run(
        self,
        start_step: int | None,
        end_step: int | None,
        wait: bool,
        raise_eval_cond: bool,
        idle_timeout: float | None,
        on_verdict: Callable[[Rule, Verdict], None] | None,
        show_progress: bool | None,
        outage: float,
    ) -> dict[Rule, list[int]]:
        fired: dict[Rule, list[int]] = {r: [] for r in self.rules}
        floor = {r: (start_step - 1 if start_step is not None else r.last_step) for r in self.rules}  # judged
        next_step = min(floor.values()) + 1
        last_new, last_seen = time.monotonic(), next_step - 1
        failing: float | None = None  # since when the storage fails (``outage``)
        unacted: list[tuple[Rule, Verdict]] = []  # fired, their actions not yet done (the storage failed in one)
        ended_rules: set[Rule] = set()  # asked invoke_end

        def judged(rule: Rule, verdict: Verdict) -> None:
            if verdict.fired:
                fired[rule].append(verdict.step)
                unacted.append((rule, verdict))
                self._act(rule, verdict, raise_eval_cond, on_verdict)
                unacted.pop()

        while True:
            try:
                while unacted:  # a storage failure interrupted their actions (a stop request being written)
                    self._act(*unacted[0], raise_eval_cond, on_verdict)
                    unacted.pop(0)
                ended = self.trial.training_ended
                self.trial.refresh()
                steps = self.trial.steps()
                if failing is not None:
                    logger.warning(
                        "tensortap: rules: the storage answers again, %.1f s after it failed",
                        time.monotonic() - failing,
                    )
                    failing = None
                pending = [s for s in steps if s >= next_step and (end_step is None or s < end_step)]
                for s in progress(pending, desc="steps", enable=False if wait else show_progress):
                    for rule in self.rules:
                        if s <= floor[rule]:
                            continue
                        # else its shards were found unreadable since the listing (by a rule before this one, too)
                        readable = s in self.trial._index.steps
                        verdict = rule.invoke(s) if readable else rule.skip(s, "its shards cannot be read")
                        floor[rule] = s  # after a storage failure in this step, the rules after it judge it
                        judged(rule, verdict)
                    next_step, last_seen = s + 1, s
                reached_end = end_step is not None and (
                    end_step <= next_step or self.trial.has_passed_step(end_step - 1) is not StepState.NOT_YET_AVAILABLE
                )
                # every step of an ended training is evaluated: what the last one left pending is judged now
                over = ended and (end_step is None or not steps or steps[-1] < end_step)
                if over or reached_end or not wait:
                    for rule in self.rules if over else ():
                        if rule not in ended_rules:
                            ended_rules.add(rule)
                            judged(rule, rule.invoke_end())
                    return fired
                if pending:
                    last_new = time.monotonic()
                    continue
                idle = time.monotonic() - last_new
                if idle_timeout is not None and idle >= idle_timeout:
                    # none seen yet: -1, or the step before start_step
                    if last_seen >= 0 and (start_step is None or last_seen >= start_step):
                        where = f"at step {last_seen}"
                    else:
                        where = f"before any step from step {start_step}" if start_step else "before any step"
                    logger.warning("tensortap: no new step for %.0f s; rules stop waiting %s", idle, where)
                    return fired
                for rule in self.rules:
                    judged(rule, rule.invoke_idle(last_seen, idle))
            except STORAGE_FAILURES as exc:
                failing = self._storage_failed(exc, failing, outage)
            time.sleep(self.poll_seconds)


def invoke_rule(
    rule: Rule,
    start_step: int | None = None,
    end_step: int | None = None,
    raise_eval_cond: bool = False,
    actions: Sequence[Action] = (),
    wait: bool = True,
    idle_timeout: float | None = None,
) -> list[int]:
    """Run ``rule`` over the steps of its trial and return the steps at which its condition held.

    Walks the complete global steps in order, waits for steps not yet written
    while the training runs, and returns normally once the training has ended
    and no step remains (it never ends by raising ``NoMoreData``).

    Parameters
    ----------
    rule
        A rule built on a trial (``MyRule(trial, ...)``).
    start_step
        First global step; default 0 (or after the last step a restored rule evaluated).
    end_step
        Stop before this global step; default: at the end of the training.
    raise_eval_cond
        Raise :class:`RuleConditionMet` ``(rule_name, step, reason)`` at the first firing.
    actions
        Actions run at every firing (e.g. :class:`~tensortap.rules.StopTraining`).
    wait
        Wait for steps not written yet while the training runs (default True).
    idle_timeout
        Give up waiting after this many seconds without a new step.

    Raises
    ------
    RuleInputsMissing
        The rule evaluated steps but found none of its inputs (see :meth:`Rule.need`).
    """
    if rule.base_trial is None:
        raise ValueError(f"{rule.name}: base_trial is None; build the rule on a trial: {rule.name}(trial, ...)")
    runner = RuleRunner(rule.base_trial, [rule], actions)
    return runner.run(start_step, end_step, wait, raise_eval_cond, idle_timeout)[rule]
