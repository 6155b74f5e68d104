"""What is computed from the booster: hyperparameters, feature importance, trees, predictions, SHAP values."""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import xgboost as xgb

from ..core import Hook
from ..versions import release
from .evals import EvalData

IMPORTANCE_TYPES = ("weight", "gain", "cover", "total_gain", "total_cover")
# collections XGBoost cannot compute for multi-target trees (multi_strategy="multi_output_tree"):
# trees_to_dataframe needs tree statistics, pred_contribs is not implemented there; get_score of any
# importance type crashes the process before XGBoost 3.0 (a segmentation fault: 2.1.1, 2.1.4)
MULTI_TARGET_UNSUPPORTED = ("trees", "average_shap", "full_shap") + (
    ("feature_importance",) if release(xgb) < (3, 0) else ()
)
# what XGBoost cannot compute for a linear booster: it has no trees, and only the "weight" importance
LINEAR_UNSUPPORTED = ("trees", *(f"feature_importance/{kind}" for kind in IMPORTANCE_TYPES if kind != "weight"))
# trees_to_dataframe columns holding node ids "<tree>-<node>", stored as the node number
_NODE_COLUMNS = ("Yes", "No", "Missing")
# model state in the booster's configuration, not a hyperparameter
_NOT_HYPERPARAMETERS = frozenset({"num_trees"})
INTEGER_PARAMETERS = frozenset(
    # the learner and its context; the boosters (gbtree, dart, gblinear); the trees; learning to rank
    """
    seed random_state seed_per_iteration nthread n_jobs fail_on_invalid_gpu_id validate_parameters
    disable_default_eval_metric num_feature num_class num_target boost_from_average
    num_parallel_tree one_drop max_row_perbatch top_k
    max_depth max_leaves max_bin max_cat_to_onehot max_cat_threshold refresh_leaf max_cached_hist_node
    debug_synchronize extmem_single_page
    lambdarank_num_pair_per_sample lambdarank_unbiased lambdarank_normalization lambdarank_score_normalization
    ndcg_exp_gain
    """.split()
)
"""XGBoost's integer and boolean parameters (fields of an integer type or ``bool`` of its parameter structs,
aliases included; 2.1 to 3.2), saved as integers. Their type cannot be read from the configuration: it
gives every parameter as a string, and a float parameter of an integral value as an integer
(``"lambda": "1"``, ``"eta": "1"``)."""


class ParameterWatch:
    """Which boosters had their parameters set (``Booster.set_param``) since last asked.

    While at least one training is watched, ``xgb.Booster.set_param`` is wrapped at class level, so
    that a callback that changes a parameter between rounds (``LearningRateScheduler``, or one's
    own) is seen whatever its place in ``callbacks=[...]``, and a round in which none changed costs
    nothing: reading the parameters back (``save_config`` and its JSON) takes about 0.1 ms, which
    was 1% of a round of ``bench/bench_xgboost.py`` when done every round. The wrapper is removed
    when the last watched training ends (unless another library wrapped ``set_param`` over it since);
    a training that raised never ends for its callbacks, so after one the wrapper stays, and costs a
    set insertion per ``set_param`` call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trainings = 0
        self._changed: weakref.WeakSet[xgb.Booster] = weakref.WeakSet()
        self._original: Any = None
        self._wrapper: Any = None

    def start(self) -> None:
        """Watch one more training (wrap ``set_param`` if it is the first)."""
        with self._lock:
            self._trainings += 1
            if self._trainings > 1:
                return
            original = self._original = xgb.Booster.set_param
            changed = self._changed

            @functools.wraps(original)
            def set_param(booster: xgb.Booster, *args: Any, **kwargs: Any) -> Any:
                changed.add(booster)
                return original(booster, *args, **kwargs)

            self._wrapper = set_param
            setattr(xgb.Booster, "set_param", set_param)  # noqa: B010 (mypy refuses to assign a method)

    def stop(self) -> None:
        """Watch one training fewer (restore ``set_param`` after the last)."""
        with self._lock:
            self._trainings -= 1
            if self._trainings == 0:
                if xgb.Booster.set_param is self._wrapper:
                    setattr(xgb.Booster, "set_param", self._original)  # noqa: B010
                self._changed.clear()

    def changed(self, booster: Any) -> bool:
        """Whether ``booster``'s parameters were set since the last call for it (or since :meth:`start`)."""
        try:
            self._changed.remove(booster)
        except KeyError:
            return False
        return True


#: The one watch of the process (``set_param`` is wrapped once, whatever the number of trainings).
PARAMETERS = ParameterWatch()


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


def unsupported(params: Mapping[str, str]) -> tuple[tuple[str, ...], str]:
    """What XGBoost cannot compute for the booster of ``params`` (collections, or ``feature_importance/<kind>``),
    and why, in words."""
    if params.get("multi_strategy") == "multi_output_tree":
        return (
            MULTI_TARGET_UNSUPPORTED,
            'XGBoost cannot compute them for multi-target trees (multi_strategy="multi_output_tree")',
        )
    if params.get("booster") == "gblinear":
        return LINEAR_UNSUPPORTED, 'a linear booster (booster="gblinear") has no trees and only the "weight" importance'
    return (), ""


def parameter_value(name: str, text: str) -> np.ndarray | None:
    """The value of the parameter ``name`` whose text is ``text`` (as :func:`booster_parameters` gives it) as a
    tensor: one of :data:`INTEGER_PARAMETERS` exactly, as int64 (uint64 above its range: an unsigned parameter
    XGBoost leaves at its largest value, 2**64 - 1, when it is not set); another number, or a list of
    numbers, as :func:`_as_numbers` gives it; None if it is not a number."""
    value = _as_integer(text) if name in INTEGER_PARAMETERS else None
    return _as_numbers(text) if value is None else value


