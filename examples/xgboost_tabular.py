"""Capture an XGBoost training on synthetic tabular data, then read the trial back.

Run ``python examples/xgboost_tabular.py [OUT_DIR]``; it takes a few seconds.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import xgboost as xgb

import tensortap
import tensortap.xgboost as ttx


def main(out_dir: str) -> None:
    """Train 30 rounds with every XGBoost collection captured, then print what the trial holds."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 8))
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 - X[:, 2] + rng.normal(scale=0.5, size=2000) > 0.5).astype(np.float32)
    names = [f"x{i}" for i in range(X.shape[1])]
    dtrain = xgb.DMatrix(X[:1500], label=y[:1500], feature_names=names)
    dval = xgb.DMatrix(X[1500:], label=y[1500:], feature_names=names)
    params = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.2, "eval_metric": ["logloss", "auc"]}
    callback = ttx.Callback(
        out_dir,
        include_collections=[
            "metrics",
            "losses",
            "feature_importance",
            "predictions",
            "labels",
            "hyperparameters",
            "average_shap",
            "full_shap",
            "trees",
        ],
        # the expensive collections default to every 10 (predictions) or 50 rounds (SHAP, trees)
        collection_configs={"average_shap": {"save_config": tensortap.SaveConfig(save_interval=10)}},
    )
    booster = xgb.train(
        params, dtrain, num_boost_round=30, evals=[(dtrain, "train"), (dval, "validation")],
        callbacks=[callback], verbose_eval=False,
    )  # fmt: skip

    trial = tensortap.create_trial(out_dir)
    steps, names = trial.steps(), trial.tensor_names()
    print(f"trial {out_dir}: {len(steps)} steps, {len(names)} tensors, ended={trial.training_ended}")
    loss = trial.tensor("losses/validation-logloss")
    auc = trial.tensor("metrics/validation-auc")
    for step in (0, 9, 19, 29):
        print(f"  round {step:2d}: validation logloss {float(loss.value(step)):.4f}  auc {float(auc.value(step)):.4f}")
    print(f"  max_depth hyperparameter: {float(trial.tensor('hyperparameters/max_depth').value(0)):g}")
    last = max(trial.tensor("average_shap/x0").steps())
    shap = {n.split("/")[1]: float(trial.tensor(n).value(last)) for n in trial.tensor_names(collection="average_shap")}
    top = sorted(shap, key=shap.__getitem__, reverse=True)[:3]
    print(f"  top features by mean |SHAP| at round {last}: " + ", ".join(f"{f} ({shap[f]:.3f})" for f in top))
    gain = booster.get_score(importance_type="gain")
    print(f"  top feature by gain (XGBoost): {max(gain, key=gain.__getitem__)}")
    predictions = trial.tensor("predictions").value(20)
    labels = trial.tensor("labels").value(20)
    print(f"  validation accuracy at round 20: {float(((predictions > 0.5) == labels).mean()):.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tensortap-xgboost-"))
