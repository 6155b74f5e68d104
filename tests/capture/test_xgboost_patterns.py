"""The XGBoost adapter on the patterns real training code uses, each checked against what XGBoost computed.

The patterns come from XGBoost's own demos (demo/guide-python): named sets such as
``dtrain``/``dtest`` or ``train``/``eval``, custom objectives and metrics, the
sklearn estimators (early stopping, pipelines, cross-validation, grid search),
multi-class and multi-target models, ranking.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost")
pytest.importorskip("sklearn")

import tensortap  # noqa: E402
import tensortap.xgboost as ttx  # noqa: E402
from tensortap import ReductionConfig, RuleInputsMissing, SaveConfig  # noqa: E402
from tensortap.capture.xgboost.model import MULTI_TARGET_UNSUPPORTED  # noqa: E402
from tensortap.cli import main  # noqa: E402
from tensortap.rules import ExplodingTensor, Overfit, invoke_rule  # noqa: E402

pytestmark = pytest.mark.xgboost

ALL = [
    "metrics", "losses", "feature_importance", "predictions", "labels", "hyperparameters",
    "average_shap", "full_shap", "trees",
]  # fmt: skip
EVERY_ROUND = SaveConfig(save_interval=1)
PARAMS = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "nthread": 1, "eval_metric": "logloss"}
# overfits at once: deep trees, a large step, noisy labels
OVERFITTING = {**PARAMS, "eta": 1.0, "max_depth": 6}


def _data(rows: int = 200, features: int = 5, seed: int = 0, flip: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    return make_classification(rows, features, n_informative=3, n_redundant=0, flip_y=flip, random_state=seed)


def _split(flip: float = 0.0) -> tuple[Any, Any]:
    X, y = _data(flip=flip)
    return xgb.DMatrix(X[:120], label=y[:120]), xgb.DMatrix(X[120:], label=y[120:])


def _series(trial: Any, name: str) -> list[float]:
    values = trial.tensor(name).values()
    return [float(values[s]) for s in sorted(values)]


def _overfit_steps(train: list[float], val: list[float], threshold: float = 0.1) -> list[int]:
    """The steps Overfit (patience 1) fires at, from XGBoost's own evaluation log."""
    return [s for s, (t, v) in enumerate(zip(train, val, strict=True)) if (v - t) / abs(t) > threshold]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tensortap" and r.levelno == logging.WARNING]


# ------------------------------------------------------------ save_config
def test_an_explicit_save_config_applies_to_every_collection(tmp_path: Path) -> None:
    dtrain, dval = _split()
    callback = ttx.Callback(tmp_path, include_collections=ALL, save_config=EVERY_ROUND, shap_rows=1000)
    booster = xgb.train(PARAMS, dtrain, 4, evals=[(dval, "validation")], callbacks=[callback], verbose_eval=False)
    trial = tensortap.create_trial(tmp_path)
    for name in ("predictions", "labels", "full_shap", "trees/Gain", "average_shap/f0", "losses/validation-logloss"):
        assert trial.tensor(name).steps() == [0, 1, 2, 3], name
    importance = trial.tensor_names(collection="feature_importance")
    assert sorted(set().union(*(trial.tensor(n).steps() for n in importance))) == [0, 1, 2, 3]
    for s in range(4):
        score = booster[: s + 1].get_score(importance_type="gain")
        captured = {f: float(trial.tensor(f"feature_importance/gain/{f}").value(s)) for f in score}
        assert captured == pytest.approx(score, rel=1e-6), s
        expected = booster.predict(dval, iteration_range=(0, s + 1))
        np.testing.assert_array_equal(trial.tensor("predictions").value(s), expected)
    # the hyperparameters do not change during a training: saved once
    assert trial.tensor("hyperparameters/max_depth").steps() == [0]


def test_a_collection_config_overrides_the_explicit_save_config(tmp_path: Path) -> None:
    dtrain, dval = _split()
    callback = ttx.Callback(
        tmp_path / "a", include_collections=["losses", "predictions", "trees"], save_config=EVERY_ROUND,
        collection_configs={"trees": {"save_config": SaveConfig(save_interval=2)}},
    )  # fmt: skip
    xgb.train(PARAMS, dtrain, 4, evals=[(dval, "validation")], callbacks=[callback], verbose_eval=False)
    trial = tensortap.create_trial(tmp_path / "a")
    assert trial.tensor("predictions").steps() == [0, 1, 2, 3]
    assert trial.tensor("trees/Gain").steps() == [0, 2]
    # without save_config, a collection configured without one keeps its built-in interval (10 rounds)
    callback = ttx.Callback(
        tmp_path / "b", include_collections=["losses", "predictions"],
        collection_configs={"predictions": {"reduction_config": ReductionConfig(reductions=("mean",))}},
    )  # fmt: skip
    booster = xgb.train(PARAMS, dtrain, 4, evals=[(dval, "validation")], callbacks=[callback], verbose_eval=False)
    trial = tensortap.create_trial(tmp_path / "b")
    assert trial.tensor("losses/validation-logloss").steps() == [0, 1, 2, 3]
    assert trial.tensor("predictions").steps() == [0]
    mean = trial.tensor("predictions").reduction_value(0, "mean")
    assert mean == pytest.approx(float(np.mean(booster.predict(dval, iteration_range=(0, 1)))), rel=1e-6)


