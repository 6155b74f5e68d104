"""tensortap: capture tensors while models train; query and judge them live or offline.

``import tensortap`` imports no ML framework. Adapters: :mod:`tensortap.torch`,
:mod:`tensortap.keras`, :mod:`tensortap.xgboost`.
"""

from __future__ import annotations

from .config import Collection, ReductionConfig, SaveConfig
from .exceptions import (
    NoMoreData,
    RuleInputsMissing,
    ShardUnreadable,
    StepNotYetAvailable,
    StepUnavailable,
    StopTrainingRequested,
    StorageOptionsError,
    StorageUnreachable,
    TensortapError,
    TensorUnavailable,
    TensorUnavailableForStep,
    TrialExistsError,
    TrialNotFound,
    TrialTooNew,
    UnknownName,
)
from .modes import Mode, StepState
from .trial import Tensor, Trial, create_trial, open_trial
from .trial.compare import Comparison, compare

__version__ = "0.1.0"

__all__ = [
    "Collection",
    "Comparison",
    "Mode",
    "NoMoreData",
    "ReductionConfig",
    "RuleInputsMissing",
    "SaveConfig",
    "ShardUnreadable",
    "StepNotYetAvailable",
    "StepState",
    "StepUnavailable",
    "StopTrainingRequested",
    "StorageOptionsError",
    "StorageUnreachable",
    "Tensor",
    "TensorUnavailable",
    "TensorUnavailableForStep",
    "TensortapError",
    "Trial",
    "TrialExistsError",
    "TrialNotFound",
    "TrialTooNew",
    "UnknownName",
    "compare",
    "create_trial",
    "open_trial",
]
