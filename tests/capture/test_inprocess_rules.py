"""In-process rules (``rules=[...]`` of every adapter) on real tiny trainings: PyTorch, XGBoost and Keras
(under whatever ``KERAS_BACKEND`` is set; run the Keras tests once per backend, as ``test_keras.py``)."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensortap  # noqa: E402
import tensortap.torch as ttt  # noqa: E402
from tensortap import ReductionConfig, SaveConfig, StepState  # noqa: E402
from tensortap.capture import ShardPolicy, Writer  # noqa: E402
from tensortap.exceptions import UnknownName  # noqa: E402
from tensortap.rules import (  # noqa: E402
    Action,
    ExplodingTensor,
    LossNotDecreasing,
    Overtraining,
    Requirement,
    Rule,
    StopTraining,
    Verdict,
    invoke_rule,
)
from tensortap.trial.rules.reading import Selection  # noqa: E402

try:
    from tensortap.xgboost import Callback as xgb_callback
except ImportError:  # pragma: no cover - xgboost is installed where the tests run
    xgb_callback = None  # type: ignore[assignment,misc]

EVERY_STEP = SaveConfig(save_interval=1)


class LossAbove(Rule):
    """The custom rule of docs/rules.md: fires where a loss exceeds ``threshold``."""

    def __init__(self, base_trial: Any = None, threshold: float = 10.0) -> None:
        super().__init__(base_trial)
        self.threshold = threshold

    def required_captures(self) -> list[Requirement]:
        return [Requirement("losses")]

    def invoke_at_step(self, step: int) -> bool:
        for name in Selection(("losses",), None, ()).names(self.base_trial, step):
            value = float(self.base_trial.tensor(name).value(step))
            if value > self.threshold:
                return self.fire(step, f"{name} = {value:.4g} > {self.threshold:g}", [name])
        return False


def _train_rising_loss(
    hook: ttt.Hook, model: nn.Module, opt: torch.optim.Optimizer, steps: int, broken: Path | None = None
) -> list[float]:
    """Train ``steps`` steps whose loss grows with the step (the rate is 0: the weights stay); returns the losses
    the framework computed. With ``broken``, the trial's shards folder is replaced by a file after step 1, so
    publishing fails (a full disk, a quota). Stops at ``StopTrainingRequested``."""
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    losses: list[float] = []
    try:
        for i in range(steps):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean() * (i + 1)
            losses.append(loss.item())
            loss.backward()
            opt.step()
            if broken is not None and i == 1:
                hook.flush()
                shutil.rmtree(broken / "shards")
                (broken / "shards").write_text("in the way")
    except tensortap.StopTrainingRequested:
        pass
    hook.close()
    return losses


def _linear() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.0)


# ------------------------------------------------------------------ actions
class Unreachable(Action):
    """A notifier whose webhook cannot be reached."""

    def __call__(self, rule: Rule, verdict: Verdict, trial: Any) -> None:
        raise ConnectionError("webhook unreachable")

    def __repr__(self) -> str:
        return "Unreachable()"


def test_an_action_that_raises_is_logged_and_the_rule_still_stops_the_training(
    tmp_path: Path, torch_one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing notifier switched the rule off: its StopTraining never ran and the log blamed the rule."""
    model, opt = _linear()
    rule = LossAbove(threshold=5.0).add_action(Unreachable()).add_action(StopTraining())
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, raise_on_stop=True, rules=[rule])
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        losses = _train_rising_loss(hook, model, opt, 12)
    first = next(i for i, v in enumerate(losses) if v > 5.0)
    assert rule.fired_steps[0] == first
    assert len(losses) == first + 2  # PyTorch stops at the next batch
    trial = tensortap.create_trial(tmp_path)
    assert trial.end_reasons() == {"worker_0": "stop_request"} and trial.stop_request()["step"] == first
    messages = [r.getMessage() for r in caplog.records]
    assert not any("switched off" in m for m in messages), messages
    failed = [m for m in messages if "action Unreachable() of rule LossAbove failed" in m]
    assert failed and "webhook unreachable" in failed[0]