# ------------------------------------------------------ multi-target trees
def test_multi_output_tree_skips_trees_and_shap_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    Y = np.stack([X[:, 0] + X[:, 1], X[:, 2] - X[:, 3]], axis=1)
    dtrain, dval = xgb.DMatrix(X[:80], label=Y[:80]), xgb.DMatrix(X[80:], label=Y[80:])
    params = {"tree_method": "hist", "multi_strategy": "multi_output_tree", "max_depth": 2, "nthread": 1}
    result: dict[str, Any] = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            params, dtrain, 3, evals=[(dtrain, "train"), (dval, "validation")], evals_result=result,
            callbacks=[ttx.Callback(tmp_path, include_collections=ALL, save_config=EVERY_ROUND)], verbose_eval=False,
        )  # fmt: skip
    warnings = _warnings(caplog)
    skipped = ", ".join(MULTI_TARGET_UNSUPPORTED)  # and feature_importance where XGBoost < 3.0 would crash
    assert f"{skipped} not captured" in warnings[0] and "multi_output_tree" in warnings[0]
    # importance types XGBoost refuses for multi-target trees (3.0 and 3.1: gain and cover), one warning each
    refused = [w.split()[1] for w in warnings[1:] if "multi-target tree is not yet implemented" in w]
    assert len(warnings) == 1 + len(refused), warnings
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    assert _series(trial, "losses/validation-rmse") == result["validation"]["rmse"]
    assert _series(trial, "losses/train-rmse") == result["train"]["rmse"]
    np.testing.assert_array_equal(trial.tensor("predictions").value(2), booster.predict(dval))
    assert trial.tensor("predictions").shape(2) == (40, 2)
    np.testing.assert_array_equal(trial.tensor("labels").value(0), dval.get_label().reshape(40, 2))
    if "feature_importance" not in MULTI_TARGET_UNSUPPORTED and "feature_importance/gain" not in refused:
        gain = booster.get_score(importance_type="gain")
        assert {f: float(trial.tensor(f"feature_importance/gain/{f}").value(2)) for f in gain} == pytest.approx(gain)
    assert not trial.tensor_names(regex="^(trees/|full_shap|average_shap/)")
    assert {n.rsplit("/", 1)[0] for n in trial.tensor_names(regex="^feature_importance/")}.isdisjoint(refused)


def test_what_xgboost_cannot_compute_is_skipped_with_one_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dtrain, dval = _split()
    params = {"booster": "gblinear", "objective": "binary:logistic", "nthread": 1}
    result: dict[str, Any] = {}
    collections = ["losses", "feature_importance", "trees", "predictions"]
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            params, dtrain, 3, evals=[(dval, "validation")], evals_result=result, verbose_eval=False,
            callbacks=[ttx.Callback(tmp_path, include_collections=collections, save_config=EVERY_ROUND)],
        )  # fmt: skip
    warnings = _warnings(caplog)
    # gblinear has no trees, and only the "weight" importance: one warning naming them, in tensortap's words
    skipped = ", ".join(["trees", *(f"feature_importance/{k}" for k in ttx.IMPORTANCE_TYPES if k != "weight")])
    assert warnings == [
        f'tensortap: {skipped} not captured: a linear booster (booster="gblinear") has no trees and only the '
        '"weight" importance; the other collections are still captured'
    ]
    trial = tensortap.create_trial(tmp_path)
    assert _series(trial, "losses/validation-logloss") == result["validation"]["logloss"]
    weight = booster.get_score(importance_type="weight")
    names = sorted(f"feature_importance/weight/{f}" for f in weight)
    assert trial.tensor_names(collection="feature_importance") == names
    assert {f: float(trial.tensor(f"feature_importance/weight/{f}").value(2)) for f in weight} == pytest.approx(weight)
    np.testing.assert_array_equal(trial.tensor("predictions").value(2), booster.predict(dval))
    assert not trial.tensor_names(collection="trees")


# ------------------------------------------------------- trees and NaN
def test_exploding_tensor_ignores_the_nan_encoding_of_trees(tmp_path: Path) -> None:
    dtrain, dval = _split()
    callback = ttx.Callback(tmp_path, include_collections=["losses", "trees"], save_config=EVERY_ROUND)
    booster = xgb.train(PARAMS, dtrain, 3, evals=[(dval, "validation")], callbacks=[callback], verbose_eval=False)
    trial = tensortap.create_trial(tmp_path)
    frame = booster.trees_to_dataframe()
    assert frame["Yes"].isna().any() and frame["Split"].isna().any()  # XGBoost's encoding of leaves
    assert np.isnan(trial.tensor("trees/Yes").value(2)).sum() == frame["Yes"].isna().sum()
    assert invoke_rule(ExplodingTensor(trial)) == []
    assert invoke_rule(ExplodingTensor(trial, collection_names="trees")) == []
    # counting every NaN, as before, fires on the leaves
    assert invoke_rule(ExplodingTensor(trial, nan_encoded_regex=None)) == [0, 1, 2]


