"""Writing and running rules the way a user does: custom rules' answers, errors and state, several rules of one
name in a run, and the parameters of the built-in rules (from Python and from ``tensortap rules``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_rules_cli import rules, write_losses

import tensortap
from tensortap import RuleInputsMissing
from tensortap.rules import (
    BUILTIN_RULES,
    LossNotDecreasing,
    Requirement,
    Rule,
    RuleRunner,
    SimilarAcrossRuns,
    Verdict,
    invoke_rule,
    make_rule,
    parameters,
)

LOSSES = [1.0 + 0.5 * s for s in range(12)]  # rising: above 4 from step 7


@pytest.fixture
def trial(tmp_path: Path) -> tensortap.Trial:
    return tensortap.create_trial(write_losses(tmp_path / "rising", LOSSES))


class LossAbove(Rule):
    """The custom rule of docs/rules.md, reading ``losses/loss`` directly."""

    def __init__(self, base_trial: Any = None, threshold: float = 4.0) -> None:
        super().__init__(base_trial)
        self.threshold = threshold

    def loss(self, step: int) -> float:
        return float(self.base_trial.tensor("losses/loss").value(step))

    def invoke_at_step(self, step: int) -> bool:
        v = self.loss(step)
        return self.fire(step, f"loss {v} > {self.threshold}", ["losses/loss"]) if v > self.threshold else False


ABOVE = [s for s, v in enumerate(LOSSES) if v > 4.0]


# ----------------------------------------------------------------- what invoke_at_step returns
class Answers(LossAbove):
    """Answers ``answer(self, step, loss above the threshold)``."""

    def __init__(self, base_trial: Any, answer: Any) -> None:
        super().__init__(base_trial)
        self.answer = answer

    def invoke_at_step(self, step: int) -> Any:
        return self.answer(self, step, self.loss(step) > self.threshold)


@pytest.mark.parametrize(
    ("answer", "returned"),
    [
        (lambda r, s, above: Verdict(r.name, s, above, "loss too high"), "Verdict"),
        (lambda r, s, above: r.loss(s) - 100.0, "float"),  # "negative means fine"
        (lambda r, s, above: str(above), "str"),
        (lambda r, s, above: np.array([above, True]), "ndarray"),
        (lambda r, s, above: int(above), "int"),
    ],
)
def test_a_rule_that_answers_with_no_bool_is_refused_naming_the_rule_the_step_and_the_type(
    trial: tensortap.Trial, answer: Any, returned: str
) -> None:
    """bool() of the answer fired at every step (a Verdict that did not fire, a negative margin, "False") or
    raised numpy's "truth value of an array is ambiguous", which named neither the rule nor the step."""
    with pytest.raises(TypeError, match=rf"^Answers\.invoke_at_step returned {returned} .* at step 0; expected a bool"):
        invoke_rule(Answers(trial, answer))


def test_a_numpy_bool_or_none_is_an_answer_and_fire_without_return_is_refused(trial: tensortap.Trial) -> None:
    assert invoke_rule(Answers(trial, lambda r, s, above: np.float64(r.loss(s)) > r.threshold)) == ABOVE
    assert invoke_rule(Answers(trial, lambda r, s, above: None)) == []  # a method that ends without return
    forgot = Answers(trial, lambda r, s, above: None if not above else r.fire(s, "too high") and None)
    with pytest.raises(TypeError, match=r"at step 7; .*without returning its result: write return self\.fire"):
        invoke_rule(forgot)


# ----------------------------------------------------------------- errors of the rule's own code
def test_a_rule_reading_past_the_end_of_the_training_does_not_end_invoke_rule(trial: tensortap.Trial) -> None:
    """SPEC §5: invoke_rule never ends by raising NoMoreData. A rule that reads the next step raised it out of
    invoke_rule at the last step, losing every firing before. Now that step is not judged, and said so."""

    class RoseNext(LossAbove):
        def invoke_at_step(self, step: int) -> bool:
            return self.loss(step + 1) > self.loss(step)

    rule = RoseNext(trial)
    assert invoke_rule(rule) == list(range(11))
    assert not rule.lacks_inputs and rule.evaluated_steps == 12
    [(message, first)] = rule.missing_inputs.items()
    assert first == 11 and message.startswith("RoseNext cannot judge the steps where what it reads is missing (NoMore")


def test_an_error_of_a_rule_keeps_its_type_and_names_the_rule_and_the_step(trial: tensortap.Trial) -> None:
    class Broken(LossAbove):
        def invoke_at_step(self, step: int) -> bool:
            return {"a": 1}["b"] == step if step == 3 else False

    with pytest.raises(KeyError) as raised:
        invoke_rule(Broken(trial))
    assert raised.value.__notes__ == ["tensortap: raised by rule Broken (Broken.invoke_at_step) at step 3"]


