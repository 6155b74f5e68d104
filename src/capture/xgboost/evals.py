"""XGBoost's evaluation log (losses and metrics) and the evaluation sets of the running training."""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

import numpy as np
import xgboost as xgb
from xgboost import collective

from ...config import TRAINING_DATA
from ..core import Hook
from ..writer import logger

# XGBoost's built-in metrics where lower is better (the part before "@"); every
# other metric, custom ones included, goes to the "metrics" collection.
LOSS_METRICS = frozenset(
    {
        "rmse",
        "rmsle",
        "mae",
        "mape",
        "mphe",
        "logloss",
        "error",
        "merror",
        "mlogloss",
        "poisson-nloglik",
        "gamma-nloglik",
        "cox-nloglik",
        "gamma-deviance",
        "tweedie-nloglik",
        "aft-nloglik",
        "quantile",
    }
)
_TRAIN_CODE = inspect.unwrap(xgb.training.train).__code__
_TRAINING_CODES = frozenset({_TRAIN_CODE, inspect.unwrap(xgb.training.cv).__code__})

EvalsLog = Mapping[str, Mapping[str, Sequence[Any]]]


def metric_collection(metric: str) -> str:
    """Return ``"losses"`` for a loss-like XGBoost metric name (``"logloss"``, ``"error@0.7"``), else ``"metrics"``."""
    return "losses" if metric.split("@")[0] in LOSS_METRICS else "metrics"


def training_frame(frame: FrameType | None) -> FrameType | None:
    """The frame of the ``xgboost.train`` or ``xgboost.cv`` call that is running, found on the stack from
    ``frame`` up; None outside both."""
    while frame is not None and frame.f_code not in _TRAINING_CODES:
        frame = frame.f_back
    return frame


def running_train(frame: FrameType | None) -> tuple[Any, list[tuple[Any, str]]]:
    """``(dtrain, evals)`` of the ``xgboost.train`` call that is running, ``frame`` being its :func:`training_frame`.

    XGBoost's callback API passes evaluation results to callbacks but not the
    DMatrix objects; every path (``xgb.train``, the sklearn estimators,
    ``xgboost.dask``) runs ``xgboost.train``, whose arguments hold them.
    ``(None, [])`` outside ``xgboost.train`` (``xgb.cv``, or the callback's methods called by hand).
    """
    if frame is None or frame.f_code is not _TRAIN_CODE:
        return None, []
    local = frame.f_locals
    return local.get("dtrain"), list(local.get("evals") or [])


def shared_names(evals: Sequence[tuple[Any, str]]) -> list[str]:
    """Names given to more than one evaluation set (XGBoost logs those sets under one name)."""
    return [name for name, count in Counter(name for _, name in evals).items() if count > 1]


def empty_sets(evals: Sequence[tuple[Any, str]]) -> frozenset[str]:
    """Names of the evaluation sets without a row (over the workers of a distributed training, whose metrics
    XGBoost sums over them): XGBoost evaluates such a set as 0 (``rmse`` 0.0), which measures nothing. Of sets
    sharing a name, the last counts, as its metrics are the ones captured (:func:`shared_names`)."""
    rows = {name: dmatrix.num_row() for dmatrix, name in evals}
    counts = np.array(list(rows.values()), dtype=np.int64)
    if collective.is_distributed() and counts.size:  # every worker has the same sets, so all take part
        counts = collective.allreduce(counts, collective.Op.SUM)
    return frozenset(name for name, count in zip(rows, counts, strict=True) if count == 0)


def overlong(evals_log: EvalsLog, rounds: int, shared: Collection[str] = ()) -> list[str]:
    """``<data>-<metric>`` of each history with more than ``rounds`` entries, sets named in ``shared`` left out.

    XGBoost logs a custom metric named like a built-in one that is evaluated too (``custom_metric``
    returning ``("rmse", ...)``) under that name right after it, two values a round.
    """
    return [
        f"{data}-{metric}"
        for data, metrics in evals_log.items()
        if data not in shared
        for metric, history in metrics.items()
        if len(history) > rounds
    ]


def training_sets(dtrain: Any, evals: Sequence[tuple[Any, str]]) -> frozenset[str]:
    """Names of the evaluation sets that are the training DMatrix itself."""
    return frozenset(name for dmatrix, name in evals if dtrain is not None and dmatrix is dtrain)


