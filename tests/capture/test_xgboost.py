"""The XGBoost adapter, on real (tiny) XGBoost training: what it captures equals what XGBoost reports."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

xgb = pytest.importorskip("xgboost")
pytest.importorskip("sklearn")

import tensortap  # noqa: E402
import tensortap.xgboost as ttx  # noqa: E402
from tensortap import SaveConfig  # noqa: E402

pytestmark = pytest.mark.xgboost

ALL = [
    "metrics", "losses", "feature_importance", "predictions", "labels", "hyperparameters",
    "average_shap", "full_shap", "trees",
]  # fmt: skip
EVERY_ROUND = {name: {"save_config": SaveConfig(save_interval=1)} for name in ALL}
PARAMS = {
    "objective": "binary:logistic",
    "max_depth": 3,
    "eta": 0.3,
    "nthread": 1,
    "eval_metric": ["logloss", "auc", "error"],
}


def _data(rows: int = 300, features: int = 6, seed: int = 0, flip: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    return make_classification(rows, features, n_informative=3, n_redundant=0, flip_y=flip, random_state=seed)


@pytest.fixture(scope="module")
def dmatrices() -> tuple[Any, Any]:
    X, y = _data()
    return xgb.DMatrix(X[:200], label=y[:200]), xgb.DMatrix(X[200:], label=y[200:])


def _train(out_dir: Path, dtrain: Any, dval: Any, rounds: int = 10, **cb_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    result: dict[str, Any] = {}
    booster = xgb.train(
        PARAMS, dtrain, num_boost_round=rounds, evals=[(dtrain, "train"), (dval, "validation")],
        callbacks=[ttx.Callback(out_dir, **cb_kwargs)], evals_result=result, verbose_eval=False,
    )  # fmt: skip
    return booster, result


def test_every_round_metrics_and_losses_equal_evals_result(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    _, result = _train(tmp_path, *dmatrices, save_config=SaveConfig(save_interval=1))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(10))
    assert trial.workers() == ["worker_0"] and trial.training_ended
    assert trial.tensor_names(collection="losses") == [
        "losses/train-error", "losses/train-logloss", "losses/validation-error", "losses/validation-logloss",
    ]  # fmt: skip
    assert trial.tensor_names(collection="metrics") == ["metrics/train-auc", "metrics/validation-auc"]
    for data, metrics in result.items():
        for metric, history in metrics.items():
            name = f"{ttx.metric_collection(metric)}/{data}-{metric}"
            values = trial.tensor(name).values()
            assert [float(values[s]) for s in range(10)] == history, name


def test_default_intervals(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    assert ttx.Hook.default_interval == 1
    assert ttx.Hook.default_collections == ("metrics", "losses", "hyperparameters")
    intervals = {n: c["save_config"].save_interval for n, c in ttx.Hook.collection_defaults.items()}
    assert intervals == {
        "feature_importance": 10, "predictions": 10, "labels": 10,
        "average_shap": 50, "full_shap": 50, "trees": 50,
    }  # fmt: skip
    _train(tmp_path / "default", *dmatrices, rounds=21)
    trial = tensortap.create_trial(tmp_path / "default")
    assert trial.tensor("losses/validation-logloss").steps() == list(range(21))
    assert trial.tensor("metrics/validation-auc").steps() == list(range(21))
    assert trial.tensor("hyperparameters/max_depth").steps() == [0]
    assert trial.tensor_names(regex="^(?!losses/|metrics/|hyperparameters/)") == []
    _train(tmp_path / "all", *dmatrices, rounds=21, include_collections=ALL)
    trial = tensortap.create_trial(tmp_path / "all")
    importance = trial.tensor_names(collection="feature_importance")
    assert sorted(set().union(*(trial.tensor(n).steps() for n in importance))) == [0, 10, 20]
    for name, steps in {"predictions": [0, 10, 20], "labels": [0, 10, 20], "full_shap": [0], "trees/Gain": [0]}.items():
        assert trial.tensor(name).steps() == steps, name
    assert trial.tensor("average_shap/f0").steps() == [0]


def test_predictions_labels_shap_and_importance_equal_xgboost(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    dtrain, dval = dmatrices
    booster, _ = _train(tmp_path, dtrain, dval, include_collections=ALL, collection_configs=EVERY_ROUND, shap_rows=1000)
    trial = tensortap.create_trial(tmp_path)
    features = [f"f{i}" for i in range(6)]
    for s in range(10):
        rounds = (0, s + 1)
        np.testing.assert_array_equal(
            trial.tensor("predictions").value(s), booster.predict(dval, iteration_range=rounds)
        )
        np.testing.assert_array_equal(trial.tensor("labels").value(s), dval.get_label())
        shap = booster.predict(dval, pred_contribs=True, iteration_range=rounds)
        full = trial.tensor("full_shap").value(s)
        assert full.shape == (100, 7)
        np.testing.assert_array_equal(full, shap)
        average = np.array([trial.tensor(f"average_shap/{f}").value(s) for f in features])
        np.testing.assert_allclose(average, np.abs(shap[:, :-1]).mean(axis=0), rtol=1e-12)
        partial = booster[: s + 1]
        for kind in ttx.IMPORTANCE_TYPES:
            score = partial.get_score(importance_type=kind)
            captured = {
                n.rsplit("/", 1)[1]: float(trial.tensor(n).value(s))
                for n in trial.tensor_names(regex=f"^feature_importance/{kind}/", step=s)
            }
            assert captured == pytest.approx(score, rel=1e-6), (kind, s)
    final = {
        n.rsplit("/", 1)[1]: float(trial.tensor(n).value(9))
        for n in trial.tensor_names(regex="^feature_importance/gain/")
    }
    assert final == booster.get_score(importance_type="gain")


def _intercept(booster: Any) -> np.ndarray:
    """The model's ``base_score`` as XGBoost reports it after training (one number per class or target)."""
    text = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
    return np.array([float(x) for x in text.strip("[]").split(",")])


