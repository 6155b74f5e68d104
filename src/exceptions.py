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


class RuleInputsMissing(TensortapError):
    """One or more rules found none of their inputs, so they judged nothing.

    Raised by :meth:`~tensortap.rules.RuleRunner.run` (and so by
    :func:`~tensortap.rules.invoke_rule` and ``tensortap rules``, which exits 2)
    when a rule evaluated steps but could use none of them: every step lacked
    what :meth:`~tensortap.rules.Rule.need` reported. A rule that finds no
    input is a wrong folder or a wrong capture setting, never a pass.

    Parameters
    ----------
    missing
        ``{rule name: [what it needs, ...]}`` for each rule that found nothing.
    fired
        ``{rule name: [steps]}`` where the rules of the same run fired (the
        results that would have been returned).

    Attributes
    ----------
    missing, fired
        As given.
    """

    def __init__(self, missing: dict[str, list[str]], fired: dict[str, list[int]] | None = None) -> None:
        self.missing = {k: list(v) for k, v in missing.items()}
        self.fired = dict(fired or {})
        parts = []
        for rule, needs in self.missing.items():
            words = "; ".join(n.removeprefix(f"{rule} ") for n in needs)
            parts.append(f"{rule} found none of its inputs" + (f": it {words}" if words else ""))
        super().__init__("; ".join(parts))


class StopTrainingRequested(TensortapError):
    """Raised from a framework's step when a stop request was found and raising was asked for."""
