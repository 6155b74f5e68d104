"""Cost of the XGBoost callback: 10k rows x 50 features, 100 boosting rounds, one thread.

Arms: no callback, twice (the run's noise); metrics and losses every round;
the default collections (``ttx.Callback(out_dir)``); every collection at its
default interval. Each arm runs ``TRAININGS`` trainings of ``ROUNDS`` rounds
(``xgb.train``, each with a new trial) one after the other in a thread of its
own, held before each round by a gate callback; the arms run ``BLOCK`` rounds
at a time in turns (:mod:`bench.harness`), so the start and the end of every
training (where tensortap publishes its last shard) are timed with its arm.
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
TRAININGS = 4  # 40 blocks an arm: a 95% interval of about +-6% on this machine (10 blocks: +-12%)
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
    """``trainings`` ``xgb.train`` of ``rounds`` rounds each, one after the other, with the callbacks
    of a case (a new trial each), held before each round by a gate."""

    def __init__(self, case: str, dtrain: xgb.DMatrix, dval: xgb.DMatrix, rounds: int, trainings: int) -> None:
        gate = self.gate

        class Gate(xgb.callback.TrainingCallback):
            def before_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
                gate()
                return False

        self.out_dir = tempfile.mkdtemp(prefix="tensortap-bench-")
        evals = [(dtrain, "train"), (dval, "validation")]

        def train() -> None:
            for i in range(trainings):
                callbacks = [Gate(), *CASES[case](f"{self.out_dir}/{i}")]
                xgb.train(PARAMS, dtrain, rounds, evals=evals, callbacks=callbacks, verbose_eval=False)

        super().__init__(train)

    def discard(self) -> None:
        """Remove the trials (untimed: see :func:`bench.harness.discard`)."""
        shutil.rmtree(self.out_dir, ignore_errors=True)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time every case, interleaved in blocks of rounds; one row per case with the run's noise."""
    dtrain, dval = _data()
    rounds, block, trainings = (8, 2, 1) if quick else (ROUNDS, BLOCK, TRAININGS)
    arms: dict[str, Callable[[], harness.Arm]] = {}
    for case in CASES:
        arms[case] = functools.partial(BoostArm, case, dtrain, dval, rounds, trainings)
        if case == harness.BASELINE:
            arms[harness.BASELINE_2] = functools.partial(BoostArm, case, dtrain, dval, rounds, trainings)
    # the warm-up round is the first training's first; the last block ends with the last training's end
    timings = harness.interleave(arms, rounds=rounds * trainings // block, block=block, warmup=1)
    return harness.rows(f"xgboost {ROWS // 1000}k x {FEATURES}, {ROUNDS} rounds", timings, unit="ms_per_round")


if __name__ == "__main__":
    for row in run():
        print(row)