def test_hyperparameters_read_back(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    booster, _ = _train(tmp_path, *dmatrices, include_collections=["hyperparameters"])
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0]
    assert trial.tensor("hyperparameters/max_depth").value(0) == 3
    assert np.float32(trial.tensor("hyperparameters/eta").value(0)) == np.float32(0.3)
    assert trial.tensor("hyperparameters/nthread").value(0) == 1
    assert "hyperparameters/objective" not in trial.tensor_names()  # strings live in the worker record
    params = json.loads((tmp_path / "workers" / "worker_0.json").read_text())["hyperparameters"]
    assert params["objective"] == "binary:logistic"
    assert params["eval_metric"] == "logloss,auc,error"
    assert params["max_depth"] == "3"
    # XGBoost 3 writes the intercept as a list, "[5E-1]": it was left out without a word (session 50's hunt 24, F3);
    # the record holds it as training starts, the placeholder 0.5 that the first round replaces (boost_from_average)
    assert params["base_score"] == "[5E-1]"
    assert trial.tensor("hyperparameters/base_score").value(0) == _intercept(booster)[0] != 0.5


@pytest.mark.parametrize("api", ["train", "sklearn"])
def test_integer_parameters_read_back_exactly(api: str, tmp_path: Path) -> None:
    """Every parameter was saved as float64: a seed of 2**62 + 1 read back as 2**62 (hunt 21). XGBoost's
    configuration gives each parameter as a string, a float parameter of an integral value too (``"lambda":
    "1"``): its integer parameters, known by name, are int64 (uint64 above that range), the others float64."""
    seed, callback = 2**62 + 1, ttx.Callback(tmp_path, include_collections=["hyperparameters"])
    X, y = _data()
    if api == "train":
        params = {**PARAMS, "seed": seed, "lambda": 1, "max_bin": 64}
        xgb.train(params, xgb.DMatrix(X, label=y), 2, callbacks=[callback])
    else:
        model = xgb.XGBClassifier(n_estimators=2, max_depth=3, random_state=seed, reg_lambda=1, callbacks=[callback])
        model.fit(X, y)
    trial = tensortap.create_trial(tmp_path)
    saved = {n.split("/", 1)[1]: trial.tensor(n).value(0) for n in trial.tensor_names()}
    assert int(saved["seed"]) == int(saved["random_state"]) == seed and int(saved["max_depth"]) == 3
    assert saved["lambda"].dtype == np.float64 and saved["lambda"] == 1  # a float parameter given as an int
    assert saved["eta"].dtype == np.float64
    from tensortap.capture.xgboost.model import INTEGER_PARAMETERS

    texts = json.loads((tmp_path / "workers" / "worker_0.json").read_text())["hyperparameters"]
    integers = {name: int(text) for name, text in texts.items() if name in INTEGER_PARAMETERS}
    assert {"seed", "random_state", "max_depth", "nthread", "num_feature"} <= integers.keys()
    for name, value in integers.items():
        assert saved[name].dtype == (np.int64 if value < 2**63 else np.uint64) and int(saved[name]) == value, name
    assert all(saved[name].dtype == np.float64 for name in saved.keys() - integers.keys())


def test_a_list_of_numbers_among_the_parameters_is_saved_as_an_array(tmp_path: Path) -> None:
    """A multi-class booster's intercept, one number per class in XGBoost 3 (``"[2.5E-1,...]"``), is an array."""
    X, y = _data(rows=120, features=3)
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0).astype(int)  # four classes
    params = {"objective": "multi:softprob", "num_class": 4, "max_depth": 2, "nthread": 1}
    callback = ttx.Callback(tmp_path, include_collections=["hyperparameters"])
    booster = xgb.train(params, xgb.DMatrix(X, label=y), 2, callbacks=[callback])
    expected = _intercept(booster)
    assert expected.shape == (4,)  # one intercept per class
    got = tensortap.create_trial(tmp_path).tensor("hyperparameters/base_score").value(0)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("targets", [1, 2])
