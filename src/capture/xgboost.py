"""XGBoost adapter: a training callback that captures each boosting round.

Use it through :mod:`tensortap.xgboost`::

    import tensortap.xgboost as ttx
    booster = xgb.train(params, dtrain, num_boost_round=100,
                        evals=[(dtrain, "train"), (dval, "validation")],
                        callbacks=[ttx.Callback(out_dir)])

A step is a boosting round: step ``s`` holds what the model looked like after
round ``s`` (counted over the booster's life, so training a booster further
with ``xgb_model=`` goes on from its last round). What is captured, under
which names, and how often by default:

====================== ========================================= ================
collection             tensors                                   default interval
====================== ========================================= ================
``losses``             ``losses/<data>-<metric>`` (loss-like)    every round
``metrics``            ``metrics/<data>-<metric>`` (all others)  every round
``hyperparameters``    ``hyperparameters/<param>`` (numeric)     round 0 only
``feature_importance`` ``feature_importance/<type>/<feature>``   every 10 rounds
``predictions``        ``predictions``                           every 10 rounds
``labels``             ``labels``                                every 10 rounds
``average_shap``       ``average_shap/<feature>``                every 50 rounds
``full_shap``          ``full_shap``                             every 50 rounds
``trees``              ``trees/<column>``                        every 50 rounds
====================== ========================================= ================

Default collections: ``metrics``, ``losses``, ``hyperparameters`` (nearly free:
see ``bench/bench_xgboost.py``). See ``docs/quickstart-xgboost.md`` for the
details (which metrics count as losses, how string parameters and tree columns
are stored, the SHAP row sample).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, ClassVar

import numpy as np

try:
    import xgboost as xgb
    from xgboost import collective
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('XGBoost is needed for tensortap.xgboost: pip install "tensortap[xgboost]"') from exc

from ..config import SaveConfig
from ..modes import Mode
from . import core
from .writer import logger

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
IMPORTANCE_TYPES = ("weight", "gain", "cover", "total_gain", "total_cover")
# trees_to_dataframe columns holding node ids "<tree>-<node>", stored as the node number
_NODE_COLUMNS = ("Yes", "No", "Missing")
# model state in the booster's configuration, not a hyperparameter
_NOT_HYPERPARAMETERS = frozenset({"num_trees"})
_TRAIN_CODE = inspect.unwrap(xgb.training.train).__code__


def metric_collection(metric: str) -> str:
    """Return ``"losses"`` for a loss-like XGBoost metric name (``"logloss"``, ``"error@0.7"``), else ``"metrics"``."""
    return "losses" if metric.split("@")[0] in LOSS_METRICS else "metrics"


def booster_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """Flatten the parameters of a booster's ``save_config()`` JSON into ``{name: value string}``.

    Every ``*_param`` section is merged (``eta``, ``max_depth``, ``objective``, ...),
    plus ``eval_metric`` (comma-separated) when metrics are configured.
    """
    params: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_param") and isinstance(value, dict):
                    params.update({k: v for k, v in value.items() if isinstance(v, str)})
                else:
                    walk(value)

    walk(config)
    metrics = config.get("learner", {}).get("metrics") or []
    if metrics:
        params["eval_metric"] = ",".join(str(m.get("name")) for m in metrics)
    return {k: v for k, v in sorted(params.items()) if k not in _NOT_HYPERPARAMETERS}


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _find_evals(frame: FrameType | None) -> list[tuple[Any, str]]:
    """The ``evals`` argument of the ``xgboost.train`` call that is running, found on the stack.

    XGBoost's callback API passes evaluation results to callbacks but not the
    evaluation DMatrix objects; every path (``xgb.train``, the sklearn estimators,
    ``xgboost.dask``) runs ``xgboost.train``, whose ``evals`` holds them.
    """
    while frame is not None:
        if frame.f_code is _TRAIN_CODE:
            return list(frame.f_locals.get("evals") or [])
        frame = frame.f_back
    return []


class Hook(core.Hook):
    """The capture core with XGBoost's collections and defaults; built by :class:`Callback`.

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
        "hyperparameters": {"save_config": SaveConfig(save_interval=1, end_step=1)},
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


class _EvalData:
    """The evaluation set whose predictions, labels and SHAP values are captured."""

    def __init__(self, dmatrix: Any, name: str, shap_rows: int) -> None:
        self.dmatrix = dmatrix
        self.name = name
        self.shap_rows = shap_rows
        self._labels: np.ndarray | None = None
        self._shap_sample: Any = None

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.asarray(self.dmatrix.get_label())
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