# ------------------------------------------------------------ storage error
def test_in_process_rules_go_on_after_a_storage_error_disabled_capture(
    tmp_path: Path, torch_one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing fails (the shards folder is a file): capture is disabled, and the rule still judges every
    step and stops the training at the first loss above its threshold, as the framework computed it."""
    model, opt = _linear()
    rule = LossAbove(threshold=8.0).add_action(StopTraining())
    hook = ttt.capture(
        model,
        tmp_path,
        optimizer=opt,
        save_config=EVERY_STEP,
        shard_policy=ShardPolicy(max_steps=1),
        raise_on_stop=True,
        rules=[rule],
    )
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        losses = _train_rising_loss(hook, model, opt, 15, broken=tmp_path)
    assert hook.failed
    first = next(i for i, v in enumerate(losses) if v > 8.0)
    assert first > 2  # after the failure
    assert rule.fired_steps[0] == first
    assert len(losses) == first + 2
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "capture is disabled" in error and "in-process rules go on" in error
    # nothing more was written (step 1 is recorded later); the shard of step 0 went with the folder
    assert [p.name for p in (tmp_path / "index" / "worker_0").iterdir()] == ["0000000000.json"]


# ---------------------------------------------------------- rules= checked
def _not_a_rule() -> bool:
    return False


def test_rules_entries_that_are_no_rule_instances_are_refused_at_construction(tmp_path: Path) -> None:
    """A rule's command-line name, a rule class, a function, or one rule object twice were silently ignored
    (or gave a TypeError that named nothing); the XGBoost callback found out only inside xgb.train."""
    model, opt = _linear()
    twice = ExplodingTensor()
    cases: list[tuple[Any, str]] = [
        (["exploding_tensor"], r"the string 'exploding_tensor' \(write tensortap.rules.ExplodingTensor\(\)\)"),
        ([ExplodingTensor], r"the class ExplodingTensor \(write ExplodingTensor\(\)\)"),
        ([_not_a_rule], "expected rule instances"),
        (["no_such_rule"], "the string 'no_such_rule'; built-in rules: .*ExplodingTensor"),
        ([twice, twice], "is given twice"),
        (ExplodingTensor(), r"expected a list of rule instances.*write rules=\[...\]"),
    ]
    for rules, message in cases:
        with pytest.raises(ValueError, match=r"^rules: .*" + message):
            ttt.capture(model, tmp_path / "torch", optimizer=opt, rules=rules)
        if xgb_callback is not None:
            with pytest.raises(ValueError, match=r"^rules: .*" + message):
                xgb_callback(tmp_path / "xgb", rules=rules)
    assert not (tmp_path / "torch").exists()


class TypoReduction(Rule):
    def required_captures(self) -> list[Requirement]:
        return [Requirement("gradients", ("abs_meen",))]

    def invoke_at_step(self, step: int) -> bool:
        return False


@pytest.mark.parametrize("reduction_config", [None, ReductionConfig(reductions=["mean"])])
def test_a_reduction_a_rule_requires_that_does_not_exist_names_the_rule(
    tmp_path: Path, reduction_config: ReductionConfig | None
) -> None:
    """Without a reduction_config the rule was switched off at step 0; with one, the error named neither the
    rule nor required_captures."""
    model, opt = _linear()
    with pytest.raises(ValueError, match=r"^rules: TypoReduction.required_captures\(\): .*'abs_meen'.*abs_mean"):
        ttt.capture(model, tmp_path, optimizer=opt, reduction_config=reduction_config, rules=[TypoReduction()])


# ------------------------------------------------------------- MemoryTrial
class TrialApi(Rule):
    """Fires where the loss exceeds ``threshold``, reading it through more of the Trial API."""

    def __init__(self, base_trial: Any = None, threshold: float = 5.0) -> None:
        super().__init__(base_trial)
        self.threshold = threshold

    def required_captures(self) -> list[Requirement]:
        return [Requirement("losses"), Requirement("weights", ("l2",))]

    def invoke_at_step(self, step: int) -> bool:
        t = self.base_trial
        loss = t.tensor("losses/loss")
        assert t.workers() == ["worker_0"]
        assert t.last_complete_step() >= step
        assert t.has_passed_step(step) is StepState.AVAILABLE
        assert "losses/loss" in t.collections()["losses"].tensor_names
        assert t.collection("weights").name == "weights"
        assert loss.shape(step) == ()
        assert step in loss.values()
        assert step in t.tensor("weight").reduction_values("l2")
        assert t.tensor("weight").shape(step) == (1, 4)
        value = float(loss.values()[step])
        return self.fire(step, f"loss {value:.4g}") if value > self.threshold else False


def test_a_custom_rule_using_more_of_the_trial_api_judges_in_process_as_offline(
    tmp_path: Path, torch_one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    """shape, workers, values, reduction_values, last_complete_step, has_passed_step and collections were
    missing in-process: the rule was switched off at step 0 and the training went on unguarded."""
    model, opt = _linear()
    rule = TrialApi()
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, rules=[rule])
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        losses = _train_rising_loss(hook, model, opt, 8)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    expected = [i for i, v in enumerate(losses) if v > 5.0]
    assert expected and rule.fired_steps == expected
    assert invoke_rule(TrialApi(tensortap.create_trial(tmp_path))) == expected


def test_the_trial_methods_in_process_rules_lack_say_so_and_collections_agree_with_the_trial(
    tmp_path: Path, torch_one_thread: None
) -> None:
    model, opt = _linear()
    rule = LossAbove()
    hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, rules=[rule])
    _train_rising_loss(hook, model, opt, 2)
    memory, trial = rule.base_trial, tensortap.create_trial(tmp_path)
    with pytest.raises(AttributeError, match=r"MemoryTrial.to_pandas is not available to in-process rules.*steps,"):
        memory.to_pandas()
    with pytest.raises(AttributeError, match=r"MemoryTensor.histogram_value is not available .*reduction_values"):
        memory.tensor("losses/loss").histogram_value(0)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_method'"):
        memory.no_such_method()
    # a collection the trial lacks raises in both; one saved raises in neither
    for t in (memory, trial):
        with pytest.raises(UnknownName, match="no collection 'no_such'"):
            t.tensor_names(collection="no_such")
        assert t.tensor_names(collection="losses") == ["losses/loss"]
    assert memory.tensor_names(collection="metrics") == trial.tensor_names(collection="metrics") == []
    assert memory.has_passed_step(5) is StepState.UNAVAILABLE  # the training has ended


# -------------------------------------------------------------- regexes
def test_a_regex_collection_that_matches_nothing_is_warned_about_at_the_close(
    tmp_path: Path, torch_one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = _linear()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for name, kwargs in [
            ("a", {"include_regex": ["nomatch"]}),
            ("b", {"collection_configs": {"mine": {"include_regex": ["zzz"]}}, "include_collections": ["mine"]}),
            ("c", {"include_regex": ["^weight$"]}),
        ]:
            hook = ttt.capture(model, tmp_path / name, optimizer=opt, save_config=EVERY_STEP, **kwargs)
            _train_rising_loss(hook, model, opt, 2)
            hook.close()
    warned = [r.getMessage() for r in caplog.records if "matched none" in r.getMessage()]
    assert len(warned) == 2
    assert warned[0].startswith("tensortap: include_regex ['nomatch'] of collection 'custom' matched none of the")
    assert "(e.g. 'bias', 'gradients/bias'" in warned[0]
    assert warned[1].startswith("tensortap: include_regex ['zzz'] of collection 'mine' matched none")


def _train_filling_mine(hook: ttt.Hook, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """Train ``steps`` steps, giving a tensor to the collection ``mine`` at each, and close ``hook``."""
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        hook.save_tensor("extra", np.ones(2), collections=["mine"])
        loss.backward()
        opt.step()
    hook.close()


def test_a_misspelled_collection_a_rule_asks_for_is_warned_about_at_the_close(
    tmp_path: Path, torch_one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 48 F2, in-process: ``collection_names=["losses", "gradiants"]`` made the hook define an empty
    collection 'gradiants', and the rule judged the losses alone without a word (offline, that is a missing
    input). One warning at the close names it with the closest collection; a collection the training fills,
    defined by the user or by a rule (``save_tensor`` into it), is not warned about."""
    model, opt = _linear()
    rule = ExplodingTensor(collection_names=["losses", "gradiants"])
    filled = ExplodingTensor(collection_names=["mine"])
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        hook = ttt.capture(model, tmp_path, optimizer=opt, save_config=EVERY_STEP, rules=[rule, filled])
        _train_filling_mine(hook, model, opt, 2)
    warned = [r.getMessage() for r in caplog.records if "a rule asked for collection" in r.getMessage()]
    assert warned == [
        "tensortap: a rule asked for collection 'gradiants', which is none of this hook's, and no tensor was given "
        "to it (did you mean 'gradients'?): the rule judged without it"
    ]
    assert rule.evaluated_steps == 2


def test_a_collection_named_among_others_that_shows_later_is_no_longer_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """review 57 R57-1: ``ExplodingTensor(collection_names=["losses", "custom_stats"])`` where the training saves
    ``custom_stats`` first at step 4 was said to lack it from step 0 (with a did-you-mean of 'custom'), and
    the entry stayed in ``missing_inputs`` after the rule read it and fired on it. Once it shows, it is no
    longer missing (one info line says so)."""
    rule = ExplodingTensor(collection_names=["losses", "custom_stats"])
    with caplog.at_level(logging.INFO, logger="tensortap"), Writer(tmp_path, rules=[rule]) as w:
        for step in range(8):
            with w.stepping():
                w.save("losses/loss", np.float32(1.0), ["losses"])
                if step >= 4:
                    w.save("custom_stats/x", np.float32(np.nan if step == 6 else 1.0), ["custom_stats"])
            if step == 3:
                assert [m.split(":")[0] for m in rule.missing_inputs] == [
                    "ExplodingTensor needs collection 'custom_stats' with reductions nan_count, inf_count (or raw "
                    "tensors)"
                ]
    assert rule.fired_steps == [6] and rule.missing_inputs == {} and not rule.lacks_inputs
    assert (
        "tensortap: ExplodingTensor needs collection 'custom_stats' with reductions nan_count, inf_count (or raw "
        "tensors) no more: the trial holds it from step 4 on" in [r.getMessage() for r in caplog.records]
    )


def test_a_collection_lacked_before_a_resume_is_no_longer_missing_once_it_shows(tmp_path: Path) -> None:
    """review 58 R58-2: the rule above, resumed from its saved state (``load_state_dict``) before
    ``custom_stats`` shows, fired on it at step 6 yet kept "needs collection 'custom_stats'" in
    ``missing_inputs``: which entries leave once their collection shows was not saved with the state."""
    w = Writer(tmp_path)

    def train(steps: range) -> None:
        for step in steps:
            with w.stepping():
                w.save("losses/loss", np.float32(1.0), ["losses"])
                if step >= 4:
                    w.save("custom_stats/x", np.float32(np.nan if step == 6 else 1.0), ["custom_stats"])

    train(range(4))
    w.flush()
    first = ExplodingTensor(tensortap.create_trial(tmp_path), collection_names=["losses", "custom_stats"])
    assert invoke_rule(first, wait=False) == [] and len(first.missing_inputs) == 1
    state = first.state_dict()
    train(range(4, 8))
    w.close()
    resumed = ExplodingTensor(tensortap.create_trial(tmp_path), collection_names=["losses", "custom_stats"])
    resumed.load_state_dict(state)
    assert invoke_rule(resumed) == [6] and resumed.missing_inputs == {} and not resumed.lacks_inputs


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 1, "world_size": 2, "include_workers": "one"}, {"save_config": SaveConfig(start_step=10)}],
    ids=["a rank that saves nothing", "no step saved"],
)
def test_a_hook_that_saved_no_step_names_no_collection_a_rule_asked_for(
    tmp_path: Path, torch_one_thread: None, caplog: pytest.LogCaptureFixture, kwargs: dict[str, Any]
) -> None:
    """Review of the warning above: a rank that saves nothing (``include_workers="one"``) and a hook that saved no
    step named a collection the training gave tensors to at every step as one no tensor was given to."""
    model, opt = _linear()
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        hook = ttt.capture(model, tmp_path, optimizer=opt, rules=[ExplodingTensor(collection_names=["mine"])], **kwargs)
        _train_filling_mine(hook, model, opt, 4)
    assert "a rule asked for collection" not in caplog.text


