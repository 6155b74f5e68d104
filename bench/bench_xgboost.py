"""Cost of the XGBoost callback: 10k rows x 50 features, 100 boosting rounds.

Cases: no callback; metrics and losses every round; the default collections
(``ttx.Callback(out_dir)``); every collection at its default interval.
XGBoost runs on one thread and the cases are interleaved, so that machines
shared with other work still give comparable figures: ``seconds`` is the
process CPU time (XGBoost plus tensortap's writer thread) of the best of
``repeats`` trainings, ``wall_seconds`` its wall-clock time, ``ratio`` the CPU
time relative to no callback.

Run ``python bench/bench_xgboost.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xgboost as xgb

import tensortap.xgboost as ttx

ROWS, FEATURES, ROUNDS = 10_000, 50, 100
PARAMS = {
    "objective": "binary:logistic",
    "tree_method": "hist",
    "max_depth": 6,
    "eta": 0.1,
    "nthread": 1,
    "eval_metric": ["logloss", "auc"],
}
ALL = [
    "metrics", "losses", "feature_importance", "predictions", "labels", "hyperparameters",
    "average_shap", "full_shap", "trees",
]  # fmt: skip
CASES: dict[str, Callable[[str], list[xgb.callback.TrainingCallback]]] = {
    "no callback": lambda out: [],
    "metrics+losses every round": lambda out: [ttx.Callback(out, include_collections=["metrics", "losses"])],
    "default collections": lambda out: [ttx.Callback(out)],
    "all collections, default intervals": lambda out: [ttx.Callback(out, include_collections=ALL)],
}


def _data() -> tuple[xgb.DMatrix, xgb.DMatrix]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(ROWS + 2_000, FEATURES)).astype(np.float32)
    y = (X[:, :5].sum(axis=1) + rng.normal(size=len(X)) > 0).astype(np.float32)
    return xgb.DMatrix(X[:ROWS], label=y[:ROWS]), xgb.DMatrix(X[ROWS:], label=y[ROWS:])


def _time(make: Callable[[str], list[Any]], dtrain: xgb.DMatrix, dval: xgb.DMatrix) -> tuple[float, float]:
    """Return (CPU seconds, wall seconds) of one training, the callback's closing included."""
    out = tempfile.mkdtemp(prefix="tensortap-bench-")
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        xgb.train(
            PARAMS, dtrain, ROUNDS, evals=[(dtrain, "train"), (dval, "validation")], callbacks=make(out),
            verbose_eval=False,
        )  # fmt: skip
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run(repeats: int = 3) -> list[dict[str, Any]]:
    """Time every case; return rows ``{"benchmark", "case", "seconds", "ratio", "wall_seconds"}``."""
    dtrain, dval = _data()
    _time(CASES["no callback"], dtrain, dval)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
    for _ in range(repeats):
        for case, make in CASES.items():
            times[case].append(_time(make, dtrain, dval))
    best = {case: min(t) for case, t in times.items()}
    base = best["no callback"][0]
    bench = f"xgboost {ROWS // 1000}k x {FEATURES}, {ROUNDS} rounds"
    return [
        {
            "benchmark": bench,
            "case": c,
            "seconds": round(cpu, 3),
            "ratio": round(cpu / base, 3),
            "wall_seconds": round(wall, 3),
        }
        for c, (cpu, wall) in best.items()
    ]


if __name__ == "__main__":
    for row in run():
        print(
            f"{row['benchmark']:<30} {row['case']:<36} cpu {row['seconds']:7.3f} s  x{row['ratio']:.3f}"
            f"  wall {row['wall_seconds']:7.3f} s"
        )