class Callback(xgb.callback.TrainingCallback):
    """Capture every boosting round of ``xgb.train``, ``xgb.cv``, the sklearn estimators and ``xgboost.dask``.

    The callback is picklable: the hook that writes is created in
    :meth:`before_training`, in the process that trains (each dask worker
    writes ``worker_<rank>``, the rank being XGBoost's collective rank), and
    closed in :meth:`after_training`.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    eval_name
        Name of the evaluation set whose predictions, labels and SHAP values are
        captured (as given in ``evals``, e.g. ``"validation"``, or ``"validation_0"``
        for the sklearn API); default: the last one.
    shap_rows
        SHAP values are computed on at most this many rows of that set (a fixed
        random sample, seed 0).
    shap_approx
        Use XGBoost's approximate contributions (``approx_contribs=True``, ~100 times faster).
    stop_poll_seconds
        Minimum seconds between two looks for a stop request (default 1).
    **hook_kwargs
        ``save_config``, ``include_collections``, ``collection_configs``, ... as
        :class:`tensortap.capture.Hook`; checked here, at construction.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        eval_name: str | None = None,
        shap_rows: int = 200,
        shap_approx: bool = False,
        stop_poll_seconds: float | None = None,
        **hook_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(shap_rows, bool) or not isinstance(shap_rows, int) or shap_rows < 1:
            raise ValueError(f"shap_rows: expected an integer >= 1, got {shap_rows!r}")
        if eval_name is not None and not isinstance(eval_name, str):
            raise ValueError(f"eval_name: expected the name of an evaluation set or None, got {eval_name!r}")
        self.out_dir = os.fspath(out_dir)
        self.eval_name = eval_name
        self.shap_rows = shap_rows
        self.shap_approx = bool(shap_approx)
        self.stop_poll_seconds = stop_poll_seconds
        self.hook_kwargs = hook_kwargs
        # a rank-1 hook of include_workers="one" opens no writer: this only checks the configuration
        probe = {**hook_kwargs, "rank": 1, "rules": None}
        if probe.get("include_workers", "all") == "all":
            probe["include_workers"] = "one"
        included = Hook(self.out_dir, **probe).included
        if "trees" in included and importlib.util.find_spec("pandas") is None:
            raise ImportError("include_collections: 'trees' needs pandas: pip install pandas")
        self.hook: Hook | None = None
        self._offset = 0
        self._eval: _EvalData | None = None

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], **overrides: Any) -> Callback:
        """Build a callback from a JSON hook configuration (see :meth:`tensortap.capture.Hook.from_json`)."""
        return cls(**(Hook._kwargs_from_json(core.read_json_config(path)) | overrides))

    @classmethod
    def from_env(cls, **overrides: Any) -> Callback | None:
        """Build a callback from the JSON file named by ``TENSORTAP_CONFIG``; None if it is unset."""
        path = os.environ.get(core.CONFIG_ENV)
        return cls.from_json(path, **overrides) if path else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "hook": None, "_eval": None}

    # ------------------------------------------------------------ callbacks
    def before_training(self, model: Any) -> Any:
        """Open the hook in the training process, after the booster exists."""
        self._eval = self._choose_eval(_find_evals(sys._getframe(1)))
        self._offset = model.num_boosted_rounds()
        booster = model if isinstance(model, xgb.Booster) else None
        params = booster_parameters(json.loads(booster.save_config())) if booster is not None else {}
        kwargs = dict(self.hook_kwargs)
        if collective.is_distributed():
            kwargs["rank"] = collective.get_rank()
        self.hook = Hook(self.out_dir, hyperparameters=params, **kwargs)
        if self.stop_poll_seconds is not None:
            self.hook.stop_poll_seconds = self.stop_poll_seconds
        return model

    def _choose_eval(self, evals: Sequence[tuple[Any, str]]) -> _EvalData | None:
        if not evals:
            return None
        names = [name for _, name in evals]
        if self.eval_name is None:
            dmatrix, name = evals[-1]
        elif self.eval_name in names:
            dmatrix, name = evals[names.index(self.eval_name)]
        else:
            raise ValueError(f"eval_name: {self.eval_name!r} is not an evaluation set; valid: {', '.join(names)}")
        return _EvalData(dmatrix, name, self.shap_rows)

    def after_iteration(self, model: Any, epoch: int, evals_log: Mapping[str, Mapping[str, Any]]) -> bool:
        """Capture round ``epoch``; return True when a stop request was written into the trial."""
        hook = self.hook
        if hook is None:
            raise RuntimeError("tensortap Callback: after_iteration before before_training")
        round_ = self._offset + epoch
        if hook.begin_round(round_):
            try:
                self._capture(hook, model, round_, evals_log)
            except Exception as exc:
                hook._fail(exc, f"cannot capture boosting round {round_}")
        hook.end_step()
        stop = hook.should_stop
        if collective.is_distributed():  # a stop one worker sees stops all, at the same round
            stop = bool(collective.allreduce(np.array([stop], dtype=np.int32), collective.Op.MAX)[0])
        return stop

    def after_training(self, model: Any) -> Any:
        """Publish what is left and record the end of this worker's training."""
        if self.hook is not None:
            self.hook.close()
        self._eval = None
        return model

    # -------------------------------------------------------------- capture
    def _capture(self, hook: Hook, model: Any, round_: int, evals_log: Mapping[str, Mapping[str, Any]]) -> None:
        self._capture_evals(hook, evals_log)
        if not isinstance(model, xgb.Booster):  # xgb.cv: one booster per fold, only the evaluation log is shared
            return
        if hook.is_saving("hyperparameters"):
            for name, text in hook.hyperparameters.items():
                number = _as_number(text)
                if number is not None:
                    hook.offer(f"hyperparameters/{name}", np.float64(number), ("hyperparameters",))
        if hook.is_saving("feature_importance"):
            for kind in IMPORTANCE_TYPES:
                for feature, value in model.get_score(importance_type=kind).items():
                    hook.offer(f"feature_importance/{kind}/{feature}", np.asarray(value), ("feature_importance",))
        if hook.is_saving("trees"):
            for column, values in _tree_columns(model).items():
                hook.offer(f"trees/{column}", values, ("trees",))
        data = self._eval
        if data is None:
            return
        iterations = (0, round_ + 1)
        if hook.is_saving("predictions"):
            hook.offer("predictions", model.predict(data.dmatrix, iteration_range=iterations), ("predictions",))
        if hook.is_saving("labels"):
            hook.offer("labels", data.labels, ("labels",))
        if hook.is_saving("average_shap") or hook.is_saving("full_shap"):
            shap = model.predict(
                data.shap_sample, pred_contribs=True, approx_contribs=self.shap_approx, iteration_range=iterations
            )
            hook.offer("full_shap", shap, ("full_shap",))
            if hook.is_saving("average_shap"):
                # the last column is the bias; average |SHAP| over rows (and classes) per feature
                mean_abs = np.abs(shap[..., :-1]).reshape(-1, shap.shape[-1] - 1).mean(axis=0)
                for feature, value in zip(_feature_names(model), mean_abs, strict=True):
                    hook.offer(f"average_shap/{feature}", np.float64(value), ("average_shap",))

    @staticmethod
    def _capture_evals(hook: Hook, evals_log: Mapping[str, Mapping[str, Any]]) -> None:
        for data, metrics in evals_log.items():
            for metric, history in metrics.items():
                collection = metric_collection(metric)
                if not hook.is_saving(collection):
                    continue
                name = f"{collection}/{data}-{metric}"
                last = history[-1]
                if isinstance(last, tuple):  # xgb.cv: (mean, std) over the folds
                    hook.offer(name, np.float64(last[0]), (collection,))
                    hook.offer(f"{name}-std", np.float64(last[1]), (collection,))
                else:
                    hook.offer(name, np.float64(last), (collection,))