def test_exploding_tensor_fires_on_a_real_nan_in_the_trees(tmp_path: Path) -> None:
    dtrain, _ = _split()
    n = dtrain.num_row()

    def broken(predt: np.ndarray, data: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(n), np.full(n, np.nan)  # a NaN hessian: the leaf values and covers become NaN

    callback = ttx.Callback(tmp_path, include_collections=["trees"], save_config=EVERY_ROUND)
    params = {"nthread": 1, "max_depth": 2, "lambda": 0, "min_child_weight": 0}
    booster = xgb.train(params, dtrain, 2, obj=broken, callbacks=[callback], verbose_eval=False)
    assert booster.trees_to_dataframe()["Gain"].isna().any()
    trial = tensortap.create_trial(tmp_path)
    assert invoke_rule(ExplodingTensor(trial, collection_names="trees")) == [0, 1]
    assert "trees/Gain" in ExplodingTensor(trial).invoke(0).tensors


# ---------------------------------------------------- Overfit and set names
@pytest.mark.parametrize(
    ("train_name", "val_name"),
    [("train", "eval"), ("dtrain", "dtest"), ("Train", "Test"), ("Train", "Valid"), ("dtrain", "validation")],
)
def test_overfit_recognises_the_names_of_the_demos(tmp_path: Path, train_name: str, val_name: str) -> None:
    dtrain, dval = _split(flip=0.3)
    result: dict[str, Any] = {}
    # the demos list the validation set first: watchlist = [(dtest, "eval"), (dtrain, "train")]
    xgb.train(
        OVERFITTING, dtrain, 6, evals=[(dval, val_name), (dtrain, train_name)], evals_result=result,
        callbacks=[ttx.Callback(tmp_path)], verbose_eval=False,
    )  # fmt: skip
    expected = _overfit_steps(result[train_name]["logloss"], result[val_name]["logloss"])
    assert expected  # the model overfits
    rule = Overfit(tensortap.create_trial(tmp_path))
    assert invoke_rule(rule) == expected
    assert rule.missing_inputs == {}


def test_overfit_on_the_sklearn_api_knows_the_training_set_by_identity(tmp_path: Path) -> None:
    X, y = _data(flip=0.3)
    Xt, yt, Xv, yv = X[:120], y[:120], X[120:], y[120:]
    in_process = Overfit()
    clf = xgb.XGBClassifier(
        n_estimators=6, max_depth=6, learning_rate=1.0, n_jobs=1, eval_metric="logloss",
        callbacks=[ttx.Callback(tmp_path, rules=[in_process])],
    )  # fmt: skip
    clf.fit(Xt, yt, eval_set=[(Xt, yt), (Xv, yv)], verbose=False)
    trial = tensortap.create_trial(tmp_path)
    # validation_0 is the training data itself (the arrays given to fit), whatever its name says
    assert trial.tensor_names(collection="training_data") == ["losses/validation_0-logloss"]
    result = clf.evals_result()
    expected = _overfit_steps(result["validation_0"]["logloss"], result["validation_1"]["logloss"])
    assert expected
    assert invoke_rule(Overfit(trial)) == expected
    assert in_process.fired_steps == expected


def test_overfit_says_when_it_has_no_training_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    X, y = _data(flip=0.3)
    clf = xgb.XGBClassifier(n_estimators=3, n_jobs=1, eval_metric="logloss", callbacks=[ttx.Callback(tmp_path)])
    clf.fit(X[:120], y[:120], eval_set=[(X[120:], y[120:])], verbose=False)
    rule = Overfit(tensortap.create_trial(tmp_path))
    with pytest.raises(RuleInputsMissing, match="Overfit found none of its inputs") as raised:
        invoke_rule(rule)
    [message] = rule.missing_inputs
    assert "no training loss" in message and "losses/validation_0-logloss" in message
    assert raised.value.missing == {"Overfit": [message]}
    # the command line says so and exits 2
    assert main(["rules", str(tmp_path), "--rule", "overfit", "--json"]) == 2
    [report] = json.loads(capsys.readouterr().out)["rules"]
    assert report["status"] == "inputs_missing" and report["missing_inputs"] == [message]


def test_overfit_says_when_it_has_no_validation_loss(tmp_path: Path) -> None:
    dtrain, _ = _split()
    xgb.train(PARAMS, dtrain, 3, evals=[(dtrain, "dtrain")], callbacks=[ttx.Callback(tmp_path)], verbose_eval=False)
    rule = Overfit(tensortap.create_trial(tmp_path))
    with pytest.raises(RuleInputsMissing, match="no validation loss"):
        invoke_rule(rule)
    [message] = rule.missing_inputs
    assert "no validation loss" in message and "losses/dtrain-logloss" in message
    assert main(["rules", str(tmp_path), "--rule", "overfit"]) == 2


# ------------------------------------------------- callbacks that change the training
@pytest.mark.parametrize("ours_first", [True, False])
def test_learning_rate_scheduler_rates_land_on_the_rounds_they_train(tmp_path: Path, ours_first: bool) -> None:
    dtrain, dval = _split()
    rates = [0.5, 0.2, 0.2, 0.05]  # XGBoost sets rates[e] after round e: round e + 1 trains with it, 3 never
    scheduler = xgb.callback.LearningRateScheduler(lambda epoch: rates[epoch])
    callback = ttx.Callback(tmp_path, include_collections=["losses", "hyperparameters"])
    params = {**PARAMS, "eta": 0.3}
    booster = xgb.train(
        params, dtrain, 4, evals=[(dval, "validation")], verbose_eval=False,
        callbacks=[callback, scheduler] if ours_first else [scheduler, callback],
    )  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    eta = {s: float(v) for s, v in trial.tensor("hyperparameters/eta").values().items()}
    # saved at the first round, then where it changed
    assert eta == pytest.approx({0: 0.3, 1: 0.5, 2: 0.2})
    assert trial.tensor("hyperparameters/learning_rate").steps() == [0, 1, 2]
    assert trial.tensor("hyperparameters/max_depth").steps() == [0]
    # the same model, trained one round at a time with the rate the trial holds for that round
    rebuilt = None
    for s in range(4):
        rate = eta[max(step for step in eta if step <= s)]
        rebuilt = xgb.train({**params, "eta": rate}, dtrain, 1, xgb_model=rebuilt, verbose_eval=False)
    np.testing.assert_array_equal(rebuilt.predict(dval), booster.predict(dval))


class _SetDepth(xgb.callback.TrainingCallback):
    """One's own callback changing a parameter: ``max_depth`` becomes ``depth`` at round ``at``."""

    def __init__(self, at: int, depth: int, before: bool) -> None:
        super().__init__()
        self.at, self.depth, self.before = at, depth, before

    def before_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        if self.before and epoch == self.at:
            model.set_param({"max_depth": self.depth})
        return False

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        if not self.before and epoch == self.at - 1:
            model.set_param("max_depth", str(self.depth))
        return False


@pytest.mark.usefixtures("ordered_callbacks")
@pytest.mark.parametrize("before", [True, False], ids=["set-before-the-round", "set-after-the-round-before"])
def test_a_parameter_ones_own_callback_sets_lands_on_the_round_it_trains(tmp_path: Path, before: bool) -> None:
    dtrain, dval = _split()
    original = xgb.Booster.set_param
    callbacks = [_SetDepth(2, 1, before), ttx.Callback(tmp_path, include_collections=["hyperparameters"])]
    booster = xgb.train(PARAMS, dtrain, 4, callbacks=callbacks, verbose_eval=False)
    trial = tensortap.create_trial(tmp_path)
    depth = trial.tensor("hyperparameters/max_depth")
    assert {s: float(v) for s, v in depth.values().items()} == {0: 3.0, 2: 1.0}
    assert trial.tensor("hyperparameters/eta").steps() == [0]
    # the same model, trained with the depth the trial holds for each round
    rebuilt = xgb.train(PARAMS, dtrain, 2)
    rebuilt = xgb.train({**PARAMS, "max_depth": 1}, dtrain, 2, xgb_model=rebuilt)
    np.testing.assert_array_equal(rebuilt.predict(dval), booster.predict(dval))
    # the watch of set_param ends with the training
    assert xgb.Booster.set_param is original


# ----------------------------------------------------------- early stopping
@pytest.mark.usefixtures("ordered_callbacks")
@pytest.mark.parametrize("save_best", [False, True])
def test_a_callback_after_early_stopping_records_the_last_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, save_best: bool
) -> None:
    dtrain, dval = _split(flip=0.4)
    result: dict[str, Any] = {}
    stopping = xgb.callback.EarlyStopping(rounds=2, save_best=save_best)
    callback = ttx.Callback(tmp_path, include_collections=["losses", "predictions", "labels"], save_config=EVERY_ROUND)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            OVERFITTING, dtrain, 100, evals=[(dval, "validation")], evals_result=result,
            callbacks=[stopping, callback], verbose_eval=False,
        )  # fmt: skip
    rounds = len(result["validation"]["logloss"])
    assert rounds < 100
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(rounds))
    assert _series(trial, "losses/validation-logloss") == result["validation"]["logloss"]
    last = rounds - 1
    # the labels do not depend on the booster: captured at every round
    assert trial.tensor("labels").steps() == list(range(rounds))
    np.testing.assert_array_equal(trial.tensor("labels").value(last), dval.get_label())
    if save_best:  # the booster after training is the best round's: the last round's predictions are gone
        assert booster.num_boosted_rounds() == booster.best_iteration + 1 < rounds
        assert trial.tensor("predictions").steps() == list(range(last))
        [warning] = _warnings(caplog)
        assert f"round {last}: predictions not captured:" in warning
    else:
        assert booster.num_boosted_rounds() == rounds
        np.testing.assert_array_equal(trial.tensor("predictions").value(last), booster.predict(dval))
        assert _warnings(caplog) == []


