"""The XGBoost ``TrainingCallback``: XGBoost's events become the steps of the capture core."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import threading
from collections.abc import Callable
from types import CodeType
from typing import Any

import numpy as np
import xgboost as xgb
from xgboost import collective

from ...exceptions import TrialExistsError
from ...trial.rules.base import Rule
from ...trial.rules.inprocess import RuleSet
from .. import core
from ..stop import log_stop
from ..writer import logger
from . import model as mdl
from .evals import (
    EvalData,
    EvalsLog,
    empty_sets,
    offer_evals,
    overlong,
    running_train,
    shared_names,
    training_frame,
    training_sets,
)
from .hook import Hook

RUN_ATTRIBUTE = "tensortap_run"  # the booster attribute naming the run the booster was last trained in
EVALUATED = ("losses", "metrics")  # what XGBoost evaluates on every evaluation set
ON_ONE_SET = ("predictions", "labels", "full_shap", "average_shap")  # computed on the set eval_name chooses


class Callback(xgb.callback.TrainingCallback):
    """Capture every boosting round of ``xgb.train``, ``xgb.cv``, the sklearn estimators and ``xgboost.dask``.

    The callback is picklable: the hook that writes is created in
    :meth:`before_training`, in the process that trains (each dask worker
    writes ``worker_<rank>``, the rank being XGBoost's collective rank), and
    closed in :meth:`after_training`.

    A collection XGBoost cannot compute for this model (trees and SHAP values of
    multi-target trees) is skipped with one warning naming it; the others are
    still captured.

    Parameters
    ----------
    out_dir
        Local directory or fsspec URL of the trial.
    eval_name
        Name of the evaluation set whose predictions, labels and SHAP values are
        captured (as given in ``evals``, e.g. ``"validation"``, or ``"validation_0"``
        for the sklearn API); default: the last one. A name that is not one of the
        training's sets is said in one warning, and those collections are not
        captured (``strict=True`` raises a ``ValueError`` before training).
    shap_rows
        SHAP values are computed on at most this many rows of that set (a fixed
        random sample, seed 0).
    shap_approx
        Use XGBoost's approximate contributions (``approx_contribs=True``, ~100 times faster).
    stop_poll_seconds
        Minimum seconds between two looks for a stop request (default 1).
    **hook_kwargs
        ``save_config``, ``include_collections``, ``collection_configs``, ... as
        :class:`tensortap.capture.Hook`; checked here, at construction. An explicit
        ``save_config`` applies to every collection not configured in ``collection_configs``.
        Without ``if_exists``, a training that finds ``out_dir`` holding one already (a later fold of
        ``cross_val_score``, a second ``fit``) is written to ``out_dir/run-<n>``, with a warning.
        ``rules`` (in-process rules) are checked here too. Each training that starts a new run is judged
        from scratch: the first by the rule objects given, each later one by fresh copies of them as
        given (``callback.hook.rules`` after it); a training further of the same run (``xgb_model=``)
        goes on with the rules of that run.

    Notes
    -----
    The callback marks the booster it trains with the attribute ``tensortap_run``
    (the run's id; it is saved with the model). A training with ``xgb_model=``
    goes on with this callback's last run only where the booster carries that
    run's mark and has the rounds the run trained; any other training (an
    unrelated booster, an earlier checkpoint of the run, a booster
    ``EarlyStopping(save_best=True)`` cut back) starts a new run.
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
        self._rules = RuleSet(core.check_rules(hook_kwargs.get("rules")))
        self._run_rules: list[Rule] = []  # those judging this callback's last run: a training further goes on with them
        # a rank-1 hook of include_workers="one" opens no writer: this only checks the configuration
        probe = {**hook_kwargs, "rank": 1, "rules": None}
        if probe.get("include_workers", "all") == "all":
            probe["include_workers"] = "one"
        included = Hook(self.out_dir, **probe).included
        if "trees" in included and importlib.util.find_spec("pandas") is None:
            raise ImportError("include_collections: 'trees' needs pandas: pip install pandas")
        self.hook: Hook | None = None
        self._run_id: str | None = None  # of this callback's last training: a training further continues it
        self._run_dir = self.out_dir  # where that run is written (a run folder out_dir/run-<n>, or out_dir)
        self._run_rounds = 0  # the rounds of the booster after the last round that run trained
        self._watching = False  # whether this training is in mdl.PARAMETERS (its hyperparameters are captured)
        # the training this callback captures now, until its after_training: its thread, and the id and code of
        # its xgboost.train (or xgboost.cv) frame (not the frame, which holds the user's data)
        self._training_at: tuple[int, int | None, CodeType | None] | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget the state of the last training (what :meth:`before_training` sets)."""
        self._offset = 0
        self._eval: EvalData | None = None
        self._training: frozenset[str] = frozenset()
        self._empty: frozenset[str] = frozenset()  # the evaluation sets without a row (empty_sets)
        self._evals_log: EvalsLog | None = None
        self._next_epoch = 0
        self._logged = 0  # entries of the evaluation log when the last round was captured
        self._skipped: set[str] = set()
        self._shared: list[str] = []  # names more than one evaluation set has (shared_names)
        self._hyperparameters: dict[str, str] = {}  # those of the round in progress
        self._saved_hyperparameters: dict[str, str] = {}  # those saved last in this training

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], **overrides: Any) -> Callback:
        """Build a callback from a JSON hook configuration (see :meth:`tensortap.capture.Hook.from_json`)."""
        return core.from_config_file(path, Hook._kwargs_from_json, cls, overrides)

    @classmethod
    def from_env(cls, **overrides: Any) -> Callback | None:
        """Build a callback from the JSON file named by ``TENSORTAP_CONFIG``; None if it is unset."""
        path = core.config_path()
        return cls.from_json(path, **overrides) if path else None

    def __getstate__(self) -> dict[str, Any]:
        # a copy carries no training, nor the run of the last one: its trainings are new runs (two copies
        # training the booster further would both write the run's next steps)
        state = {"hook": None, "_eval": None, "_evals_log": None, "_watching": False, "_training_at": None}
        return {**self.__dict__, **state, "_run_id": None, "_run_rounds": 0}

    # ------------------------------------------------------------ callbacks
    def before_training(self, model: Any) -> Any:
        """Open the hook in the training process, after the booster exists, and mark the booster with its run."""
        if self._runs_elsewhere():
            raise RuntimeError(
                "tensortap.xgboost.Callback: this callback captures a training that runs now in another thread, "
                "and one callback holds one training's state: give each training its own callback"
            )
        if self._training_at is not None and self.hook is not None:
            self._close_left_training()
        frame = training_frame(sys._getframe(1))
        dtrain, evals = running_train(frame)
        names = [name for _, name in evals]
        unknown_eval = self.eval_name is not None and bool(evals) and self.eval_name not in names
        if unknown_eval and self.hook_kwargs.get("strict"):
            raise ValueError(f"eval_name: {self.eval_name!r} is not an evaluation set; valid: {', '.join(names)}")
        thread = threading.get_ident()
        self._training_at = (thread, None, None) if frame is None else (thread, id(frame), frame.f_code)
        self._reset()
        self._eval = EvalData.choose(evals, self.eval_name, self.shap_rows)
        self._training = training_sets(dtrain, evals)
        self._shared = shared_names(evals)
        self._empty = empty_sets(evals)
        self._offset = model.num_boosted_rounds()
        booster = model if isinstance(model, xgb.Booster) else None
        params = mdl.booster_parameters(json.loads(booster.save_config())) if booster is not None else {}
        kwargs = dict(self.hook_kwargs)
        if collective.is_distributed():
            kwargs["rank"], kwargs["world_size"] = collective.get_rank(), collective.get_world_size()
        # the same run goes on only with the booster it left (xgb_model=): marked by it, with the rounds it trained
        of_run = booster is not None and self._run_id is not None and booster.attr(RUN_ATTRIBUTE) == self._run_id
        branch = of_run and 0 < self._offset < self._run_rounds  # an earlier checkpoint of the run, or one cut back
        if of_run and self._offset == self._run_rounds:
            kwargs.setdefault("run_id", self._run_id)
        else:
            self._run_rules = self._rules.for_new_run()
        kwargs["rules"] = self._run_rules
        run_dir, run_rounds = self._run_dir, self._run_rounds
        self.hook = hook = self._open(params, kwargs, said=branch)
        self._run_dir = hook.out_dir
        self._run_rounds = self._offset
        self._hyperparameters = params
        if booster is not None and "hyperparameters" in hook.included:
            mdl.PARAMETERS.start()
            self._watching = True
        self._run_id = hook.run_id
        if booster is not None:
            booster.set_attr(**{RUN_ATTRIBUTE: hook.run_id})
        if self.stop_poll_seconds is not None:
            hook.stop_poll_seconds = self.stop_poll_seconds
        if branch:
            logger.warning(
                "tensortap: the booster continues from round %d of the run in %s, which trained rounds up to %d (the "
                "booster is an earlier checkpoint of that run, or one EarlyStopping(save_best=True) cut back): this "
                "training is written to %s as a new run, its steps numbered from round %d as XGBoost counts them",
                self._offset,
                run_dir,
                run_rounds - 1,
                hook.out_dir,
                self._offset,
            )
        from_boosters = sorted(set(hook.included) - set(EVALUATED))
        if booster is None and from_boosters:
            logger.warning(
                "tensortap: %s not captured from xgb.cv: each fold has its own booster, and only the evaluation "
                "log (losses, metrics) is shared",
                ", ".join(from_boosters),
            )
        if frame is None:
            self._warn_by_hand(hook)
        elif booster is not None:
            self._warn_of_evals(hook, evals, unknown_eval)
        skipped, why = mdl.unsupported(params)
        named = [name for name in skipped if name.split("/")[0] in hook.included]
        if named:
            logger.warning(
                "tensortap: %s not captured: %s; the other collections are still captured", ", ".join(named), why
            )
        self._skipped.update(skipped)
        return model

    def _warn_by_hand(self, hook: Hook) -> None:
        """Say that the training is not run by ``xgboost.train`` or ``xgboost.cv``, which hold its evaluation sets
        (a loop of ``booster.update`` calling the callback's methods by hand: not supported)."""
        on_one_set = [c for c in ON_ONE_SET if c in hook.included]
        logger.warning(
            "tensortap: the callback is not run by xgboost.train or xgboost.cv (its methods called by hand, as in a "
            "loop of booster.update?), so the evaluation sets are unknown: %sthe losses and metrics are those of the "
            "evaluation log given to after_iteration, none of them marked as the training set's (collection "
            "training_data); train with xgb.train(..., evals=[...], callbacks=[callback]) to capture them all",
            f"{', '.join(on_one_set)} not captured; " if on_one_set else "",
        )

    def _warn_of_evals(self, hook: Hook, evals: list[tuple[Any, str]], unknown_eval: bool) -> None:
        """Say, before the first round, what is not captured of the evaluation sets of the ``xgboost.train`` that
        runs: none, one that ``eval_name`` names not, sets sharing a name, sets without a row (whose predictions,
        labels and SHAP values are then not computed either)."""
        evaluated = [c for c in EVALUATED if c in hook.included]
        on_one_set = [c for c in ON_ONE_SET if c in hook.included]
        if not evals:
            if evaluated or on_one_set:
                logger.warning(
                    "tensortap: no evaluation set%s, so %s not captured: XGBoost computes losses and metrics on the "
                    "evaluation sets, and the callback predictions, labels and SHAP values on one of them; pass "
                    "evals=[(dtrain, 'train'), (dval, 'validation')] to xgb.train, or eval_set=[...] to fit",
                    "" if self.eval_name is None else f" (eval_name={self.eval_name!r} names none)",
                    ", ".join(evaluated + on_one_set),
                )
            return
        if unknown_eval:
            logger.warning(
                "tensortap: eval_name=%r is not an evaluation set of this training (its sets: %s): the predictions, "
                "labels and SHAP values computed on it are not captured, the other collections are",
                self.eval_name,
                ", ".join(name for _, name in evals),
            )
        chosen = None if self._eval is None else self._eval.name
        of_last = evaluated + (on_one_set if chosen in self._shared else [])
        shared = [name for name in self._shared if name not in self._empty]  # an empty last set: warned below
        if shared and of_last:
            logger.warning(
                "tensortap: evaluation sets share a name (%s): XGBoost logs their metrics under it one after the "
                "other; the last such set's %s are captured, the others' not; give each set a name of its own",
                ", ".join(map(repr, shared)),
                ", ".join(of_last),
            )
        for name in dict.fromkeys(name for _, name in evals if name in self._empty):
            lost = evaluated + (on_one_set if name == chosen else [])
            if lost:
                logger.warning(
                    "tensortap: evaluation set %r has 0 rows (XGBoost evaluates it as 0, which measures nothing): "
                    "its %s not captured",
                    name,
                    ", ".join(lost),
                )
        if chosen in self._empty:
            self._eval = None

    def _open(self, params: dict[str, str], kwargs: dict[str, Any], said: bool = False) -> Hook:
        """The hook of this training. Where ``out_dir`` holds a training already and ``if_exists`` was not given,
        this one is written to a run folder ``out_dir/run-<n>``, with a warning (unless ``said``: the caller warns
        of it): sklearn's model selection gives each fit a copy of the callback, and turns the error of every fit
        after the first into a score of NaN."""
        if "run_id" in kwargs and kwargs.get("if_exists") != "new_run":  # the run goes on in its folder
            return Hook(self._run_dir, hyperparameters=params, **kwargs)
        try:
            return Hook(self.out_dir, hyperparameters=params, **kwargs)
        except TrialExistsError:
            if "if_exists" in kwargs:
                raise
        hook = Hook(self.out_dir, hyperparameters=params, if_exists="new_run", **kwargs)
        if said:
            return hook
        logger.warning(
            "tensortap: %s holds a training already (an earlier training with this callback or a copy of it, as "
            "cross_val_score and GridSearchCV make for each fit, or an earlier run): this one is written to %s. "
            'Pass if_exists="new_run" to write each training to a run folder, or give each an out_dir of its own',
            self.out_dir,
            hook.out_dir,
        )
        return hook

    def before_iteration(self, model: Any, epoch: int, evals_log: EvalsLog) -> bool:
        """Keep XGBoost's evaluation log (the same object every round), for a round :meth:`after_iteration` misses.

        Where a callback changed the parameters since the last round
        (``LearningRateScheduler`` sets ``learning_rate`` after each round), read
        those this round trains with (:class:`~.model.ParameterWatch`).
        """
        self._evals_log = evals_log
        if self._watching and mdl.PARAMETERS.changed(model):
            self._hyperparameters = mdl.booster_parameters(json.loads(model.save_config()))
        return False

    def after_iteration(self, model: Any, epoch: int, evals_log: EvalsLog) -> bool:
        """Capture round ``epoch``; return True when a stop request was written into the trial."""
        hook = self.hook
        if hook is None:
            raise RuntimeError("tensortap Callback: after_iteration before before_training")
        self._evals_log = evals_log
        self._capture_round(hook, model, epoch, model_has_round=True)
        stop = hook.should_stop
        if collective.is_distributed():  # a stop one worker sees stops all, at the same round
            stop = bool(collective.allreduce(np.array([stop], dtype=np.int32), collective.Op.MAX)[0])
        if stop:
            log_stop(hook.stop_reason, "training")
        return stop

    def after_training(self, model: Any) -> Any:
        """Capture the last round if a callback before this one ended training, then close the hook."""
        self._unwatch()
        if self.hook is not None:
            self._capture_missed_round(self.hook, model)
            self.hook.close()
        self._training_at = None
        self._eval = None
        self._evals_log = None
        return model

    def _runs_elsewhere(self) -> bool:
        """Whether the training this callback captures runs now in another thread: that thread's stack still
        holds the frame of its ``xgboost.train`` (or ``xgboost.cv``) call. An exception or a Ctrl-C ends a
        training without ``after_training``: its thread may live on, its frame does not."""
        if self._training_at is None:
            return False
        thread, frame_id, code = self._training_at
        if thread == threading.get_ident():
            return False
        frame = sys._current_frames().get(thread)
        if code is None:  # a training outside xgboost.train and xgboost.cv: while its thread lives
            return frame is not None
        while frame is not None:
            if id(frame) == frame_id and frame.f_code is code:
                return True
            frame = frame.f_back
        return False

    def _close_left_training(self) -> None:
        """Close the trial of the training before, which an exception or a Ctrl-C (a notebook's "interrupt")
        ended: XGBoost calls no ``after_training`` then, so its trial stayed open (live readers, ``rules
        --follow``, waited for more) until this next training with the callback (or ``callback.hook.close()``,
        or the interpreter's exit). The round in progress is dropped; the end reason is ``exception``."""
        assert self.hook is not None
        self._unwatch()
        self._training_at = None
        logger.warning(
            "tensortap: the training before with this callback was ended by an exception or a Ctrl-C (XGBoost "
            "then calls no callback), and its trial %s is closed now (end reason 'exception')",
            self.hook.out_dir,
        )
        self.hook.close_for_exit("exception", "the training ended by an exception or a Ctrl-C (no after_training)")

    def _unwatch(self) -> None:
        """Stop watching this training's parameters, if they were watched."""
        if self._watching:
            self._watching = False
            mdl.PARAMETERS.stop()

    # -------------------------------------------------------------- capture
    def _capture_missed_round(self, hook: Hook, model: Any) -> None:
        """The round after which an earlier callback stopped training (XGBoost then skips the later ones).

        XGBoost asks the callbacks one after the other and stops asking at the
        first that returns True (``EarlyStopping`` does at its last round), so a
        callback listed after it never sees that round: the one after the last
        round captured, if the evaluation log grew since (or, without one, the
        booster).
        """
        is_booster = isinstance(model, xgb.Booster)
        logged = self._log_length()
        if logged:
            missed = logged > self._logged
        elif is_booster:
            missed = model.num_boosted_rounds() - self._offset > self._next_epoch
        else:
            return
        if not missed:
            return
        epoch = self._next_epoch
        # EarlyStopping(save_best=True) before this callback hands over the best round's model
        has_round = is_booster and model.num_boosted_rounds() == self._offset + epoch + 1
        self._capture_round(hook, model, epoch, model_has_round=has_round)

    def _log_length(self) -> int:
        """Entries of the evaluation log's first history: one a round, more when sets share a name."""
        log = self._evals_log or {}
        return next((len(history) for metrics in log.values() for history in metrics.values()), 0)

    def _capture_round(self, hook: Hook, model: Any, epoch: int, model_has_round: bool) -> None:
        round_ = self._offset + epoch
        self._next_epoch = epoch + 1
        self._run_rounds = round_ + 1
        self._logged = self._log_length()
        if epoch == 0:
            self._warn_overlong(hook)
            if self._watching:
                self._read_base_score(model)
        if hook.begin_round(round_):
            offer_evals(hook, self._evals_log or {}, self._training, self._empty)
            if isinstance(model, xgb.Booster):  # xgb.cv: one booster per fold, only the evaluation log is shared
                # what does not depend on the booster handed over
                self._capture_hyperparameters(hook)
                self._capture_labels(hook)
                if model_has_round:
                    self._capture_model(hook, model, round_)
                else:
                    self._skip_model(hook, round_)
        hook.end_step()

    def _warn_overlong(self, hook: Hook) -> None:
        """At the first round: name each metric XGBoost logged more than once (a custom metric named like a
        built-in one), whose last value alone is captured. Sets that share a name were warned about already."""
        if not {"losses", "metrics"} & set(hook.included):
            return
        names = overlong(self._evals_log or {}, 1, self._shared)
        if names:
            logger.warning(
                "tensortap: XGBoost logs %s more than once a round, one value after the other under one name (a "
                "custom metric named like a built-in one that is evaluated too), and only the value logged last "
                "(the custom metric's) is captured; give the custom metric a name of its own",
                ", ".join(map(repr, names)),
            )

    def _read_base_score(self, model: Any) -> None:
        """After the first round: ``base_score`` as the model trains with it. With ``boost_from_average`` XGBoost
        estimates it (the labels' mean, one per target) at the first update, after :meth:`before_training`
        read the configuration, which held a placeholder (0.5) then."""
        score = mdl.booster_parameters(json.loads(model.save_config())).get("base_score")
        if score is not None:
            self._hyperparameters = {**self._hyperparameters, "base_score": score}

    def _skip_model(self, hook: Hook, round_: int) -> None:
        done = {"losses", "metrics", "hyperparameters", "labels", *self._skipped}
        wanted = [c for c in hook.included if c not in done and hook.is_saving(c)]
        if wanted:
            logger.warning(
                "tensortap: round %d: %s not captured: the booster after training is not the one of round %d "
                "(EarlyStopping(save_best=True) comes before the tensortap callback in callbacks=[...]; "
                "list the tensortap callback first to capture them)",
                round_,
                ", ".join(wanted),
                round_,
            )

    def _capture_hyperparameters(self, hook: Hook) -> None:
        """Save the parameters at the first round saved for the collection, then those that changed since."""
        if not hook.is_saving("hyperparameters"):
            return
        changed = {k: v for k, v in self._hyperparameters.items() if self._saved_hyperparameters.get(k) != v}
        if changed:
            self._saved_hyperparameters.update(changed)
            self._compute(hook, ("hyperparameters",), lambda: mdl.offer_hyperparameters(hook, changed))

    def _capture_labels(self, hook: Hook) -> None:
        data = self._eval
        if data is not None:
            self._compute(hook, ("labels",), lambda: mdl.offer_labels(hook, data))

    def _capture_model(self, hook: Hook, model: Any, round_: int) -> None:
        for kind in mdl.IMPORTANCE_TYPES:  # some are skipped: mdl.unsupported
            self._compute(
                hook,
                ("feature_importance",),
                functools.partial(mdl.offer_feature_importance, hook, model, kind),
                f"feature_importance/{kind}",
            )
        self._compute(hook, ("trees",), lambda: self._offer_trees(hook, model))
        data = self._eval
        if data is None:
            return
        self._compute(hook, ("predictions",), lambda: mdl.offer_predictions(hook, model, round_, data))
        self._compute(
            hook, ("full_shap", "average_shap"), lambda: mdl.offer_shap(hook, model, round_, data, self.shap_approx)
        )

    def _offer_trees(self, hook: Hook, model: Any) -> None:
        left_out = [c for c in mdl.offer_trees(hook, model) if c not in self._skipped]
        if left_out:  # said once per training
            self._skipped.update(left_out)
            logger.warning(
                "tensortap: %s not captured from round %d on: not numeric (categorical splits hold lists)",
                ", ".join(left_out),
                hook.step,
            )

    def _compute(
        self, hook: Hook, collections: tuple[str, ...], offer: Callable[[], None], what: str | None = None
    ) -> None:
        """Run ``offer`` if one of ``collections`` is saved now; if it fails, skip it from now on, saying so once.

        ``what`` names what ``offer`` captures (default: its collections).
        """
        what = what or ", ".join(collections)
        if what in self._skipped or not any(hook.is_saving(c) and c not in self._skipped for c in collections):
            return
        try:
            offer()
        except Exception as exc:
            if hook.strict:
                raise
            self._skipped.add(what)
            logger.warning(
                "tensortap: %s not captured from round %d on: %s: %s",
                what,
                hook.step,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
