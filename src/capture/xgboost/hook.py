"""The capture core with XGBoost's collections and default intervals."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from ...config import Collection, SaveConfig
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
        given = dict(kwargs.get("collection_configs") or {})
        explicit = kwargs.get("save_config") is not None
        configs: dict[str, Collection | Mapping[str, Any]] = {}
        for name, default in self.collection_defaults.items():
            own = given.get(name)
            if explicit:  # the user's interval wins over the built-in ones
                configs[name] = own if own is not None else Collection(name)
            elif own is not None:  # a configuration without a save_config keeps the built-in interval
                configs[name] = _with_save_config(name, own, default["save_config"])
        kwargs["collection_configs"] = {**given, **configs}
        super().__init__(out_dir, **kwargs)

    def _worker_info(self) -> dict[str, Any]:
        return {**super()._worker_info(), "hyperparameters": self.hyperparameters}

    def begin_round(self, round_: int) -> bool:
        """Start the step of boosting round ``round_`` (global and TRAIN mode step); return whether it is saved."""
        self.mode_steps[Mode.TRAIN] = round_ - 1
        return self.begin_step(Mode.TRAIN, step=round_)


def _with_save_config(
    name: str, given: Collection | Mapping[str, Any], save_config: SaveConfig
) -> Collection | Mapping[str, Any]:
    """``given`` (a collection configuration), with ``save_config`` when it has none."""
    if isinstance(given, Collection):
        return given if given.save_config is not None else dataclasses.replace(given, save_config=save_config)
    if isinstance(given, Mapping) and given.get("save_config") is None:
        return {**given, "save_config": save_config}
    return given