def test_training_further_from_the_best_round_of_early_stopping(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # continuation.py: EarlyStopping(save_best=True) hands over the best round's booster, trained further
    dtrain, dval = _split(flip=0.4)
    params = {**OVERFITTING, "subsample": 0.7}  # the rounds trained again differ from the ones cut
    callback = ttx.Callback(tmp_path, include_collections=["losses"])
    first: dict[str, Any] = {}
    stopping = xgb.callback.EarlyStopping(rounds=2, save_best=True)
    booster = xgb.train(
        params, dtrain, 100, evals=[(dval, "validation")], evals_result=first, callbacks=[callback, stopping],
        verbose_eval=False,
    )  # fmt: skip
    trained, kept = len(first["validation"]["logloss"]), booster.num_boosted_rounds()
    assert kept < trained
    further: dict[str, Any] = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            params, dtrain, 6, evals=[(dval, "validation")], evals_result=further, xgb_model=booster,
            callbacks=[callback], verbose_eval=False,
        )  # fmt: skip
    # the trial holds the rounds cut, under the numbers the training further trains again: a new run (before,
    # those rounds of the training further were not captured, with a warning; hunt 31 M1)
    assert _warnings(caplog) == [
        f"tensortap: the booster continues from round {kept} of the run in {tmp_path}, which trained rounds up to "
        f"{trained - 1} (the booster is an earlier checkpoint of that run, or one EarlyStopping(save_best=True) cut "
        f"back): this training is written to {tmp_path / 'run-0'} as a new run, its steps numbered from round {kept} "
        "as XGBoost counts them"
    ]
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(trained))
    assert _series(trial, "losses/validation-logloss") == first["validation"]["logloss"]
    further_run = tensortap.create_trial(tmp_path / "run-0")
    assert further_run.steps() == list(range(kept, kept + 6))
    assert _series(further_run, "losses/validation-logloss") == further["validation"]["logloss"]


def test_cv_with_early_stopping_before_the_callback(tmp_path: Path) -> None:
    """As in XGBoost's cross_validation demo, with the tensortap callback appended to its list."""
    dtrain, _ = _split(flip=0.4)
    callbacks = [xgb.callback.EarlyStopping(rounds=2), ttx.Callback(tmp_path)]
    res = xgb.cv(OVERFITTING, dtrain, num_boost_round=100, nfold=3, seed=0, callbacks=callbacks, as_pandas=False)
    best = len(res["test-logloss-mean"])  # xgb.cv keeps the rounds up to the best one
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(best + 2))  # the rounds evaluated: two more than the best
    assert _series(trial, "losses/test-logloss")[:best] == res["test-logloss-mean"]
    assert _series(trial, "metrics/test-logloss-std")[:best] == res["test-logloss-std"]