def _as_integer(text: str) -> np.ndarray | None:
    """The integer a parameter's text holds as an int64 scalar (uint64 above its range), None if it holds
    none of 64 bits."""
    try:
        value = int(text)
    except ValueError:
        return None
    dtype = next((t for t in (np.int64, np.uint64) if np.iinfo(t).min <= value <= np.iinfo(t).max), None)
    return None if dtype is None else np.array(value, dtype=dtype)


def _as_numbers(text: str) -> np.ndarray | None:
    """The number a parameter's text holds, or the numbers of a list of them (``"[5E-1]"``, XGBoost 3's
    ``base_score``; ``"[0.25,0.25]"`` for several targets), as float64: a scalar for one; None if it is not."""
    listed = text.startswith("[") and text.endswith("]")
    try:
        numbers = [float(part) for part in (text[1:-1].split(",") if listed else [text])]
    except ValueError:
        return None
    return np.array(numbers[0] if len(numbers) == 1 else numbers, dtype=np.float64)


def feature_names(model: Any) -> list[str]:
    """The booster's feature names; ``f0``, ``f1``, ... (as ``get_score`` uses) when it has none."""
    return list(model.feature_names or [f"f{i}" for i in range(model.num_features())])


def tree_columns(model: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    """The columns of ``trees_to_dataframe()`` as numeric arrays, and the columns left out.

    Numeric columns are kept as they are; ``Feature`` becomes the feature's index
    (-1 for leaves); ``Yes``, ``No`` and ``Missing`` become the child's node number
    (NaN for leaves); ``ID`` (``"<Tree>-<Node>"``, the same as ``Tree`` and
    ``Node``) is dropped. Any other column that is not numeric (``Category``
    of a model with categorical splits, which holds lists) is left out and named
    in the second value.
    """
    from pandas.api.types import is_numeric_dtype

    frame = model.trees_to_dataframe()
    index = {name: i for i, name in enumerate(feature_names(model))}
    out: dict[str, np.ndarray] = {}
    left_out: list[str] = []
    for column in frame.columns:
        values = frame[column].tolist()
        if column == "Feature":
            out[column] = np.array([index.get(v, -1) for v in values], dtype=np.int64)
        elif column in _NODE_COLUMNS:
            nodes = [float(v.rpartition("-")[2]) if isinstance(v, str) else np.nan for v in values]
            out[column] = np.array(nodes, dtype=np.float64)
        elif is_numeric_dtype(frame[column]):
            out[column] = frame[column].to_numpy()
        elif column != "ID":
            left_out.append(str(column))
    return out, left_out


# ------------------------------------------------- one function per collection
# each offers the tensors of its collection at the open step of ``hook``; ``round_``
# is the boosting round, ``data`` the evaluation set (None when there is none)


def offer_hyperparameters(hook: Hook, params: Mapping[str, str]) -> None:
    """``hyperparameters/<param>``: the numeric parameters as :func:`parameter_value` gives them (int64 scalars
    for the integer ones, float64 for the others)."""
    hook.offer_many(
        (f"hyperparameters/{name}", value, ("hyperparameters",))
        for name, text in params.items()
        if (value := parameter_value(name, text)) is not None
    )


def offer_feature_importance(hook: Hook, model: Any, kind: str) -> None:
    """``feature_importance/<kind>/<feature>``: ``get_score`` for importance type ``kind``."""
    scores = model.get_score(importance_type=kind)
    hook.offer_many(
        (f"feature_importance/{kind}/{feature}", np.asarray(value), ("feature_importance",))
        for feature, value in scores.items()
    )


def offer_trees(hook: Hook, model: Any) -> list[str]:
    """``trees/<column>``: the columns of :func:`tree_columns`; returns the names of the columns left out."""
    columns, left_out = tree_columns(model)
    hook.offer_many((f"trees/{column}", values, ("trees",)) for column, values in columns.items())
    return [f"trees/{c}" for c in left_out]


def offer_predictions(hook: Hook, model: Any, round_: int, data: EvalData) -> None:
    """``predictions``: the transformed predictions of the model after ``round_`` on the evaluation set."""
    hook.offer("predictions", model.predict(data.dmatrix, iteration_range=(0, round_ + 1)), ("predictions",))


def offer_labels(hook: Hook, data: EvalData) -> None:
    """``labels``: the labels of the evaluation set."""
    hook.offer("labels", data.labels, ("labels",))


def offer_shap(hook: Hook, model: Any, round_: int, data: EvalData, approx: bool) -> None:
    """``full_shap`` (the SHAP matrix of the row sample) and ``average_shap/<feature>`` (mean |SHAP|).

    Both are computed before either is offered: where the computation fails, neither is saved (the caller
    warns once for the pair)."""
    shap = model.predict(data.shap_sample, pred_contribs=True, approx_contribs=approx, iteration_range=(0, round_ + 1))
    averages = []
    if hook.is_saving("average_shap"):
        # the last column is the bias; average |SHAP| over rows (and classes) per feature
        mean_abs = np.abs(shap[..., :-1]).reshape(-1, shap.shape[-1] - 1).mean(axis=0)
        features = zip(feature_names(model), mean_abs, strict=True)
        averages = [(f"average_shap/{f}", np.float64(value), ("average_shap",)) for f, value in features]
    hook.offer("full_shap", shap, ("full_shap",))
    hook.offer_many(averages)
