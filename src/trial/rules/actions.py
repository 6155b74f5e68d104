"""What happens when a rule fires, besides being reported: :class:`StopTraining`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Rule, Verdict


class Action:
    """Something done every time a rule fires; subclasses implement :meth:`__call__`."""

    def __call__(self, rule: Rule, verdict: Verdict, trial: Any) -> None:
        """Act on ``verdict`` of ``rule``, which read ``trial``."""
        raise NotImplementedError


class StopTraining(Action):
    """Ask the training that writes the trial to stop.

    Writes a stop request into the trial with
    ``trial.request_stop(reason, rule=<rule name>, step=<step>, tensors=[...])``;
    every adapter polls for it and stops the framework's own way (PyTorch
    ``hook.should_stop`` / ``StopTrainingRequested``, Keras
    ``model.stop_training``, XGBoost ``after_iteration`` returning True). The
    first request is kept: later firings do not overwrite its reason.
    In-process (``Hook(rules=[...])``) the hook sees the request at once.
    """

    def __call__(self, rule: Rule, verdict: Verdict, trial: Any) -> None:
        if trial.stop_request() is None:
            trial.request_stop(verdict.reason, rule=rule.name, step=verdict.step, tensors=list(verdict.tensors))

    def __repr__(self) -> str:
        return "StopTraining()"