def test_base_score_is_the_intercept_the_model_trains_with(tmp_path: Path, targets: int) -> None:
    """XGBoost estimates ``base_score`` (the labels' mean, one per target) at the first update, after the callback
    read the configuration: the trial held the placeholder 0.5, and a continuation "changed" it to the model's
    (hunt 31 M4). Step 0 holds the intercept round 0 trained with, and so does the continuation's first step."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 3))
    y = 100.0 + 10.0 * np.arange(targets) + X @ rng.normal(size=(3, targets))
    dtrain = xgb.DMatrix(X, label=y if targets > 1 else y[:, 0])
    params = {"max_depth": 2, "nthread": 1}
    callback = ttx.Callback(tmp_path, include_collections=["hyperparameters"])
    booster = xgb.train(params, dtrain, 2, callbacks=[callback])
    intercept = _intercept(booster)
    np.testing.assert_allclose(intercept, y.mean(axis=0), rtol=1e-5)
    xgb.train(params, dtrain, 2, callbacks=[callback], xgb_model=booster)
    values = tensortap.create_trial(tmp_path).tensor("hyperparameters/base_score").values()
    assert sorted(values) == [0, 2]  # once per training call
    for value in values.values():
        np.testing.assert_array_equal(value, intercept if targets > 1 else intercept[0])


def test_shap_row_sample_and_multiclass_shapes(tmp_path: Path) -> None:
    X, y = _data(rows=400, features=5)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0).astype(int)  # three classes
    dtrain, dval = xgb.DMatrix(X[:200], label=y[:200]), xgb.DMatrix(X[200:], label=y[200:])
    params = {"objective": "multi:softprob", "num_class": 3, "max_depth": 2, "nthread": 1}
    callback = ttx.Callback(tmp_path, include_collections=["average_shap", "full_shap", "predictions"], shap_rows=40)
    booster = xgb.train(params, dtrain, 3, evals=[(dval, "validation")], verbose_eval=False, callbacks=[callback])
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor("full_shap").shape(0) == (40, 3, 6)
    assert trial.tensor_names(collection="average_shap") == [f"average_shap/f{i}" for i in range(5)]
    np.testing.assert_array_equal(trial.tensor("predictions").value(0), booster.predict(dval, iteration_range=(0, 1)))
    # the sampled rows are real rows of the evaluation set: their SHAP values sum to the margin
    margins = booster.predict(dval, output_margin=True, iteration_range=(0, 1))
    sums = trial.tensor("full_shap").value(0).sum(axis=-1)
    assert all(np.isclose(margins, row, atol=1e-5).all(axis=1).any() for row in sums)


def test_trees_are_the_numeric_columns_of_trees_to_dataframe(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    booster, _ = _train(tmp_path, *dmatrices, rounds=4, include_collections=["trees"], collection_configs=EVERY_ROUND)
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names(collection="trees") == [
        f"trees/{c}" for c in ("Category", "Cover", "Feature", "Gain", "Missing", "No", "Node", "Split", "Tree", "Yes")
    ]
    frame = booster.trees_to_dataframe()
    np.testing.assert_array_equal(trial.tensor("trees/Tree").value(3), frame["Tree"].to_numpy())
    np.testing.assert_array_equal(trial.tensor("trees/Gain").value(3), frame["Gain"].to_numpy())
    features = trial.tensor("trees/Feature").value(3)
    assert [f"f{i}" if i >= 0 else "Leaf" for i in features] == list(frame["Feature"])
    yes = trial.tensor("trees/Yes").value(3)
    expected = [float("nan") if isinstance(v, float) else float(v.split("-")[1]) for v in frame["Yes"]]
    np.testing.assert_array_equal(yes, np.array(expected))
    assert len(trial.tensor("trees/Tree").value(0)) == len(booster[:1].trees_to_dataframe())


def test_sklearn_api(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    X, y = _data(rows=400)
    Xv, yv = X[300:], y[300:]
    clf = xgb.XGBClassifier(
        n_estimators=6, max_depth=2, n_jobs=1, eval_metric="logloss",
        callbacks=[ttx.Callback(tmp_path, include_collections=[*ALL], collection_configs=EVERY_ROUND, shap_rows=50)],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        clf.fit(X[:300], y[:300], eval_set=[(Xv, yv)], verbose=False)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(6))
    values = trial.tensor("losses/validation_0-logloss").values()
    assert [float(values[s]) for s in range(6)] == clf.evals_result()["validation_0"]["logloss"]
    for s in range(6):
        np.testing.assert_allclose(
            trial.tensor("predictions").value(s), clf.predict_proba(Xv, iteration_range=(0, s + 1))[:, 1], rtol=1e-6
        )
    np.testing.assert_array_equal(trial.tensor("labels").value(0), yv)
    # the sklearn API evaluates on a QuantileDMatrix, which cannot be sliced: SHAP uses every row, and says so
    assert trial.tensor("full_shap").shape(0) == (100, 7)
    assert "cannot be sliced" in caplog.text


def test_xgboost_early_stopping_ends_the_trial_at_its_round(tmp_path: Path) -> None:
    X, y = _data(rows=300, flip=0.4, seed=1)
    dtrain, dval = xgb.DMatrix(X[:150], label=y[:150]), xgb.DMatrix(X[150:], label=y[150:])
    booster = xgb.train(
        {**PARAMS, "eta": 1.0, "max_depth": 6, "eval_metric": "logloss"}, dtrain, 200, evals=[(dval, "validation")],
        early_stopping_rounds=3, callbacks=[ttx.Callback(tmp_path)], verbose_eval=False,
    )  # fmt: skip
    rounds = booster.num_boosted_rounds()
    assert rounds < 200 and rounds == booster.best_iteration + 4
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(rounds))
    assert trial.end_reasons() == {"worker_0": "closed"}


class _RequestStopAt(xgb.callback.TrainingCallback):
    """Writes a stop request into the trial, as an out-of-process rule runner would."""

    def __init__(self, out_dir: Path, round_: int) -> None:
        super().__init__()
        self.out_dir, self.round, self.time, self.last = out_dir, round_, 0.0, 0.0

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        self.last = time.monotonic()  # the time of the last round
        if epoch == self.round:
            tensortap.create_trial(self.out_dir).request_stop("test", rule="none")
            self.time = time.monotonic()
        return False


@pytest.mark.usefixtures("ordered_callbacks")
def test_stop_request_ends_training_at_the_next_poll(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    dtrain, _ = dmatrices
    requester = _RequestStopAt(tmp_path, 3)
    callbacks = [requester, ttx.Callback(tmp_path, stop_poll_seconds=0.0)]
    booster = xgb.train(PARAMS, dtrain, 50, evals=[(dtrain, "train")], callbacks=callbacks, verbose_eval=False)
    assert booster.num_boosted_rounds() == 4
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    assert trial.end_reasons() == {"worker_0": "stop_request"}


@pytest.mark.usefixtures("ordered_callbacks")
def test_a_stop_request_left_in_the_trial_does_not_stop_the_training_further(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A request written after a training ended stopped the next training of the run (``xgb_model=``) after its
    first round, and no stop ever logged anything (hunt 31 M5). The left request is ignored, with one warning
    naming it; a request written during the training ends it, as the other adapters log it."""
    dtrain, _ = dmatrices
    callback = ttx.Callback(tmp_path, stop_poll_seconds=0.0, include_collections=["losses"])
    booster = xgb.train(PARAMS, dtrain, 3, evals=[(dtrain, "train")], callbacks=[callback], verbose_eval=False)
    tensortap.create_trial(tmp_path).request_stop("after the end", rule="none")
    with caplog.at_level(logging.INFO, logger="tensortap"):
        booster = xgb.train(
            PARAMS, dtrain, 3, evals=[(dtrain, "train")], callbacks=[callback], xgb_model=booster, verbose_eval=False
        )
    assert booster.num_boosted_rounds() == 6
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "stop request" in warning and "after the end" in warning and "left by the run before" in warning
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(6)) and trial.end_reasons() == {"worker_0": "closed"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tensortap"):
        booster = xgb.train(
            PARAMS, dtrain, 5, evals=[(dtrain, "train")], callbacks=[_RequestStopAt(tmp_path, 1), callback],
            xgb_model=booster, verbose_eval=False,
        )  # fmt: skip
    assert booster.num_boosted_rounds() == 8
    assert "tensortap: stop requested (test); stopping training" in [r.getMessage() for r in caplog.records]
    assert tensortap.create_trial(tmp_path).end_reasons() == {"worker_0": "stop_request"}


def test_stop_request_with_the_default_poll_of_one_second(tmp_path: Path) -> None:
    X, y = _data(rows=60, features=3)
    dtrain = xgb.DMatrix(X, label=y)
    requester = _RequestStopAt(tmp_path / "t", 3)
    callback = ttx.Callback(tmp_path / "t", save_config=SaveConfig(save_interval=100))
    assert ttx.Hook.stop_poll_seconds == 1.0
    booster = xgb.train(
        {**PARAMS, "max_depth": 1}, dtrain, 1_000_000, callbacks=[requester, callback], verbose_eval=False
    )
    assert 4 <= booster.num_boosted_rounds() < 1_000_000
    # the first poll more than a second after the previous one sees the request
    assert requester.last - requester.time < 1.5, requester.last - requester.time
    assert tensortap.create_trial(tmp_path / "t").end_reasons() == {"worker_0": "stop_request"}


def test_training_further_continues_the_steps(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    dtrain, dval = dmatrices
    callback = ttx.Callback(tmp_path, include_collections=["losses", "predictions"], collection_configs=EVERY_ROUND)
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    booster = xgb.train(
        PARAMS, dtrain, 4, evals=[(dval, "validation")], callbacks=[callback], evals_result=first, verbose_eval=False
    )
    booster = xgb.train(
        PARAMS, dtrain, 3, evals=[(dval, "validation")], callbacks=[callback], evals_result=second, verbose_eval=False,
        xgb_model=booster,
    )  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(7))
    values = trial.tensor("losses/validation-logloss").values()
    assert [float(values[s]) for s in range(7)] == first["validation"]["logloss"] + second["validation"]["logloss"]
    np.testing.assert_array_equal(trial.tensor("predictions").value(6), booster.predict(dval))
    assert trial.training_ended


def test_copies_of_a_callback_training_its_booster_further_are_runs_of_their_own(
    tmp_path: Path, dmatrices: tuple[Any, Any]
) -> None:
    """Two deep copies of a callback (``sklearn.base.clone`` makes them) both training the run's booster further
    went on in the run, and both wrote its steps 4 and 5 (review of session 54): a copy carries no run."""
    dtrain, dval = dmatrices
    callback = ttx.Callback(tmp_path, include_collections=["losses"], collection_configs=EVERY_ROUND)
    booster = xgb.train(PARAMS, dtrain, 4, evals=[(dval, "validation")], callbacks=[callback], verbose_eval=False)
    for twin in (copy.deepcopy(callback), copy.deepcopy(callback)):
        xgb.train(
            PARAMS, dtrain, 2, evals=[(dval, "validation")], callbacks=[twin], xgb_model=booster, verbose_eval=False
        )
    assert tensortap.create_trial(tmp_path).steps() == [0, 1, 2, 3]
    for run in ("run-0", "run-1"):
        assert tensortap.create_trial(tmp_path / run).steps() == [4, 5]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tensortap" and r.levelno == logging.WARNING]


def _series(trial: Any, name: str) -> dict[int, float]:
    return {s: float(v) for s, v in trial.tensor(name).values().items()}


@pytest.mark.parametrize("other", ["saved-model", "another-callbacks-booster"])
def test_training_further_a_booster_unrelated_to_the_run_starts_a_run_of_its_own(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture, other: str
) -> None:
    """Before, any booster with rounds was taken for the callback's last run going on: an unrelated model
    (``xgb_model="other.json"``) was merged into the first trial, steps [0, 1, 2, 5, 6], without a word
    (hunt 31 H1). Only the booster the run left (marked ``tensortap_run``) goes on with it."""
    from sklearn.datasets import make_regression

    dtrain, dval = dmatrices
    callback = ttx.Callback(tmp_path / "t", include_collections=["losses", "hyperparameters"])
    first: dict[str, Any] = {}
    evals = [(dval, "validation")]
    xgb.train(PARAMS, dtrain, 3, evals=evals, callbacks=[callback], evals_result=first, verbose_eval=False)
    X, y = make_regression(120, 4, random_state=0)
    dreg = xgb.DMatrix(X, label=y)
    regression = {"objective": "reg:squarederror", "max_depth": 2, "nthread": 1}
    unrelated = xgb.train(
        regression, dreg, 5, callbacks=[ttx.Callback(tmp_path / "other")] if other != "saved-model" else None
    )
    unrelated.save_model(tmp_path / "other.json")
    further: dict[str, Any] = {}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            regression, dreg, 2, evals=[(dreg, "train")], callbacks=[callback], evals_result=further,
            verbose_eval=False, xgb_model=str(tmp_path / "other.json") if other == "saved-model" else unrelated,
        )  # fmt: skip
    trial = tensortap.create_trial(tmp_path / "t")  # untouched
    assert trial.steps() == [0, 1, 2] and trial.training_ended
    assert list(_series(trial, "losses/validation-logloss").values()) == first["validation"]["logloss"]
    assert not trial.tensor_names(regex="rmse")
    run = tensortap.create_trial(tmp_path / "t" / "run-0")
    assert run.steps() == [5, 6]  # numbered from the booster's rounds, as XGBoost counts
    assert _series(run, "losses/train-rmse") == dict(zip([5, 6], further["train"]["rmse"], strict=True))
    [moved] = _warnings(caplog)
    assert "holds a training already" in moved and str(tmp_path / "t" / "run-0") in moved
    assert booster.attr("tensortap_run") == callback.hook.run_id != unrelated.attr("tensortap_run")


