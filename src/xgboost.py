"""XGBoost adapter: ``import tensortap.xgboost as ttx``, then ``callbacks=[ttx.Callback(out_dir)]``.

Importing this module imports XGBoost; see :mod:`tensortap.capture.xgboost`.
"""

from __future__ import annotations

from .capture.core import module_attribute_error
from .capture.xgboost import IMPORTANCE_TYPES, LOSS_METRICS, Callback, Hook, metric_collection

__all__ = ["IMPORTANCE_TYPES", "LOSS_METRICS", "Callback", "Hook", "metric_collection"]
__getattr__ = module_attribute_error(__name__)
