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
``hyperparameters``    ``hyperparameters/<param>`` (numeric)     once, then changes
``feature_importance`` ``feature_importance/<type>/<feature>``   every 10 rounds
``predictions``        ``predictions``                           every 10 rounds
``labels``             ``labels``                                every 10 rounds
``average_shap``       ``average_shap/<feature>``                every 50 rounds
``full_shap``          ``full_shap``                             every 50 rounds
``trees``              ``trees/<column>``                        every 50 rounds
====================== ========================================= ================

The coarser intervals apply only when no ``save_config=`` is given. Default
collections: ``metrics``, ``losses``, ``hyperparameters`` (nearly free: see
``bench/bench_xgboost.py``). See ``docs/quickstart-xgboost.md`` for the details.

The modules: :mod:`.hook` (collections and their defaults), :mod:`.evals`
(the evaluation log and the evaluation sets), :mod:`.model` (what is computed
from the booster), :mod:`.callback` (XGBoost's callback events).
"""

from __future__ import annotations

from ..versions import require

# XGBoost 2.0 computes no SHAP values of the sklearn wrapper's training data, its QuantileDMatrix ("Not
# implemented"; measured: 2.0.0, 2.0.3)
try:
    import xgboost
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('XGBoost is needed for tensortap.xgboost: pip install "tensortap[xgboost]"') from exc
else:
    require(xgboost, "tensortap.xgboost", "XGBoost", (2, 1), 'pip install "tensortap[xgboost]"')

from .callback import Callback
from .evals import LOSS_METRICS, metric_collection
from .hook import Hook
from .model import IMPORTANCE_TYPES, booster_parameters

__all__ = [
    "IMPORTANCE_TYPES",
    "LOSS_METRICS",
    "Callback",
    "Hook",
    "booster_parameters",
    "metric_collection",
]