def test_training_further_an_earlier_checkpoint_of_the_run_starts_a_run_of_its_own(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A booster trained further twice from one checkpoint (XGBoost's continuation demo, with another eta the
    second time). Before, the second training was not captured at all, and the only warning blamed
    EarlyStopping(save_best=True), which was not used (hunt 31 M1)."""
    dtrain, dval = dmatrices
    callback = ttx.Callback(tmp_path / "t", include_collections=["losses", "hyperparameters"])
    evals = [(dval, "validation")]
    logs: list[dict[str, Any]] = [{}, {}, {}]
    booster = xgb.train(PARAMS, dtrain, 4, evals=evals, callbacks=[callback], evals_result=logs[0], verbose_eval=False)
    checkpoint = booster.copy()
    booster.save_model(tmp_path / "b.json")
    # a saved model of the run goes on in its trial
    xgb.train(
        PARAMS, dtrain, 3, evals=evals, callbacks=[callback], evals_result=logs[1], verbose_eval=False,
        xgb_model=str(tmp_path / "b.json"),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        xgb.train(
            {**PARAMS, "eta": 0.01}, dtrain, 3, evals=evals, callbacks=[callback], evals_result=logs[2],
            xgb_model=checkpoint, verbose_eval=False,
        )  # fmt: skip
    assert _warnings(caplog) == [
        f"tensortap: the booster continues from round 4 of the run in {tmp_path / 't'}, which trained rounds up to 6 "
        "(the booster is an earlier checkpoint of that run, or one EarlyStopping(save_best=True) cut back): this "
        f"training is written to {tmp_path / 't' / 'run-0'} as a new run, its steps numbered from round 4 as "
        "XGBoost counts them"
    ]
    trial = tensortap.create_trial(tmp_path / "t")
    assert trial.steps() == list(range(7))
    expected = logs[0]["validation"]["logloss"] + logs[1]["validation"]["logloss"]
    assert list(_series(trial, "losses/validation-logloss").values()) == expected
    assert list(_series(trial, "hyperparameters/eta").values()) == [pytest.approx(0.3)] * 2  # at each training
    branch = tensortap.create_trial(tmp_path / "t" / "run-0")
    assert branch.steps() == [4, 5, 6]
    assert list(_series(branch, "losses/validation-logloss").values()) == logs[2]["validation"]["logloss"]
    assert _series(branch, "hyperparameters/eta") == {4: pytest.approx(0.01)}


def test_cv_captures_mean_and_std_of_the_folds(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    dtrain, _ = dmatrices
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        result = xgb.cv(PARAMS, dtrain, num_boost_round=4, nfold=3, callbacks=[ttx.Callback(tmp_path)], as_pandas=False)
    # the default hyperparameters were left out without a word (session 50's hunt 24, F4)
    assert [r.getMessage() for r in caplog.records] == [
        "tensortap: hyperparameters not captured from xgb.cv: each fold has its own booster, and only the evaluation "
        "log (losses, metrics) is shared"
    ]
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(4))
    for key in ("test-logloss", "train-error"):
        # the spread over the folds is a metric, not a loss
        for stat, name in (("mean", f"losses/{key}"), ("std", f"metrics/{key}-std")):
            values = trial.tensor(name).values()
            assert [float(values[s]) for s in range(4)] == result[f"{key}-{stat}"], name
    assert not trial.tensor_names(regex="^feature_importance/")  # one booster per fold: nothing model-wide


def test_callback_is_picklable_and_writes_nothing_until_training(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    out = tmp_path / "trial"
    callback = ttx.Callback(out)
    assert not out.exists()
    _train(tmp_path / "fresh", *dmatrices, rounds=2)  # a fresh callback of the same configuration
    clone = pickle.loads(pickle.dumps(callback))
    evals = [(dmatrices[0], "train"), (dmatrices[1], "validation")]
    xgb.train(PARAMS, dmatrices[0], 2, evals=evals, callbacks=[clone], verbose_eval=False)
    assert clone.hook is not None and clone.hook.step == 1
    assert copy.deepcopy(clone).hook is None  # a used callback copies without its (closed) writer
    assert tensortap.create_trial(out).steps() == [0, 1]


def test_configuration_errors(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    with pytest.raises(ValueError, match=r"include_collections: 'shap' is not a collection; valid: .*full_shap"):
        ttx.Callback(tmp_path, include_collections=["shap"])
    with pytest.raises(ValueError, match="shap_rows: expected an integer >= 1, got 0"):
        ttx.Callback(tmp_path, shap_rows=0)
    with pytest.raises(ValueError, match="save_interval"):
        ttx.Callback(tmp_path, save_config=SaveConfig(save_interval=0))


def test_an_eval_name_that_names_no_set_is_warned_about_and_training_goes_on(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a misspelled eval_name raised a ValueError out of fit (GridSearchCV scored it NaN), and with no
    evaluation set it was accepted without a word (hunt 31 M3)."""
    X, y = _data()
    callback = ttx.Callback(tmp_path / "t", eval_name="validation", include_collections=["losses", "predictions"])
    clf = xgb.XGBClassifier(n_estimators=3, max_depth=2, n_jobs=1, callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        clf.fit(X[:200], y[:200], eval_set=[(X[200:], y[200:])], verbose=False)
    assert _warnings(caplog) == [
        "tensortap: eval_name='validation' is not an evaluation set of this training (its sets: validation_0): the "
        "predictions, labels and SHAP values computed on it are not captured, the other collections are"
    ]
    trial = tensortap.create_trial(tmp_path / "t")
    assert list(_series(trial, "losses/validation_0-logloss").values()) == clf.evals_result()["validation_0"]["logloss"]
    assert trial.tensor_names(collection="predictions") == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        xgb.XGBClassifier(n_estimators=2, n_jobs=1, callbacks=[ttx.Callback(tmp_path / "u", eval_name="val")]).fit(
            X, y, verbose=False
        )
    [warning] = _warnings(caplog)
    assert warning.startswith("tensortap: no evaluation set (eval_name='val' names none), so losses, metrics not "
                              "captured: XGBoost computes")  # fmt: skip
    with pytest.raises(ValueError, match="eval_name: 'test' is not an evaluation set; valid: train, validation"):
        _train(tmp_path / "strict", *dmatrices, eval_name="test", strict=True)
    assert not (tmp_path / "strict").exists()


def test_a_new_run_trained_further_after_another_run_goes_on_in_its_own_run_folder(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 47 F2: with ``if_exists="new_run"``, a run trained further (``xgb_model=``) after another training
    wrote ``run-1`` was split off, silently, into ``run-2`` under the same run id: the resume looked for the run
    in the last run folder only. It goes on in ``run-0``, as it does without the other training."""
    dtrain, dval = dmatrices
    evals = [(dval, "validation")]
    mine = ttx.Callback(tmp_path, if_exists="new_run", include_collections=["losses"])
    logs: list[dict[str, Any]] = [{}, {}]
    booster = xgb.train(PARAMS, dtrain, 3, evals=evals, callbacks=[mine], evals_result=logs[0], verbose_eval=False)
    other = ttx.Callback(tmp_path, if_exists="new_run", include_collections=["losses"])
    xgb.train(PARAMS, dtrain, 2, evals=evals, callbacks=[other], verbose_eval=False)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        xgb.train(
            PARAMS, dtrain, 2, evals=evals, callbacks=[mine], evals_result=logs[1], verbose_eval=False,
            xgb_model=booster,
        )  # fmt: skip
    assert _warnings(caplog) == []
    assert mine.hook is not None and mine.hook.out_dir == str(tmp_path / "run-0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-0", "run-1"]
    trial = tensortap.create_trial(tmp_path / "run-0")
    assert trial.steps() == list(range(5)) and trial.training_ended and trial.problems() == {}
    expected = logs[0]["validation"]["logloss"] + logs[1]["validation"]["logloss"]
    assert list(_series(trial, "losses/validation-logloss").values()) == expected
    assert tensortap.create_trial(tmp_path / "run-1").steps() == [0, 1]


@pytest.mark.filterwarnings("ignore:.*Empty dataset:UserWarning")  # XGBoost's own, for the set without rows
def test_an_evaluation_set_without_rows_is_named_in_one_warning_and_not_captured(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 47 F1: XGBoost evaluates a set of 0 rows as 0 (``rmse`` 0.0): that was saved as its loss (and rules
    read it as a real validation loss); its labels were said to be missing, its SHAP values failed on a numpy
    reshape after ``full_shap`` was saved, ``average_shap`` not. Now one warning names the set and its 0 rows,
    and nothing computed on it is captured; the other sets are, and so is all of a set ``eval_name`` chooses."""
    dtrain, _ = dmatrices
    empty = xgb.DMatrix(np.empty((0, dtrain.num_col())), label=np.empty(0))
    asked = ["losses", "predictions", "labels", "full_shap", "average_shap"]
    lost = "losses, predictions, labels, full_shap, average_shap"
    for folder, eval_name, not_captured in (("last", None, lost), ("train", "train", "losses")):
        callback = ttx.Callback(tmp_path / folder, eval_name=eval_name, include_collections=asked,
                                collection_configs=EVERY_ROUND)  # fmt: skip
        result: dict[str, Any] = {}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tensortap"):
            booster = xgb.train(
                {**PARAMS, "eval_metric": "logloss"}, dtrain, 3, evals=[(dtrain, "train"), (empty, "empty")],
                callbacks=[callback], evals_result=result, verbose_eval=False,
            )  # fmt: skip
        assert result["empty"]["logloss"] == [0.0] * 3  # what XGBoost reports of it
        assert _warnings(caplog) == [
            "tensortap: evaluation set 'empty' has 0 rows (XGBoost evaluates it as 0, which measures nothing): its "
            f"{not_captured} not captured"
        ]
        trial = tensortap.create_trial(tmp_path / folder)
        assert trial.tensor_names(collection="losses") == ["losses/train-logloss"]
        assert list(_series(trial, "losses/train-logloss").values()) == result["train"]["logloss"]
        per_set = [n for c in asked[1:] for n in trial.tensor_names(collection=c)]
        if eval_name is None:
            assert per_set == []
        else:
            assert all(trial.tensor(n).steps() == [0, 1, 2] for n in per_set) and "full_shap" in per_set
            assert len(per_set) == 3 + dtrain.num_col()  # predictions, labels, full_shap, average_shap/<feature>
            np.testing.assert_array_equal(trial.tensor("predictions").value(2), booster.predict(dtrain))
    # the last of sets sharing a name has no row: said once (before, also "the last such set's losses are captured")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        evals = [(dtrain, "train"), (dtrain, "empty"), (empty, "empty")]
        callback = ttx.Callback(tmp_path / "shared", include_collections=["losses"])
        xgb.train(PARAMS, dtrain, 1, evals=evals, callbacks=[callback], verbose_eval=False)
    assert _warnings(caplog) == [
        "tensortap: evaluation set 'empty' has 0 rows (XGBoost evaluates it as 0, which measures nothing): its "
        "losses not captured"
    ]


def test_shap_values_failing_after_the_matrix_is_computed_save_neither_of_the_pair(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hunt 47 (full_shap leftover): ``full_shap`` was offered before ``average_shap`` was computed, so a failure
    in between (hunt 47 F1: a reshape of 0 rows) saved ``full_shap`` while ``average_shap`` was not, under a
    warning naming both as not captured. Both are computed first now: neither is saved, with the one warning.
    XGBoost computes the matrix of any set it accepts, so the failure is injected where the averages are named."""
    import tensortap.capture.xgboost.model as mdl

    def no_names(model: Any) -> list[str]:
        raise ValueError("the booster's feature names cannot be read")

    monkeypatch.setattr(mdl, "feature_names", no_names)
    dtrain, dval = dmatrices
    asked = ["losses", "predictions", "full_shap", "average_shap"]
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        _train(tmp_path, dtrain, dval, rounds=2, include_collections=asked, collection_configs=EVERY_ROUND)
    assert _warnings(caplog) == [
        "tensortap: full_shap, average_shap not captured from round 0 on: ValueError: the booster's feature names "
        "cannot be read"
    ]
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names(regex="^(full|average)_shap") == []
    assert trial.tensor("predictions").steps() == [0, 1]  # the rest of the step is captured


def test_predictions_labels_and_shap_without_an_evaluation_set_are_named_in_one_warning(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 47 F3: predictions, labels and SHAP values asked for, and no evaluation set: they were dropped without
    a word (the warning was given for losses and metrics only, and did not name them)."""
    dtrain, _ = dmatrices
    asked = ["predictions", "labels", "full_shap", "feature_importance"]
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        xgb.train(PARAMS, dtrain, 2, callbacks=[ttx.Callback(tmp_path, include_collections=asked)])
    assert _warnings(caplog) == [
        "tensortap: no evaluation set, so predictions, labels, full_shap not captured: XGBoost computes losses and "
        "metrics on the evaluation sets, and the callback predictions, labels and SHAP values on one of them; pass "
        "evals=[(dtrain, 'train'), (dval, 'validation')] to xgb.train, or eval_set=[...] to fit"
    ]
    trial = tensortap.create_trial(tmp_path)
    assert {name.split("/")[0] for name in trial.tensor_names()} == {"feature_importance"}


def test_eval_name_naming_sets_that_share_it_takes_the_last_as_the_losses_do(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 47 F4: ``evals=[(dtrain, "d"), (dval, "d")]`` with ``eval_name="d"``: the losses were the last set's
    (XGBoost logs it last) but the predictions and labels the first set's, and the warning spoke of metrics only.
    Both are the last set's now, and the warning names them."""
    dtrain, dval = dmatrices
    callback = ttx.Callback(tmp_path, eval_name="d", include_collections=["losses", "predictions", "labels"])
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = xgb.train(
            PARAMS, dtrain, 2, evals=[(dtrain, "d"), (dval, "d")], callbacks=[callback], verbose_eval=False
        )
    assert _warnings(caplog) == [
        "tensortap: evaluation sets share a name ('d'): XGBoost logs their metrics under it one after the other; "
        "the last such set's losses, predictions, labels are captured, the others' not; give each set a name of its "
        "own"
    ]
    trial = tensortap.create_trial(tmp_path)
    np.testing.assert_array_equal(trial.tensor("labels").value(0), dval.get_label())
    np.testing.assert_array_equal(trial.tensor("predictions").value(0), booster.predict(dval, iteration_range=(0, 1)))


def test_a_callback_called_by_hand_says_the_evaluation_sets_are_unknown(
    tmp_path: Path, dmatrices: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 47 F5: the callback's methods called by hand in a loop of ``booster.update`` (not supported) warned
    "no evaluation set, so XGBoost computes no loss or metric to capture", which was false (the losses given are
    captured), and dropped the predictions asked for without naming them."""
    dtrain, dval = dmatrices
    callback = ttx.Callback(tmp_path, include_collections=["losses", "predictions"], collection_configs=EVERY_ROUND)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        booster = callback.before_training(xgb.Booster({**PARAMS, "eval_metric": "logloss"}, [dtrain, dval]))
    assert _warnings(caplog) == [
        "tensortap: the callback is not run by xgboost.train or xgboost.cv (its methods called by hand, as in a "
        "loop of booster.update?), so the evaluation sets are unknown: predictions not captured; the losses and "
        "metrics are those of the evaluation log given to after_iteration, none of them marked as the training "
        "set's (collection training_data); train with xgb.train(..., evals=[...], callbacks=[callback]) to capture "
        "them all"
    ]
    log: dict[str, dict[str, list[float]]] = {"validation": {"logloss": []}}
    for i in range(2):
        booster.update(dtrain, i)
        log["validation"]["logloss"].append(float(booster.eval(dval, "validation").split(":")[1]))
        callback.after_iteration(booster, i, log)
    callback.after_training(booster)
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["losses/validation-logloss"] and trial.steps() == [0, 1]


def test_from_json(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"out_dir": str(tmp_path / "t"), "save_config": {"save_interval": 3}, "include_collections": ["losses"]}
        )
    )
    callback = ttx.Callback.from_json(config, eval_name="validation")
    xgb.train(PARAMS, dmatrices[0], 7, evals=[(dmatrices[1], "validation")], callbacks=[callback], verbose_eval=False)
    trial = tensortap.create_trial(tmp_path / "t")
    assert trial.steps() == [0, 3, 6]
    assert trial.tensor_names() == ["losses/validation-error", "losses/validation-logloss"]


@pytest.mark.slow
def test_dask_two_workers_each_write_their_shards(tmp_path: Path) -> None:
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("dask.distributed")
    from xgboost import dask as dxgb

    X, y = _data(rows=400)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        dX, dy = client.persist([da.from_array(X, chunks=(100, 6)), da.from_array(y, chunks=100)])
        client.rebalance()
        dtrain = dxgb.DaskDMatrix(client, dX, dy)
        callback = ttx.Callback(tmp_path, save_config=SaveConfig(save_interval=1))
        out = dxgb.train(
            client, {**PARAMS, "eval_metric": "logloss"}, dtrain, num_boost_round=5, evals=[(dtrain, "train")],
            callbacks=[callback],
        )  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == ["worker_0", "worker_1"] and trial.training_ended
    tensor = trial.tensor("losses/train-logloss")
    for worker in trial.workers():
        values = tensor.values(worker=worker)
        assert [float(values[s]) for s in range(5)] == out["history"]["train"]["logloss"], worker


def test_the_report_of_an_xgboost_trial_judges_it_as_boosting(tmp_path: Path, dmatrices: tuple[Any, Any]) -> None:
    """The report ran a network's rules on XGBoost (``all_zero`` fired on the SHAP of an unused feature, the
    others could not judge) and drew empty gradient and weight sections; it now runs boosting rules and
    draws the features' importance."""
    from tensortap.trial.report import XGBOOST_RULES, build_report, default_rules

    dtrain, dval = dmatrices
    xgb.train(
        PARAMS | {"eval_metric": ["logloss", "auc"]}, dtrain, num_boost_round=12,
        evals=[(dtrain, "train"), (dval, "validation")], verbose_eval=False,
        callbacks=[ttx.Callback(tmp_path, include_collections=ALL)],
    )  # fmt: skip
    trial = tensortap.create_trial(tmp_path)
    assert default_rules(trial) == XGBOOST_RULES
    page = build_report(trial, show_progress=False)
    assert "Feature importance (gain) over rounds" in page and "Gradient norms" not in page
    for rule in XGBOOST_RULES:
        assert f"<td>{rule}</td><td><span class='ok'>did not fire</span>" in page  # a healthy training
    assert "all_zero" not in page and "could not judge" not in page