def _feature_names(model: Any) -> list[str]:
    """The booster's feature names; ``f0``, ``f1``, ... (as ``get_score`` uses) when it has none."""
    return list(model.feature_names or [f"f{i}" for i in range(model.num_features())])


def _tree_columns(model: Any) -> dict[str, np.ndarray]:
    """The columns of ``trees_to_dataframe()`` as numeric arrays.

    Numeric columns are kept as they are; ``Feature`` becomes the feature's index
    (-1 for leaves); ``Yes``, ``No`` and ``Missing`` become the child's node number
    (NaN for leaves); ``ID`` (``"<Tree>-<Node>"``) is left out.
    """
    from pandas.api.types import is_numeric_dtype

    frame = model.trees_to_dataframe()
    index = {name: i for i, name in enumerate(_feature_names(model))}
    out: dict[str, np.ndarray] = {}
    for column in frame.columns:
        values = frame[column].tolist()
        if column == "Feature":
            out[column] = np.array([index.get(v, -1) for v in values], dtype=np.int64)
        elif column in _NODE_COLUMNS:
            nodes = [float(v.rpartition("-")[2]) if isinstance(v, str) else np.nan for v in values]
            out[column] = np.array(nodes, dtype=np.float64)
        elif is_numeric_dtype(frame[column]):
            out[column] = frame[column].to_numpy()
    return out