# ------------------------------------------------------- runs and copies
def test_a_reused_xgboost_callback_judges_each_new_run_from_scratch(tmp_path: Path) -> None:
    """The second xgb.train with the same callback went on with the first run's rule state and was stopped
    after one round. Each new run is judged by fresh copies of the rules as given; a training further of the
    same run (xgb_model=) goes on with that run's rules."""
    xgb = pytest.importorskip("xgboost")
    import tensortap.xgboost as ttx

    rs = np.random.RandomState(0)
    X = rs.randn(300, 5)
    y = X[:, 0] * 2 + rs.randn(300) * 0.5
    dtrain, dval = xgb.DMatrix(X[:200], label=y[:200]), xgb.DMatrix(X[200:], label=y[200:])

    def train(cb: ttx.Callback, **kwargs: Any) -> Any:
        return xgb.train(
            {"max_depth": 3, "eta": 0.5}, dtrain, 30, evals=[(dtrain, "train"), (dval, "validation")],
            callbacks=[cb], verbose_eval=False, **kwargs,
        )  # fmt: skip

    def overtraining() -> Rule:
        return Overtraining(patience_train=3, patience_validation=3).add_action(StopTraining())

    rule = overtraining()
    cb = ttx.Callback(tmp_path / "reused", save_config=EVERY_STEP, rules=[rule])
    fresh = overtraining()
    alone = train(ttx.Callback(tmp_path / "alone", save_config=EVERY_STEP, rules=[fresh])).num_boosted_rounds()
    assert fresh.fired_steps and alone == fresh.fired_steps[0] + 1 < 30  # stopped at the firing round

    assert train(cb).num_boosted_rounds() == alone
    assert cb.hook is not None and cb.hook.rules == [rule] and rule.fired_steps == fresh.fired_steps
    second = train(cb)
    assert second.num_boosted_rounds() == alone
    assert cb.hook is not None
    [copied] = cb.hook.rules
    assert copied is not rule and copied.fired_steps == fresh.fired_steps
    assert copied.actions[0] is rule.actions[0]  # the actions are shared
    assert rule.fired_steps == fresh.fired_steps  # the first run's verdicts stay on the rule given
    train(cb, xgb_model=second)  # training further: the same run goes on, with its rules
    assert cb.hook.rules == [copied]
    # a copy made after the trainings (sklearn's clone) could not be made: its rules held the hook's writer
    clone = copy.deepcopy(cb)
    assert train(clone).num_boosted_rounds() == alone
    assert clone.hook is not None and clone.hook.rules[0].fired_steps == fresh.fired_steps