def offer_evals(hook: Hook, evals_log: EvalsLog, training: Collection[str], empty: Collection[str] = ()) -> None:
    """Offer the last value of every metric of ``evals_log`` to ``losses`` or ``metrics``, but those of the sets
    named in ``empty`` (:func:`empty_sets`).

    ``losses/<data>-<metric>`` or ``metrics/<data>-<metric>``; the metrics of the
    sets named in ``training`` (the training DMatrix itself: ``evals=[(dtrain, ...)]``,
    or ``eval_set=[(X, y), ...]`` with the very arrays given to ``fit``) are in
    collection ``training_data`` too, which rules use to tell training from validation. With ``xgb.cv``
    the log holds ``(mean, std)`` over the folds: the mean under that name, the
    standard deviation as ``metrics/<data>-<metric>-std`` (a spread, not a loss).
    """
    hook.offer_many(_last_values(evals_log, training, empty))


def _last_values(
    evals_log: EvalsLog, training: Collection[str], empty: Collection[str]
) -> Iterator[tuple[str, np.float64, tuple[str, ...]]]:
    """``(name, value, collections)`` of each metric's last value, as :func:`offer_evals` names them."""
    for data, metrics in evals_log.items():
        if data in empty:
            continue
        extra = (TRAINING_DATA,) if data in training else ()
        for metric, history in metrics.items():
            collection = metric_collection(metric)
            last = history[-1]
            if isinstance(last, tuple):  # xgb.cv: (mean, std) over the folds
                yield f"{collection}/{data}-{metric}", np.float64(last[0]), (collection, *extra)
                yield f"metrics/{data}-{metric}-std", np.float64(last[1]), ("metrics", *extra)
            else:
                yield f"{collection}/{data}-{metric}", np.float64(last), (collection, *extra)


class EvalData:
    """The evaluation set whose predictions, labels and SHAP values are captured.

    Parameters
    ----------
    dmatrix
        The evaluation DMatrix.
    name
        Its name in ``evals``.
    shap_rows
        SHAP values are computed on at most this many rows (a fixed sample, seed 0).
    """

    def __init__(self, dmatrix: Any, name: str, shap_rows: int) -> None:
        self.dmatrix = dmatrix
        self.name = name
        self.shap_rows = shap_rows
        self._labels: np.ndarray | None = None
        self._shap_sample: Any = None

    @classmethod
    def choose(cls, evals: Sequence[tuple[Any, str]], eval_name: str | None, shap_rows: int) -> EvalData | None:
        """The set named ``eval_name`` (default: the last one); None without evaluation sets or without that name.
        Of sets sharing the name, the last: the one whose metrics XGBoost logs last, and so are captured."""
        named = [(dmatrix, name) for dmatrix, name in evals if eval_name in (None, name)]
        if not named:
            return None
        dmatrix, name = named[-1]
        return cls(dmatrix, name, shap_rows)

    @property
    def labels(self) -> np.ndarray:
        """The set's labels: ``get_label()``, or the label bounds of survival data.

        A set with ``label_lower_bound`` and ``label_upper_bound`` (the labels of
        ``survival:aft``, which has no plain label) gives shape ``(rows, 2)``: the
        lower and the upper bound of each row (``inf`` when it is right-censored).

        Raises
        ------
        ValueError
            When the set has no labels.
        """
        if self._labels is None:
            lower = self.dmatrix.get_float_info("label_lower_bound")
            if lower.size:
                labels = np.stack([lower, self.dmatrix.get_float_info("label_upper_bound")], axis=1)
            else:  # multi-target labels: one row per sample, which XGBoost before 3.2 gives flat
                labels = np.asarray(self.dmatrix.get_label())
                rows = self.dmatrix.num_row()
                if labels.ndim == 1 and rows and labels.size != rows:
                    labels = labels.reshape(rows, -1)
            if not labels.size:
                raise ValueError(f"{self.name!r} has no labels")
            self._labels = labels
        return self._labels

    @property
    def shap_sample(self) -> Any:
        """The rows SHAP values are computed on: all rows, or ``shap_rows`` of them drawn with seed 0."""
        if self._shap_sample is None:
            n = self.dmatrix.num_row()
            self._shap_sample = self.dmatrix
            if n > self.shap_rows:
                rows = np.sort(np.random.default_rng(0).choice(n, self.shap_rows, replace=False))
                try:
                    self._shap_sample = self.dmatrix.slice(rows)
                except xgb.core.XGBoostError as exc:
                    logger.warning(
                        "tensortap: SHAP values use all %d rows of %r: it cannot be sliced to %d rows (%s)",
                        n,
                        self.name,
                        self.shap_rows,
                        str(exc).splitlines()[0],
                    )
        return self._shap_sample
