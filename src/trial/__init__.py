"""The read side: Trial, Tensor, and (in :mod:`tensortap.trial.rules`) rules."""

from __future__ import annotations

from .trial import Tensor, Trial, create_trial, open_trial

__all__ = ["Tensor", "Trial", "create_trial", "open_trial"]
