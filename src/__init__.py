"""tensortap: capture tensors while models train; query and judge them live or offline.

``import tensortap`` imports no ML framework. Adapters: :mod:`tensortap.torch`,
:mod:`tensortap.keras`, :mod:`tensortap.xgboost`.
"""

from __future__ import annotations

from .config import Collection, ReductionConfig, SaveConfig
from .exceptions import (
    NoMoreData,
    RuleInputsMissing,
    StepNotYetAvailable,
    StepUnavailable,
    StopTrainingRequested,
    TensortapError,
    TensorUnavailable,
    TensorUnavailableForStep,
    TrialNotFound,
)
from .modes import Mode, StepState
from .trial import Tensor, Trial, create_trial, open_trial

__version__ = "0.1.0"

__all__ = [
    "Collection",
    "Mode",
    "NoMoreData",
    "ReductionConfig",
    "RuleInputsMissing",
    "SaveConfig",
    "StepNotYetAvailable",
    "StepState",
    "StepUnavailable",
    "StopTrainingRequested",
    "Tensor",
    "TensorUnavailable",
    "TensorUnavailableForStep",
    "TensortapError",
    "Trial",
    "TrialNotFound",
    "create_trial",
    "open_trial",
]
