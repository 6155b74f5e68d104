"""Training modes and step states shared by the write and the read side."""

from __future__ import annotations

import enum
import numbers


class Mode(enum.IntEnum):
    """The phase a step belongs to.

    Values are stored on disk as small integers; never renumber them.
    """

    TRAIN = 1
    EVAL = 2
    PREDICT = 3
    GLOBAL = 4

    @classmethod
    def parse(cls, value: Mode | str | int) -> Mode:
        """Return the mode named by ``value`` (a Mode, its name in any case, or its number: any integer
        but a bool).

        Raises
        ------
        ValueError
            If ``value`` names no mode; the message lists the valid names.
        """
        if isinstance(value, Mode):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):  # np.int64 too
            try:
                return cls(int(value))
            except ValueError:
                pass
        raise ValueError(f"mode: {value!r} is not a mode; valid: {', '.join(m.name for m in cls)}")


def step_word(mode: Mode | str | int | None = None) -> str:
    """How messages and axes name a step of ``mode``: ``"step"`` (a global step), or ``"eval step"``."""
    return "step" if mode is None else f"{Mode.parse(mode).name.lower()} step"


def step_label(step: int, mode: Mode | str | int | None = None) -> str:
    """How messages name a step: ``"step 3"`` (a global step), or ``"eval step 3"`` (a step of ``mode``)."""
    return f"{step_word(mode)} {step}"


class StepState(enum.Enum):
    """Answer of :meth:`tensortap.trial.Trial.has_passed_step`."""

    AVAILABLE = "available"
    NOT_YET_AVAILABLE = "not_yet_available"
    UNAVAILABLE = "unavailable"
