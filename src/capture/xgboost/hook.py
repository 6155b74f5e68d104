"""The capture core with XGBoost's collections and default intervals."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import SaveConfig
from ...modes import Mode
from .. import core


class Hook(core.Hook):
    """The capture core with XGBoost's collections and defaults; built by :class:`~.callback.Callback`.

    The costly collections have coarser default intervals
    (:attr:`collection_defaults`). They apply only when no ``save_config`` is
    given: an explicit ``save_config`` applies to every collection that has no
    configuration of its own in ``collection_configs``.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    hyperparameters
        Every parameter of the booster as a string; written to the worker record
        (``workers/worker_<rank>.json``, key ``"hyperparameters"``).
    **kwargs
        As :class:`tensortap.capture.Hook`.
    """

    framework = "xgboost"
    default_collections = ("metrics", "losses", "hyperparameters")
    default_interval = 1
    collection_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "feature_importance": {"save_config": SaveConfig(save_interval=10)},
        "predictions": {"save_config": SaveConfig(save_interval=10)},
        "labels": {"save_config": SaveConfig(save_interval=10)},
        "average_shap": {"save_config": SaveConfig(save_interval=50)},
        "full_shap": {"save_config": SaveConfig(save_interval=50)},
        "trees": {"save_config": SaveConfig(save_interval=50)},
    }

    def __init__(
        self, out_dir: str | os.PathLike[str], hyperparameters: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        self.hyperparameters = dict(hyperparameters or {})
        super().__init__(out_dir, **kwargs)

    def _worker_info(self) -> dict[str, Any]:
        return {**super()._worker_info(), "hyperparameters": self.hyperparameters}

    def begin_round(self, round_: int) -> bool:
        """Start the step of boosting round ``round_`` (global and TRAIN mode step); return whether it is saved."""
        self.mode_steps[Mode.TRAIN] = round_ - 1
        return self.begin_step(Mode.TRAIN, step=round_)