# ----------------------------------------------------------------- state
class Seen(LossAbove):
    """Fires where the loss rose by more than 40% over 3 steps; keeps ``seen`` as its state."""

    state_attrs = ("seen",)

    def __init__(self, base_trial: Any = None, key: Any = str) -> None:
        super().__init__(base_trial)
        self.key = key
        self.seen: dict[Any, Any] = {}

    def invoke_at_step(self, step: int) -> bool:
        v = self.seen[self.key(step)] = self.loss(step)
        before = self.seen.get(self.key(step - 3))
        return before is not None and v > 1.4 * before


def test_a_state_round_trip_fires_at_the_steps_of_one_run(trial: tensortap.Trial) -> None:
    one = invoke_rule(Seen(trial))
    first = Seen(trial)
    part = invoke_rule(first, end_step=6)
    second = Seen(trial)
    second.load_state_dict(first.state_dict())
    assert one == [3, 4, 5, 6, 7, 8] and part + invoke_rule(second) == one


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        (int, None, r"seen has the key 0 \(int\), which JSON turns into a string"),
        (str, np.float32(1.5), r"seen\['0'\] holds float32 .*1\.5.*, which JSON does not give back as it is"),
        (str, (1.0, 2.0), r"seen\['0'\] holds tuple \(1\.0, 2\.0\)"),
    ],
)
def test_a_state_that_would_not_come_back_unchanged_is_refused_naming_the_rule_and_the_attribute(
    trial: tensortap.Trial, key: Any, value: Any, problem: str
) -> None:
    """Int keys came back as strings: the resumed rule lost steps 10-12 (hunt 15, M2); a NumPy value raised
    json's TypeError, which named neither the rule nor the attribute."""
    rule = Seen(trial, key=key)
    invoke_rule(rule, end_step=5)
    if value is not None:
        rule.seen = {"0": value}
    with pytest.raises(TypeError, match=rf"^Seen\.state_dict\(\): state attribute {problem}"):
        rule.state_dict()


# ----------------------------------------------------------------- several rules in a run
def test_rules_of_one_name_keep_their_own_results(trial: tensortap.Trial) -> None:
    """RuleInputsMissing's dicts were keyed by name: the user's rule's firings were lost ({name: []})."""

    class LossNotDecreasing(LossAbove):
        """A user's rule named like a built-in one."""

    mine = LossNotDecreasing(trial)
    builtin = make_rule("loss_not_decreasing:tensor_regex=zzz,use_losses_collection=false", trial)
    assert mine.name == builtin.name
    with pytest.raises(RuleInputsMissing) as raised:
        RuleRunner(trial, [mine, builtin]).run()
    assert raised.value.fired == {"LossNotDecreasing #1": ABOVE, "LossNotDecreasing #2": []}
    assert raised.value.missing == {
        "LossNotDecreasing #2": ["LossNotDecreasing #2 needs a tensor of regex(es) zzz: none in the trial"]
    }
    assert (
        str(raised.value)
        == "LossNotDecreasing #2 found none of its inputs: it needs a tensor of regex(es) zzz: none in the trial"
    )


def test_the_same_rule_object_twice_is_refused(trial: tensortap.Trial) -> None:
    """It was evaluated twice a step: fired steps listed twice, evaluated_steps doubled."""
    rule = LossAbove(trial)
    with pytest.raises(ValueError, match=r"^rules: rule 2 is rule 1 again \(the same <LossAbove rule> object\)"):
        RuleRunner(trial, [rule, rule])
    other = LossAbove(trial)
    assert RuleRunner(trial, [rule, other]).run() == {rule: ABOVE, other: ABOVE}


def test_the_command_reports_each_of_two_rules_of_one_name(trial: tensortap.Trial) -> None:
    """The first rule fired at step 10, yet was reported as "found none of its inputs" (its JSON status
    inputs_missing with fired_steps [10]) because the second, of the same name, found none."""
    specs = ["loss_not_decreasing", "loss_not_decreasing:tensor_regex=zzz,use_losses_collection=false"]
    argv = [a for spec in specs for a in ("--rule", spec)]
    text = rules(trial.path, *argv)
    assert text.returncode == 2, text.stderr
    first, second = text.stdout.splitlines()
    assert first.startswith("LossNotDecreasing (loss_not_decreasing): fired at 10 (1 step); at step 10: ")
    needs = "needs a tensor of regex(es) zzz: none in the trial"
    assert second == f"LossNotDecreasing ({specs[1]}): found none of its inputs: it {needs}"
    out = json.loads(rules(trial.path, *argv, "--json").stdout)["rules"]
    assert [(r["spec"], r["status"], r["fired_steps"]) for r in out] == [
        (specs[0], "fired", [10]),
        (specs[1], "inputs_missing", []),
    ]


