"""Every exception tensortap raises on purpose; all are importable from ``tensortap``."""

from __future__ import annotations


class TensortapError(Exception):
    """Base class of tensortap's own errors."""


class StepUnavailable(TensortapError):
    """The step was skipped or never saved, and never will be."""

    def __init__(self, step: int, mode: object = None) -> None:
        self.step = step
        self.mode = mode
        where = f" in mode {mode}" if mode is not None else ""
        super().__init__(f"step {step}{where} was not saved and never will be")


class StepNotYetAvailable(TensortapError):
    """The step has not been written yet; training is still running."""

    def __init__(self, step: int, mode: object = None) -> None:
        self.step = step
        self.mode = mode
        where = f" in mode {mode}" if mode is not None else ""
        super().__init__(f"step {step}{where} is not available yet (training still running)")


class NoMoreData(TensortapError):
    """A step past the end of a training that has ended was asked for."""


class TensorUnavailable(TensortapError, KeyError):
    """No tensor of that name exists in the trial."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TensorUnavailableForStep(TensortapError):
    """The tensor exists but not at that step (or not as asked: raw vs reductions)."""


class TrialNotFound(TensortapError, FileNotFoundError):
    """The trial path or URL does not exist."""


class StopTrainingRequested(TensortapError):
    """Raised from a framework's step when a stop request was found and raising was asked for."""


class TrialExistsError(TensortapError, ValueError):
    """A worker of that name already wrote into the trial folder (see ``if_exists``)."""