@pytest.mark.parametrize(("estimator", "metric"), [("XGBClassifier", "logloss"), ("XGBRegressor", "rmse")])
def test_sklearn_early_stopping_rounds(tmp_path: Path, estimator: str, metric: str) -> None:
    X, y = _data(flip=0.4)
    model = getattr(xgb, estimator)(
        n_estimators=100, max_depth=6, learning_rate=1.0, n_jobs=1, eval_metric=metric, early_stopping_rounds=2,
        callbacks=[ttx.Callback(tmp_path, include_collections=["losses", "predictions"], save_config=EVERY_ROUND)],
    )  # fmt: skip
    Xt, yt, Xv, yv = X[:120], y[:120], X[120:], y[120:]
    model.fit(Xt, yt, eval_set=[(Xt, yt), (Xv, yv)], verbose=False)
    history = model.evals_result()["validation_1"][metric]  # the last set decides when to stop
    assert len(history) < 100 and model.best_iteration == len(history) - 3
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(len(history)))
    assert _series(trial, f"losses/validation_1-{metric}") == history
    assert _series(trial, f"losses/validation_0-{metric}") == model.evals_result()["validation_0"][metric]
    last = len(history) - 1
    expected = model.predict_proba(Xv)[:, 1] if estimator == "XGBClassifier" else model.predict(Xv)
    # predict() uses the best iteration; the last round's predictions are those of every round
    full = model.get_booster().predict(xgb.DMatrix(Xv), iteration_range=(0, last + 1))
    np.testing.assert_allclose(trial.tensor("predictions").value(last), full, rtol=1e-6)
    assert not np.array_equal(full, expected)


@pytest.mark.parametrize("stopping_first", [False, True])
def test_evaluation_sets_sharing_a_name(tmp_path: Path, caplog: pytest.LogCaptureFixture, stopping_first: bool) -> None:
    dtrain, dval = _split(flip=0.4)
    result: dict[str, Any] = {}
    callbacks = [ttx.Callback(tmp_path, include_collections=["losses"])]
    if stopping_first:  # the callback hears of the last round in after_training only
        callbacks.insert(0, xgb.callback.EarlyStopping(rounds=2))
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            OVERFITTING, dtrain, 20, evals=[(dtrain, "d"), (dval, "d")], evals_result=result, callbacks=callbacks,
            verbose_eval=False,
        )  # fmt: skip
    [warning] = _warnings(caplog)
    assert "share a name ('d')" in warning
    # XGBoost logs both sets under "d", one value after the other each round; the last is the validation set's
    logged = result["d"]["logloss"]
    rounds = booster.num_boosted_rounds()
    assert len(logged) == 2 * rounds and (rounds < 20) == stopping_first
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(rounds))
    assert _series(trial, "losses/d-logloss") == logged[1::2]


def test_a_custom_metric_named_like_a_built_in_one_is_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``custom_metric`` returning ``("logloss", ...)`` beside the built-in logloss: XGBoost logs both under one
    name, two values a round, and ``losses/d-logloss`` held the custom ones without a word (hunt 31 L1)."""
    dtrain, dval = _split()

    def logloss(predt: np.ndarray, data: Any) -> tuple[str, float]:
        return "logloss", float(np.mean(predt))  # not a logloss at all

    result: dict[str, Any] = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        xgb.train(
            PARAMS, dtrain, 3, evals=[(dval, "d")], custom_metric=logloss, evals_result=result,
            callbacks=[ttx.Callback(tmp_path, include_collections=["losses"])], verbose_eval=False,
        )  # fmt: skip
    logged = result["d"]["logloss"]
    assert len(logged) == 6  # built-in, custom, built-in, ...
    [warning] = _warnings(caplog)
    assert "'d-logloss' more than once a round" in warning and "custom metric" in warning, warning
    assert _series(tensortap.create_trial(tmp_path), "losses/d-logloss") == logged[1::2]


# ----------------------------------------------------------- sklearn
def test_sklearn_pipeline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _data()
    model = xgb.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1, callbacks=[ttx.Callback(tmp_path / "a")])
    pipe = Pipeline([("scale", StandardScaler()), ("xgb", model)])
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        pipe.fit(X, y)  # no evaluation set: XGBoost computes no loss, and the callback says so
    assert any("no evaluation set" in w for w in _warnings(caplog))
    trial = tensortap.create_trial(tmp_path / "a")
    assert trial.tensor("hyperparameters/max_depth").value(0) == 2
    # with an evaluation set, transformed as the pipeline transforms the training data
    model = xgb.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1, callbacks=[ttx.Callback(tmp_path / "b")])
    pipe = Pipeline([("scale", StandardScaler()), ("xgb", model)])
    scaler = StandardScaler().fit(X[:150])
    pipe.fit(X[:150], y[:150], xgb__eval_set=[(scaler.transform(X[150:]), y[150:])], xgb__verbose=False)
    trial = tensortap.create_trial(tmp_path / "b")
    assert _series(trial, "losses/validation_0-logloss") == pipe[-1].evals_result()["validation_0"]["logloss"]


def test_cross_val_score_and_grid_search_train_the_same_models(tmp_path: Path) -> None:
    """Capture changes no score, and with ``if_exists="new_run"`` every (cloned) fit keeps a run of its own."""
    from sklearn.model_selection import GridSearchCV, cross_val_score

    X, y = _data()

    def model(callbacks: list[Any] | None) -> Any:
        return xgb.XGBClassifier(n_estimators=3, max_depth=2, n_jobs=1, callbacks=callbacks)

    plain = cross_val_score(model(None), X, y, cv=3, error_score="raise")
    callback = ttx.Callback(tmp_path / "cv", if_exists="new_run")
    captured = cross_val_score(model([callback]), X, y, cv=3, error_score="raise")
    np.testing.assert_array_equal(captured, plain)
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == ["run-0", "run-1", "run-2"]
    for k in range(3):
        assert tensortap.create_trial(tmp_path / "cv" / f"run-{k}").tensor("hyperparameters/max_depth").value(0) == 2

    grid = {"max_depth": [1, 2]}
    plain_search = GridSearchCV(model(None), grid, cv=2, error_score="raise").fit(X, y)
    callback = ttx.Callback(tmp_path / "grid", if_exists="new_run")
    search = GridSearchCV(model([callback]), grid, cv=2, error_score="raise").fit(X, y)
    assert search.best_params_ == plain_search.best_params_
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], plain_search.cv_results_["mean_test_score"])
    depths = [
        int(tensortap.create_trial(tmp_path / "grid" / f"run-{k}").tensor("hyperparameters/max_depth").value(0))
        for k in range(5)  # 2 settings x 2 folds, and the refit of the best
    ]
    assert sorted(depths[:4]) == [1, 1, 2, 2] and depths[4] == search.best_params_["max_depth"]
    assert not (tmp_path / "grid" / "run-5").exists()


def test_model_selection_with_the_default_if_exists_trains_every_fit_and_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ``if_exists``, every fit after the first raised TrialExistsError inside XGBoost's fit (each is
    given a copy of the callback, which finds ``out_dir`` taken): ``cross_val_score`` scored those folds NaN
    (sklearn's default ``error_score``), GridSearchCV chose among the fits that had not failed and its refit
    raised. Now each later training goes to a run folder, with a warning naming it."""
    from sklearn.model_selection import GridSearchCV, cross_val_score

    X, y = _data()

    def model(callbacks: list[Any] | None) -> Any:
        return xgb.XGBClassifier(n_estimators=3, max_depth=2, n_jobs=1, callbacks=callbacks)

    plain = cross_val_score(model(None), X, y, cv=3, error_score="raise")
    captured = cross_val_score(model([ttx.Callback(tmp_path / "cv")]), X, y, cv=3)
    np.testing.assert_array_equal(captured, plain)
    first = tensortap.create_trial(tmp_path / "cv")  # the first fold
    assert first.steps() and first.tensor("hyperparameters/max_depth").value(0) == 2
    for k in range(2):
        assert tensortap.create_trial(tmp_path / "cv" / f"run-{k}").steps() == first.steps()
    moved = [w for w in _warnings(caplog) if "holds a training already" in w]
    assert len(moved) == 2 and str(tmp_path / "cv" / "run-1") in moved[1]

    grid = {"max_depth": [1, 2]}
    plain_search = GridSearchCV(model(None), grid, cv=2, error_score="raise").fit(X, y)
    search = GridSearchCV(model([ttx.Callback(tmp_path / "grid")]), grid, cv=2).fit(X, y)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], plain_search.cv_results_["mean_test_score"])
    assert sorted(p.name for p in (tmp_path / "grid").iterdir() if p.name.startswith("run-")) == [
        f"run-{k}"
        for k in range(4)  # 2 settings x 2 folds and the refit: the first in the folder itself
    ]
    with pytest.raises(tensortap.TrialExistsError):  # asked for: the error
        cross_val_score(model([ttx.Callback(tmp_path / "cv", if_exists="error")]), X, y, cv=2, error_score="raise")