# ----------------------------------------------------------------- parameters
FLOAT_PARAMETERS = [
    (name, p.name) for name, cls in BUILTIN_RULES.items() for p in parameters(cls) if "float" in p.annotation
]


@pytest.mark.parametrize(("rule", "parameter"), FLOAT_PARAMETERS)
@pytest.mark.parametrize("text", ["nan", "inf"])
def test_a_number_parameter_that_is_not_finite_is_refused(
    trial: tensortap.Trial, rule: str, parameter: str, text: str
) -> None:
    """NaN was accepted by every one of them: no value compares with it, so the rule never fired (exit 0)."""
    with pytest.raises(ValueError, match=rf"^{parameter}: expected a finite number, got '{text}'"):
        make_rule(f"{rule}:{parameter}={text}", trial)


def test_a_number_parameter_that_is_not_finite_is_refused_from_python(trial: tensortap.Trial) -> None:
    with pytest.raises(ValueError, match=r"^diff_percent: expected a finite number, got nan$"):
        LossNotDecreasing(trial, diff_percent=math.nan)
    with pytest.raises(ValueError, match=r"^rtol: expected a finite number >= 0, got nan$"):
        SimilarAcrossRuns(trial, other_trials=trial, rtol=math.nan)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("loss_not_decreasing:diff_percent=nan", "diff_percent: expected a finite number, got 'nan'"),
        ("loss_not_decreasing:num_steps=5,num_steps=6", "parameter num_steps given twice ('5', then '6')"),
    ],
)
def test_the_command_refuses_a_nan_or_a_parameter_given_twice(trial: tensortap.Trial, spec: str, message: str) -> None:
    result = rules(trial.path, "--rule", spec)
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.splitlines()
    assert line.startswith(f"tensortap rules: --rule {spec!r}: ") and line.endswith(message)


def test_a_rule_reading_tensors_by_regex_says_what_it_searched(trial: tensortap.Trial) -> None:
    """It said it "needs collection 'weights'", a collection it never searched."""
    with pytest.raises(RuleInputsMissing, match=r"^ExplodingTensor found none of its inputs: it needs a tensor of "):
        invoke_rule(make_rule("exploding_tensor:tensor_regex=zzz", trial))


# ----------------------------------------------------------------- requirements
def test_a_requirement_with_an_unknown_reduction_is_refused_naming_the_collection() -> None:
    """It was accepted, and failed at the first step of an in-process rule (switching the rule off)."""
    with pytest.raises(
        ValueError, match=r"^no reduction 'abs_meen' \(Requirement\('gradients'\) reductions\); did you mean 'abs_mean'"
    ):
        Requirement("gradients", ("abs_meen",))
    with pytest.raises(ValueError, match=r"reductions: expected a tuple of reduction keys, got the string 'abs_mean'"):
        Requirement("gradients", "abs_mean")  # type: ignore[arg-type]
    assert Requirement("gradients", ("abs_mean", "l2", "nan_count")).reductions == ("abs_mean", "l2", "nan_count")


class SmdebugStyle(Rule):
    """A custom rule ported from smdebug, whose ``Rule.__init__(base_trial, action_str, other_trials=None)``
    needs ``action_str``."""

    def __init__(self, base_trial: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_trial, *args, **kwargs)

    def invoke_at_step(self, step: int) -> bool:
        return False


@pytest.mark.parametrize(
    ("args", "kwargs", "given"),
    [
        ((), {"action_str": ""}, "action_str"),
        (("",), {}, "action_str"),
        ((), {"other_trials": []}, "other_trials"),
        (("", []), {}, "action_str and other_trials"),
    ],
)
def test_smdebug_arguments_of_rule_init_say_what_to_write(
    trial: tensortap.Trial, args: tuple[Any, ...], kwargs: dict[str, Any], given: str
) -> None:
    """hunt 37 F5: ``super().__init__(base_trial, action_str="")``, as every smdebug custom rule writes it,
    raised a bare ``TypeError: Rule.__init__() got an unexpected keyword argument 'action_str'``."""
    with pytest.raises(
        TypeError, match=rf"^SmdebugStyle: Rule.__init__ takes only base_trial, not smdebug's {given}: .*add_action"
    ):
        SmdebugStyle(trial, *args, **kwargs)
    assert SmdebugStyle(trial).base_trial is trial