def test_a_keras_callback_copy_judges_its_run_from_scratch(tmp_path: Path) -> None:
    """keras-tuner deep-copies the callbacks for each trial: the copies held the very same rule objects, so the
    second tuner trial went on with the first one's state and fired nowhere."""
    keras = pytest.importorskip("keras")
    import tensortap.keras as ttk

    x = np.random.RandomState(0).randn(160, 4).astype("float32")
    y = np.random.RandomState(1).randn(160, 1).astype("float32")

    def fit(cb: Any) -> None:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")  # the loss never decreases
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[cb])

    own = LossNotDecreasing(num_steps=5)
    fit(ttk.Callback(tmp_path / "own", save_config=EVERY_STEP, include_collections=["losses"], rules=[own]))
    assert own.fired_steps  # 20 batches an epoch: fires after the first check, every 5 steps

    rule = LossNotDecreasing(num_steps=5)
    cb = ttk.Callback(tmp_path / "tuned", save_config=EVERY_STEP, include_collections=["losses"], rules=[rule])
    for _ in range(2):
        copied = copy.deepcopy(cb)
        fit(copied)
        [judge] = copied.hook.rules
        assert judge is not rule and judge.fired_steps == own.fired_steps
    assert rule.fired_steps == []  # the callback given to search() trains nothing
    cb.close()