# ------------------------------------------ custom objective, custom metric
def test_custom_objective_and_metric_of_the_rmsle_demo(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    X = rng.uniform(size=(150, 4))
    y = np.exp(X @ np.array([1.0, 2.0, 0.5, 0.0])) + rng.uniform(size=150)
    dtrain, dtest = xgb.DMatrix(X[:100], label=y[:100]), xgb.DMatrix(X[100:], label=y[100:])

    def squared_log(predt: np.ndarray, data: Any) -> tuple[np.ndarray, np.ndarray]:
        label = data.get_label()
        predt[predt < -1] = -1 + 1e-6
        grad = (np.log1p(predt) - np.log1p(label)) / (predt + 1)
        hess = (-np.log1p(predt) + np.log1p(label) + 1) / np.power(predt + 1, 2)
        return grad, hess

    def rmsle(predt: np.ndarray, data: Any) -> tuple[str, float]:
        label = data.get_label()
        predt[predt < -1] = -1 + 1e-6
        return "PyRMSLE", float(np.sqrt(np.mean(np.power(np.log1p(label) - np.log1p(predt), 2))))

    result: dict[str, Any] = {}
    xgb.train(
        {"tree_method": "hist", "seed": 0, "nthread": 1, "disable_default_eval_metric": 1}, dtrain, 5,
        obj=squared_log, custom_metric=rmsle, evals=[(dtrain, "dtrain"), (dtest, "dtest")], evals_result=result,
        callbacks=[ttx.Callback(tmp_path)], verbose_eval=False,
    )  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    # a custom metric is a metric: tensortap cannot know whether lower is better
    assert trial.tensor_names(collection="losses") == []
    assert _series(trial, "metrics/dtrain-PyRMSLE") == result["dtrain"]["PyRMSLE"]
    assert _series(trial, "metrics/dtest-PyRMSLE") == result["dtest"]["PyRMSLE"]
    # rules on losses take it by name
    expected = _overfit_steps(result["dtrain"]["PyRMSLE"], result["dtest"]["PyRMSLE"], threshold=0.0)
    assert invoke_rule(Overfit(trial, tensor_regex="PyRMSLE", ratio_threshold=0.0)) == expected


# ---------------------------------------------- feature names, multi-class
def test_feature_names_name_importance_shap_and_tree_features(tmp_path: Path) -> None:
    X, y = _data(features=4)
    names = ["age", "income", "height", "score"]
    dtrain = xgb.DMatrix(X[:150], label=y[:150], feature_names=names)
    dval = xgb.DMatrix(X[150:], label=y[150:], feature_names=names)
    callback = ttx.Callback(
        tmp_path, include_collections=["feature_importance", "average_shap", "trees"], save_config=EVERY_ROUND
    )
    booster = xgb.train(PARAMS, dtrain, 3, evals=[(dval, "validation")], callbacks=[callback], verbose_eval=False)
    trial = tensortap.create_trial(tmp_path)
    gain = booster.get_score(importance_type="gain")
    assert set(gain) <= set(names)
    assert {f: float(trial.tensor(f"feature_importance/gain/{f}").value(2)) for f in gain} == pytest.approx(gain)
    assert trial.tensor_names(collection="average_shap") == sorted(f"average_shap/{n}" for n in names)
    shap = booster.predict(dval, pred_contribs=True)
    for i, n in enumerate(names):
        assert float(trial.tensor(f"average_shap/{n}").value(2)) == pytest.approx(float(np.abs(shap[:, i]).mean()))
    features = trial.tensor("trees/Feature").value(2)
    assert [names[i] if i >= 0 else "Leaf" for i in features] == list(booster.trees_to_dataframe()["Feature"])


def test_categorical_splits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As in XGBoost's categorical demo: a pandas categorical column, enable_categorical=True."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"colour": pd.Categorical(rng.choice(list("abcd"), 200)), "x": rng.normal(size=200)})
    y = frame["colour"].isin(["a", "c"]).astype(float) + 0.1 * frame["x"]
    dtrain = xgb.DMatrix(frame[:150], label=y[:150], enable_categorical=True)
    dval = xgb.DMatrix(frame[150:], label=y[150:], enable_categorical=True)
    params = {"tree_method": "hist", "max_cat_to_onehot": 1, "max_depth": 2, "nthread": 1}
    callback = ttx.Callback(
        tmp_path, include_collections=["losses", "trees", "feature_importance"], save_config=EVERY_ROUND
    )
    result: dict[str, Any] = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            params,
            dtrain,
            3,
            evals=[(dval, "validation")],
            evals_result=result,
            callbacks=[callback],
            verbose_eval=False,
        )
    trees = booster.trees_to_dataframe()
    assert trees["Category"].map(lambda v: isinstance(v, list)).any()  # a categorical split
    assert _warnings(caplog) == ["tensortap: trees/Category not captured from round 0 on: not numeric "
                                 "(categorical splits hold lists)"]  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    assert _series(trial, "losses/validation-rmse") == result["validation"]["rmse"]
    np.testing.assert_array_equal(trial.tensor("trees/Gain").value(2), trees["Gain"].to_numpy())
    features = trial.tensor("trees/Feature").value(2)
    assert [["colour", "x"][i] if i >= 0 else "Leaf" for i in features] == list(trees["Feature"])
    assert "trees/Category" not in trial.tensor_names()
    # the NaN Split of a categorical split is an encoding too: ExplodingTensor stays quiet
    assert invoke_rule(ExplodingTensor(trial)) == []


