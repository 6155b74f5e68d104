"""Cost of the XGBoost callback: 10k rows x 50 features, 100 boosting rounds, one thread.

Arms: no callback, twice (the run's noise); metrics and losses every round;
the default collections (``ttx.Callback(out_dir)``); every collection at its
default interval. Each arm is one ``xgb.train`` in a thread of its own, held
before each round by a gate callback; the arms run ``BLOCK`` rounds at a time
in turns (:mod:`bench.harness`), and the end of training (where tensortap
publishes its last shard) is timed with its arm.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import xgboost as xgb

import tensortap.xgboost as ttx
from bench import harness

ROWS, FEATURES, ROUNDS = 10_000, 50, 100
BLOCK = 10
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
    harness.BASELINE: lambda out: [],
    "metrics+losses every round": lambda out: [ttx.Callback(out, include_collections=["metrics", "losses"])],
    "default collections": lambda out: [ttx.Callback(out)],
    "all collections, default intervals": lambda out: [ttx.Callback(out, include_collections=ALL)],
}


def _data() -> tuple[xgb.DMatrix, xgb.DMatrix]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(ROWS + 2_000, FEATURES)).astype(np.float32)
    y = (X[:, :5].sum(axis=1) + rng.normal(size=len(X)) > 0).astype(np.float32)
    return xgb.DMatrix(X[:ROWS], label=y[:ROWS]), xgb.DMatrix(X[ROWS:], label=y[ROWS:])


class BoostArm(harness.GatedThread):
    """One ``xgb.train`` of ``rounds`` rounds with the callbacks of a case, held before each round by a gate."""

    def __init__(self, case: str, dtrain: xgb.DMatrix, dval: xgb.DMatrix, rounds: int) -> None:
        gate = self.gate

        class Gate(xgb.callback.TrainingCallback):
            def before_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
                gate()
                return False

        self.out_dir = tempfile.mkdtemp(prefix="tensortap-bench-")
        callbacks = [Gate(), *CASES[case](self.out_dir)]
        evals = [(dtrain, "train"), (dval, "validation")]
        super().__init__(
            lambda: xgb.train(PARAMS, dtrain, rounds, evals=evals, callbacks=callbacks, verbose_eval=False)
        )

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.out_dir, ignore_errors=True)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time every case, interleaved in blocks of rounds; one row per case with the run's noise."""
    dtrain, dval = _data()
    rounds, block = (4, 2) if quick else (ROUNDS // BLOCK, BLOCK)
    arms: dict[str, Callable[[], harness.Arm]] = {}
    for case in CASES:
        arms[case] = functools.partial(BoostArm, case, dtrain, dval, rounds * block + 2)
        if case == harness.BASELINE:
            arms[harness.BASELINE_2] = lambda: BoostArm(harness.BASELINE, dtrain, dval, rounds * block + 2)
    timings = harness.interleave(arms, rounds=rounds, block=block, warmup=1)
    return harness.rows(f"xgboost {ROWS // 1000}k x {FEATURES}, {ROUNDS} rounds", timings, unit="ms_per_round")


if __name__ == "__main__":
    for row in run():
        print(row)
