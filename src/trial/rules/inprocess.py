"""Rules evaluated inside the training process, on the steps a hook saves (``Hook(..., rules=[...])``).

The hook hands every saved step to :class:`InProcessRunner` before it goes to
the writer. The runner keeps what was saved in a :class:`MemoryTrial`, which
offers the :class:`~tensortap.trial.Trial` methods rules use, and evaluates
its rules on it at once: a rule with the ``StopTraining`` action stops the
training at the step that made it fire. When the hook closes, each rule
judges what the last step left pending (:meth:`~tensortap.rules.Rule.on_training_end`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ... import reductions as red
from ...backends.shard import StepRecord
from ...config import Collection
from ...exceptions import TensorUnavailable, TensorUnavailableForStep
from ...modes import Mode
from ..index import steps_meet
from ..trial import STEP_FIRST, check_reduction_name, refuse_mode, refuse_mode_as_abs, select_names
from .base import Rule, Verdict, logger

# saved steps of scalars and reductions kept in memory (raw tensors: each rule's ``history``)
SMALL_HISTORY = 10_000


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


class MemoryTensor:
    """One tensor of a :class:`MemoryTrial` (the subset of :class:`~tensortap.trial.Tensor` rules use)."""

    def __init__(self, trial: MemoryTrial, name: str) -> None:
        self.trial = trial
        self.name = name
        self._saved = trial._tensors[name]

    @property
    def collections(self) -> list[str]:
        """Collections this tensor belongs to."""
        return sorted(self._saved.collections)

    def steps(self, mode: Mode | str | None = None) -> list[int]:
        """Steps kept in memory (mode steps when ``mode`` is given)."""
        if mode is None:
            return sorted(self._saved.values)
        m = Mode.parse(mode)
        out = []
        for s in self._saved.values:
            where = self.trial.mode_step(s)
            if where is not None and where[0] is m:
                out.append(where[1])
        return sorted(out)

    def _entry(self, step: int, mode: Mode | str | None = None) -> tuple[np.ndarray | None, dict[str, float]]:
        g = self.trial.global_step(step, mode)
        if g is None or g not in self._saved.values:
            raise TensorUnavailableForStep(f"{self.name!r} was not saved at step {step} (or is no longer in memory)")
        return self._saved.values[g]

    def workers(self, step: int, mode: Mode | str | None = None) -> list[str]:
        """``[this worker]`` if the tensor is kept at ``step``, else ``[]``."""
        g = self.trial.global_step(step, mode)
        return [self.trial.worker] if g in self._saved.values else []

    def has_raw(self, step: int, mode: Mode | str | None = None) -> bool:
        """Whether the raw value is kept at ``step``."""
        return self._entry(step, mode)[0] is not None

    def available_reductions(self, step: int, mode: Mode | str | None = None) -> list[str]:
        """Reduction keys saved at ``step``."""
        return list(self._entry(step, mode)[1])

    def value(self, step: int, mode: Mode | str | None = None) -> np.ndarray:
        """The raw value at ``step``."""
        raw, reds = self._entry(step, mode)
        if raw is None:
            raise TensorUnavailableForStep(
                f"{self.name!r} at step {step}: only reductions were saved ({', '.join(reds) or 'none'})"
            )
        return raw

    def reduction_value(self, step: int, reduction: str, abs: bool = False, mode: Mode | str | None = None) -> float:
        """A reduction at ``step``: the saved one, or computed from the raw value."""
        check_reduction_name(reduction)
        refuse_mode_as_abs(abs, "reduction_value(step, reduction")
        key = red.reduction_key(reduction, abs)
        raw, reds = self._entry(step, mode)
        if key in reds:
            return float(reds[key])
        if raw is not None:
            return red.compute(raw, key)
        raise TensorUnavailableForStep(f"{self.name!r} at step {step}: reduction {key!r} was not saved")


class MemoryTrial:
    """The steps a hook saved, kept in memory, with the :class:`~tensortap.trial.Trial` methods rules use.

    Raw tensors of more than one element are kept for the last ``keep`` saved
    steps of each tensor; scalars and reductions for the last ``SMALL_HISTORY``.
    """

    training_ended = False

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        self.path = hook.out_dir
        self.worker = hook.worker
        self.keep = 1
        self._steps: dict[int, tuple[Mode, int]] = {}
        self._by_mode: dict[Mode, dict[int, int]] = {}
        self._tensors: dict[str, _Saved] = {}

    def __repr__(self) -> str:
        return f"<MemoryTrial of {self.path!r}: {len(self._steps)} steps in memory>"

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
        big = [s for s, (raw, _) in saved.values.items() if raw is not None and raw.size > 1]
        for s in sorted(big)[: -self.keep]:
            del saved.values[s]
        if len(saved.values) > SMALL_HISTORY:
            for s in sorted(saved.values)[: len(saved.values) - SMALL_HISTORY]:
                del saved.values[s]

    def refresh(self) -> None:
        """Nothing to do: the hook adds every step as it is saved."""

    def steps(self, mode: Mode | str | None = None, show_incomplete: bool = False) -> list[int]:
        """Saved steps (mode steps when ``mode`` is given)."""
        if mode is None:
            return sorted(self._steps)
        return sorted(self._by_mode.get(Mode.parse(mode), {}))

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

    def tensor_names(
        self,
        collection: str | Collection | None = None,
        regex: str | Sequence[str] | None = None,
        mode: Mode | str | None = None,
        step: int | None = None,
    ) -> list[str]:
        """Names kept in memory, filtered like :meth:`tensortap.trial.Trial.tensor_names`."""
        entries = ((name, saved.collections, saved) for name, saved in self._tensors.items())
        return select_names(entries, self._steps_of_mode, collection, regex, mode, step, self.global_step)

    def _steps_of_mode(self, mode: Mode) -> np.ndarray:
        by_mode = self._by_mode.get(mode, {})
        return np.unique(np.fromiter(by_mode.values(), dtype=np.int64, count=len(by_mode)))

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

    def __init__(self, hook: Any) -> None:
        self.trial = MemoryTrial(hook)
        self.rules: list[Rule] = []
        self._broken: set[int] = set()

    def add(self, rule: Rule) -> None:
        """Evaluate ``rule`` from the next saved step on."""
        rule.base_trial = self.trial
        self.rules.append(rule)
        self.trial.keep = max(self.trial.keep, rule.history)

    def on_step(self, record: StepRecord) -> None:
        """Keep ``record`` and evaluate every rule at its step; a rule that raises is switched off."""
        self.trial.add(record)
        self._evaluate(record.step, lambda rule: rule.invoke(record.step))

    def on_end(self) -> None:
        """The hook closes: the training has ended; every rule judges what its last step left pending."""
        self.trial.training_ended = True
        self._evaluate(None, lambda rule: rule.invoke_end())

    def _evaluate(self, step: int | None, invoke: Callable[[Rule], Verdict]) -> None:
        """Run ``invoke`` on every rule still on, and its actions where it fires (``step``: None at the end)."""
        for rule in self.rules:
            if id(rule) in self._broken:
                continue
            try:
                verdict = invoke(rule)
                if verdict.fired:
                    logger.warning("tensortap: rule %s fired at step %d: %s", rule.name, verdict.step, verdict.reason)
                    for action in rule.actions:
                        action(rule, verdict, self.trial)
            except Exception as exc:
                self._broken.add(id(rule))
                logger.error(
                    "tensortap: rule %s failed %s and is switched off: %s",
                    rule.name,
                    "at the end of the training" if step is None else f"at step {step}",
                    exc,
                    exc_info=exc,
                )


def attach(hook: Any, rule: Rule) -> None:
    """Make ``hook`` capture what ``rule`` needs and evaluate it on every saved step."""
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
    for req in rule.required_captures():
        hook.require_capture(req.collection, req.reductions, req.raw)
    runner.add(rule)