def test_multiclass_softprob(tmp_path: Path) -> None:
    X, _ = _data(rows=240, features=4)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0).astype(int)
    dtrain, dval = xgb.DMatrix(X[:160], label=y[:160]), xgb.DMatrix(X[160:], label=y[160:])
    params = {"objective": "multi:softprob", "num_class": 3, "max_depth": 2, "nthread": 1,
              "eval_metric": ["mlogloss", "merror", "auc"]}  # fmt: skip
    result: dict[str, Any] = {}
    booster = xgb.train(
        params, dtrain, 3, evals=[(dtrain, "train"), (dval, "eval")], evals_result=result, verbose_eval=False,
        callbacks=[ttx.Callback(tmp_path, include_collections=["losses", "metrics", "predictions"])],
    )  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    for data in ("train", "eval"):
        for metric in ("mlogloss", "merror", "auc"):
            assert _series(trial, f"{ttx.metric_collection(metric)}/{data}-{metric}") == result[data][metric]
    assert trial.tensor("predictions").shape(0) == (80, 3)
    np.testing.assert_array_equal(trial.tensor("predictions").value(0), booster.predict(dval, iteration_range=(0, 1)))


def test_ranking_with_query_groups(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)
    qid = np.repeat(np.arange(12), 10)
    train, val = slice(0, 80), slice(80, 120)
    ranker = xgb.XGBRanker(
        n_estimators=3, max_depth=2, n_jobs=1, eval_metric=["ndcg@5", "ndcg"], callbacks=[ttx.Callback(tmp_path)]
    )
    ranker.fit(X[train], y[train], qid=qid[train], eval_set=[(X[val], y[val])], eval_qid=[qid[val]], verbose=False)
    trial = tensortap.create_trial(tmp_path)
    result = ranker.evals_result()["validation_0"]
    assert _series(trial, "metrics/validation_0-ndcg@5") == result["ndcg@5"]
    assert _series(trial, "metrics/validation_0-ndcg") == result["ndcg"]


# ------------------------------------------------------ labels of every kind
def test_survival_aft_labels_are_the_label_bounds(tmp_path: Path) -> None:
    # aft_survival_demo.py: no plain label, each row's time is an interval (upper bound inf: right-censored)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 4))
    lower = np.exp(X[:, 0] + 1)
    upper = np.where(rng.random(100) < 0.3, np.inf, lower * 1.2)
    dtrain, dvalid = xgb.DMatrix(X[:70]), xgb.DMatrix(X[70:])
    for dmatrix, rows in ((dtrain, slice(0, 70)), (dvalid, slice(70, 100))):
        dmatrix.set_float_info("label_lower_bound", lower[rows])
        dmatrix.set_float_info("label_upper_bound", upper[rows])
    params = {
        "objective": "survival:aft", "eval_metric": ["aft-nloglik", "interval-regression-accuracy"],
        "aft_loss_distribution": "normal", "aft_loss_distribution_scale": 1.2, "max_depth": 3, "nthread": 1,
    }  # fmt: skip
    result: dict[str, Any] = {}
    booster = xgb.train(
        params, dtrain, 3, evals=[(dtrain, "train"), (dvalid, "valid")], evals_result=result, verbose_eval=False,
        callbacks=[ttx.Callback(tmp_path, include_collections=["losses", "metrics", "labels", "predictions"])],
    )  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    assert _series(trial, "losses/valid-aft-nloglik") == result["valid"]["aft-nloglik"]
    accuracy = result["valid"]["interval-regression-accuracy"]
    assert _series(trial, "metrics/valid-interval-regression-accuracy") == accuracy
    np.testing.assert_array_equal(trial.tensor("predictions").value(0), booster.predict(dvalid, iteration_range=(0, 1)))
    bounds = np.stack([dvalid.get_float_info("label_lower_bound"), dvalid.get_float_info("label_upper_bound")], axis=1)
    np.testing.assert_array_equal(trial.tensor("labels").value(0), bounds)
    # the metric XGBoost reports, recomputed from the captured labels and predictions
    prediction, labels = trial.tensor("predictions").value(0), trial.tensor("labels").value(0)
    inside = (labels[:, 0] <= prediction) & (prediction <= labels[:, 1])
    assert float(np.mean(inside)) == pytest.approx(accuracy[0])


def test_a_set_without_labels_skips_them_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    X, y = _data()
    dtrain, dtest = xgb.DMatrix(X[:120], label=y[:120]), xgb.DMatrix(X[120:])

    def mean_prediction(predt: np.ndarray, data: Any) -> tuple[str, float]:
        return "mean-prediction", float(np.mean(predt))

    params = {"objective": "binary:logistic", "nthread": 1, "disable_default_eval_metric": 1}
    result: dict[str, Any] = {}
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        xgb.train(
            params, dtrain, 3, evals=[(dtrain, "train"), (dtest, "test")], custom_metric=mean_prediction,
            evals_result=result, verbose_eval=False,
            callbacks=[ttx.Callback(tmp_path, include_collections=["metrics", "labels", "predictions"],
                                    save_config=EVERY_ROUND)],
        )  # fmt: skip
    assert _warnings(caplog) == ["tensortap: labels not captured from round 0 on: ValueError: 'test' has no labels"]
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names(collection="labels") == []
    assert trial.tensor("predictions").steps() == [0, 1, 2]
    assert _series(trial, "metrics/test-mean-prediction") == result["test"]["mean-prediction"]


class Interrupt(xgb.callback.TrainingCallback):
    """A Ctrl-C (``KeyboardInterrupt``) in the round ``epoch`` of a training."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        if epoch == self.epoch:
            raise KeyboardInterrupt
        return False


def test_one_callback_in_two_trainings_at_once_refuses_the_second(tmp_path: Path) -> None:
    """Two threads training with one callback object: it holds one training's state, so the second is refused
    (before, both boosters' rounds went into one shard under the same steps, and the trial was unreadable)."""
    import threading

    dtrain, dval = _split()
    callback = ttx.Callback(tmp_path, save_config=EVERY_ROUND)
    started, refused = threading.Event(), threading.Event()

    class Hold(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            started.set()
            assert refused.wait(60)
            return False

    result: dict[str, Any] = {}

    def first() -> None:
        xgb.train(PARAMS, dtrain, 3, evals=[(dval, "validation")], evals_result=result, callbacks=[callback, Hold()])

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60)
    try:
        with pytest.raises(RuntimeError, match="captures a training that runs now in another thread"):
            xgb.train(PARAMS, dtrain, 3, callbacks=[callback])
    finally:
        refused.set()
        thread.join()
    assert _series(tensortap.create_trial(tmp_path), "losses/validation-logloss") == result["validation"]["logloss"]
    xgb.train(PARAMS, dtrain, 2, evals=[(dval, "validation")], callbacks=[callback])  # one after the other: run-0
    assert tensortap.create_trial(tmp_path / "run-0").steps() == [0, 1]


def test_a_training_ended_by_an_interrupt_is_closed_by_the_next_one(tmp_path: Path) -> None:
    """A Ctrl-C (a notebook's "interrupt") ends xgb.train without after_training: its trial stayed open while
    the process lived (a live reader waited for more, rules --follow never ended), also after the cell was
    run again, whose training went to run-0. The next training with the callback closes it."""

    dtrain, dval = _split()
    callback = ttx.Callback(tmp_path / "t", save_config=EVERY_ROUND, include_collections=["losses"])
    evals = [(dtrain, "train"), (dval, "validation")]
    with pytest.raises(KeyboardInterrupt):
        xgb.train(PARAMS, dtrain, 10, evals=evals, callbacks=[callback, Interrupt(3)], verbose_eval=False)
    assert not tensortap.create_trial(tmp_path / "t").training_ended  # as long as nothing else happens
    log: dict[str, Any] = {}
    xgb.train(PARAMS, dtrain, 5, evals=evals, callbacks=[callback], evals_result=log, verbose_eval=False)
    first = tensortap.create_trial(tmp_path / "t")
    assert first.training_ended and first.end_reasons() == {"worker_0": "exception"}
    assert first.steps() == [0, 1, 2, 3]  # round 3 was trained and captured before the interrupt
    again = tensortap.create_trial(tmp_path / "t" / "run-0")
    assert again.end_reasons() == {"worker_0": "closed"}
    assert _series(again, "losses/validation-logloss") == pytest.approx(log["validation"]["logloss"])


@pytest.mark.parametrize("copied", [False, True], ids=["same-callback", "deepcopy"])
def test_after_an_interrupted_training_a_training_in_a_thread_is_not_refused(tmp_path: Path, copied: bool) -> None:
    """XGBoost calls no after_training after an exception: before, the next training in another thread, with
    the callback or a copy of it (``sklearn.base.clone`` deep-copies it), was refused with a RuntimeError, as
    if the interrupted training still ran there (hunt 31 M2)."""
    import copy
    import threading

    dtrain, dval = _split()
    callback = ttx.Callback(tmp_path / "t", include_collections=["losses"])
    evals = [(dval, "validation")]
    with pytest.raises(KeyboardInterrupt):
        xgb.train(PARAMS, dtrain, 5, evals=evals, callbacks=[callback, Interrupt(1)], verbose_eval=False)
    next_callback = copy.deepcopy(callback) if copied else callback
    log: dict[str, Any] = {}
    errors: list[BaseException] = []

    def train() -> None:
        try:
            xgb.train(PARAMS, dtrain, 3, evals=evals, callbacks=[next_callback], evals_result=log, verbose_eval=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert errors == []
    run = tensortap.create_trial(tmp_path / "t" / "run-0")
    assert run.steps() == [0, 1, 2] and run.training_ended
    assert _series(run, "losses/validation-logloss") == log["validation"]["logloss"]
    # the same callback closed the interrupted training; a copy holds none of it
    assert tensortap.create_trial(tmp_path / "t").training_ended is not copied
