"""``tensortap rules``: exit codes, --json, --list, --follow and --stop-training."""

from __future__ import annotations

import html
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import strict_json

import tensortap
from tensortap import ReductionConfig, SaveConfig
from tensortap.capture import ShardPolicy, Writer
from tensortap.rules import BUILTIN_RULES, parameters


def write_losses(path: Path, values: list[float]) -> Path:
    with Writer(path) as w:
        for v in values:
            with w.stepping():
                w.save("losses/loss", np.float32(v), ["losses"])
    return path


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    return write_losses(tmp_path / "flat", [1.0] * 12)


@pytest.fixture
def falling(tmp_path: Path) -> Path:
    return write_losses(tmp_path / "falling", [1.0 - 0.05 * s for s in range(12)])


def rules(*args: str, command: str = "rules") -> subprocess.CompletedProcess[str]:
    """``python -m tensortap.cli rules ARGS`` (or another ``command``), run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "tensortap.cli", command, *args], capture_output=True, text=True, timeout=120
    )


def test_list_prints_every_rule_with_its_parameters_as_plain_text() -> None:
    result = rules("--list")
    assert result.returncode == 0
    out = result.stdout
    for name, cls in BUILTIN_RULES.items():
        assert f"{name} ({cls.__name__}): " in out
        for p in parameters(cls):
            assert f"    {p.name}=" in out
    assert "    threshold=1e-07 (float): Mean absolute gradient below which a gradient has vanished." in out
    assert "loss_not_decreasing (LossNotDecreasing): Fires when a loss has not decreased enough over num_steps" in out
    for markup in ("``", ":class:`", ":meth:`", ":func:`"):
        assert markup not in out
    entries = strict_json(rules("--list", "--json").stdout)
    assert [e["name"] for e in entries] == list(BUILTIN_RULES)
    # defaults are JSON values (they were Python reprs: "None", "1e-07", "'tanh'"), null for None
    params = {(e["name"], p["name"]): p for e in entries for p in e["parameters"]}
    assert params["vanishing_gradient", "threshold"] == {
        "name": "threshold",
        "required": False,
        "default": 1e-07,
        "type": "float",
        "description": "Mean absolute gradient below which a gradient has vanished. Default 1e-7.",
    }
    assert {p["required"] for p in params.values()} == {False}  # the trial is given by the command line
    defaults = {key: p["default"] for key, p in params.items()}
    assert defaults["saturated_activation", "tanh_regex"] == "tanh"
    assert defaults["exploding_tensor", "collection_names"] is None
    assert defaults["saturated_activation", "threshold_tanh"] == [-9.4999, 9.4999]
    assert defaults["unchanged_tensor", "equal_nan"] is False
    assert "``" not in json.dumps(entries)


def test_exit_0_when_nothing_fires_and_1_when_a_rule_fires(falling: Path, flat: Path) -> None:
    result = rules(str(falling), "--rule", "loss_not_decreasing")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "LossNotDecreasing: did not fire (12 steps up to step 11)\n"
    result = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5")
    assert result.returncode == 1 and result.stderr == ""
    verbose = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5", "-v")
    assert verbose.stdout == result.stdout
    assert "tensortap: rule LossNotDecreasing fired at step 10: losses/loss: loss 1" in verbose.stderr
    assert result.stdout == (
        "LossNotDecreasing: fired at 5, 10 (2 steps); at step 5: losses/loss: loss 1 at TRAIN step 5 (mean of 5 "
        "saved steps) did not change from 1 at TRAIN step 0 (num_steps 5; needs a decrease > 0%)\n"
    )


def test_fired_steps_read_as_ranges_one_line_per_rule(tmp_path: Path) -> None:
    bad = {17, 18, 19, 40}
    write_losses(tmp_path, [float("nan") if s in bad else 1.0 for s in range(50)])
    # all_zero leaves out losses unless asked (zero is a loss value, not a fault)
    result = rules(str(tmp_path), "--rule", "exploding_tensor", "--rule", "all_zero:collection_names=losses")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "ExplodingTensor: fired at 17-19, 40 (4 steps); at step 17: losses/loss: 1 NaN and 0 infinite value(s) "
        "at step 17",
        "AllZero: did not fire (50 steps up to step 11)".replace("11", "49"),
    ]


def test_a_rising_loss_reads_rose(tmp_path: Path) -> None:
    write_losses(tmp_path, [1.0] * 5 + [1.016] * 5)
    result = rules(str(tmp_path), "--rule", "loss_not_decreasing:num_steps=5,window=1")
    assert result.returncode == 1
    assert "loss 1.016 at TRAIN step 5 rose 1.6% from 1 at TRAIN step 0" in result.stdout


def report_rows(page: str) -> dict[str, tuple[str, str]]:
    """The rules table of a report: ``{rule: (verdict, reason)}``, as text."""
    rows = re.findall(r"<tr><td>([^<]*)</td><td><span class='\w+'>([^<]*)</span></td><td>([^<]*)</td></tr>", page)
    return {rule: (verdict, html.unescape(reason)) for rule, verdict, reason in rows}


def test_rules_and_report_agree_on_a_rule_that_judged_nothing(tmp_path: Path) -> None:
    """Hunt 33 H1 and M4: with one EVAL step (no gradient there) a rule of gradients that found none of its
    inputs passed (`rules` exit 0, status "passed"), while `report` said it "could not judge" and exited 0; a
    rule that judged some inputs and lacked others was "could not judge" in the report and passed in `rules`.
    Both now give the status of :func:`rule_status`, and both exit 2 for the rule that judged nothing."""
    pytest.importorskip("matplotlib")
    config = ReductionConfig(reductions=["mean", "nan_count"])  # no abs_mean, no inf_count, no raw tensor
    with Writer(tmp_path / "run", reduction_config=config) as w:
        for s in range(5):
            with w.stepping(mode="EVAL" if s == 2 else "TRAIN"):
                w.save("losses/loss", np.float32(1.0 - 0.1 * s), ["losses"])
                if s != 2:  # no backward while evaluating
                    w.save("gradients/fc.weight", np.full(3, 1e-3), ["gradients"])
    run = str(tmp_path / "run")
    result = rules(run, "--rule", "vanishing_gradient", "--rule", "exploding_tensor", "--json")
    assert result.returncode == 2, result.stdout
    answer = strict_json(result.stdout)
    assert [r["status"] for r in answer["rules"]] == ["inputs_missing", "passed"]
    assert answer["inputs_missing"] is True and "VanishingGradient needs" in answer["error"]["message"]
    page = tmp_path / "r.html"
    result = rules(run, "--rule", "vanishing_gradient", "--rule", "exploding_tensor", "-o", str(page), command="report")
    assert result.returncode == 2 and result.stdout == f"wrote {page}\n", result.stderr
    assert result.stderr.splitlines()[-1].startswith("tensortap report: VanishingGradient needs collection 'gradients'")
    rows = report_rows(page.read_text(encoding="utf-8"))
    assert rows["vanishing_gradient"][0] == "could not judge"
    verdict, reason = rows["exploding_tensor"]
    assert verdict == "did not fire" and reason.startswith("evaluated 5 step(s) up to step 4; it lacked some inputs")


def test_rules_and_report_on_a_trial_without_a_step_exit_2(tmp_path: Path) -> None:
    """Hunt 33 M4: `report` of a trial with no step said each rule "did not fire, evaluated up to step -1" and
    exited 0, while `rules` exited 2 (with each rule's status "passed"). Both now say it judged nothing."""
    pytest.importorskip("matplotlib")
    with Writer(tmp_path / "empty"):
        pass
    empty = str(tmp_path / "empty")
    result = rules(empty, "--rule", "all_zero", "--json")
    answer = strict_json(result.stdout)
    assert result.returncode == 2 and [r["status"] for r in answer["rules"]] == ["no_step"]
    page = tmp_path / "r.html"
    result = rules(empty, "--rule", "all_zero", "-o", str(page), "--json", command="report")
    assert result.returncode == 2, result.stderr
    answer = strict_json(result.stdout)
    message = f"no complete step to judge in {empty}: the training ended without saving one"
    assert answer["output"] == str(page) and answer["error"]["message"] == message
    assert result.stderr == f"tensortap report: {message}\n"
    assert report_rows(page.read_text(encoding="utf-8")) == {"all_zero": ("judged nothing", "no step evaluated")}


def test_a_rule_that_finds_none_of_its_inputs_exits_2(flat: Path) -> None:
    result = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5", "--rule", "vanishing_gradient")
    assert result.returncode == 2, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("LossNotDecreasing: fired at 5, 10 (2 steps)")
    assert lines[1] == (
        "VanishingGradient: found none of its inputs: it needs collection 'gradients' with reductions abs_mean "
        "(or raw tensors): no tensor of collection(s) gradients in the trial"
    )
    assert "Traceback" not in result.stderr
    result = rules(str(flat), "--rule", "vanishing_gradient", "--json")
    assert result.returncode == 2
    report = strict_json(result.stdout)
    assert report["inputs_missing"] is True and report["rules"][0]["status"] == "inputs_missing"
    # exit 2 with --json: the result carries the error object every --json command gives then
    assert report["error"]["kind"] == "input" and "collection 'gradients'" in report["error"]["message"]


def test_a_trial_with_no_step_to_judge_exits_2(tmp_path: Path) -> None:
    w = Writer(tmp_path)  # started, nothing saved yet
    try:
        result = rules(str(tmp_path), "--rule", "exploding_tensor")
        as_json = rules(str(tmp_path), "--rule", "exploding_tensor", "--json")
        followed = rules(str(tmp_path), "--rule", "exploding_tensor", "--follow", "--idle-timeout", "1")
    finally:
        w.close()
    assert result.returncode == as_json.returncode == followed.returncode == 2
    assert "no complete step to judge" in result.stderr and "use --follow" in result.stderr
    report = strict_json(as_json.stdout)  # found by the second hostile-input audit: no error object
    assert report["rules"][0]["evaluated_steps"] == 0
    assert report["error"] == {
        "command": "rules",
        "kind": "input",
        "message": f"no complete step to judge in {tmp_path} (is the training still starting? use --follow)",
    }
    assert "before the idle timeout" in followed.stderr and "use --follow" not in followed.stderr
    # ended with no step: --follow ends at once and says why (it said "before the idle timeout", none given)
    ended = rules(str(tmp_path), "--rule", "exploding_tensor", "--follow")
    assert ended.returncode == 2
    assert f"no complete step to judge in {tmp_path}: the training ended without saving one" in ended.stderr


def test_json_output(flat: Path) -> None:
    result = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5,diff_percent=0.5", "--json")
    assert result.returncode == 1
    report = strict_json(result.stdout)
    assert report["fired"] is True and report["training_ended"] is True and report["stop_request"] is None
    assert report["interrupted"] is False and report["inputs_missing"] is False
    (rule,) = report["rules"]
    assert rule["rule"] == "LossNotDecreasing" and rule["fired_steps"] == [5, 10] and rule["status"] == "fired"
    assert rule["fired_ranges"] == "5, 10" and rule["last_step"] == 11
    assert rule["spec"] == "loss_not_decreasing:num_steps=5,diff_percent=0.5"
    assert rule["verdicts"][0]["tensors"] == ["losses/loss"] and rule["missing_inputs"] == []
    result = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5", "--end-step", "8", "--json")
    assert strict_json(result.stdout)["rules"][0]["fired_steps"] == [5]


def test_stop_training_writes_the_request(flat: Path) -> None:
    result = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5", "--stop-training", "--json")
    assert result.returncode == 1
    req = strict_json(result.stdout)["stop_request"]
    assert req["rule"] == "LossNotDecreasing" and req["step"] == 5
    assert tensortap.create_trial(flat).stop_request()["step"] == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rule", "loss_not_decreasing"], "PATH is required"),
        (["{path}"], "give at least one --rule"),
        (["{path}", "--rule", "no_such_rule"], "no built-in rule 'no_such_rule' (valid: all_zero, class_imbalance"),
        (["{path}", "--rule", "vanishing_gradient:thresh=1"], "no parameter 'thresh' of VanishingGradient; did you"),
        (["{path}", "--rule", "loss_not_decreasing:num_steps=abc"], "num_steps: expected int, got 'abc'"),
        (["{path}", "--rule", "loss_not_decreasing:num_steps=0"], "num_steps: expected an integer >= 1, got 0"),
        (["{path}", "--rule", "tensor_variance"], "give max_threshold and/or min_threshold"),
        (["{path}", "--rule", "dead_relu:threshold_layer"], "expected param=value"),
        (["{path}", "--rule", "exploding_tensor:tensor_regex=a("], "'a(' is not a valid regular expression"),
        (["{path}/missing", "--rule", "all_zero"], "no tensortap trial at"),
        (["{path}", "--rule", "tensor_variance:min_threshold=5,max_threshold=1"], "min_threshold 5 > max_threshold 1"),
        (["{path}", "--rule", "all_zero", "--start-step", "-5"], "--start-step: expected a step >= 0, got -5"),
        (["{path}", "--rule", "all_zero", "--end-step", "-1"], "--end-step: expected a step >= 0, got -1"),
        (["{path}", "--rule", "all_zero", "--idle-timeout", "-1"], "--idle-timeout: expected seconds >= 0, got -1"),
        # hunt 44 F3: percentages above 100, fractions above 1, an empty band: a rule that never fires, or always
        (
            ["{path}", "--rule", "dead_relu:threshold_layer=150"],
            "threshold_layer: expected a finite number in [0, 100]",
        ),
        (["{path}", "--rule", "dead_relu:threshold_inactivity=101"], "threshold_inactivity: expected a finite number"),
        (["{path}", "--rule", "saturated_activation:threshold_layer=101"], "threshold_layer: expected a finite number"),
        (["{path}", "--rule", "all_zero:threshold=150"], "threshold: expected a finite number in [0, 100], got 150"),
        (["{path}", "--rule", "class_imbalance:threshold_misprediction=5"], "threshold_misprediction: expected a"),
        (["{path}", "--rule", "confusion:min_diag=3"], "min_diag: expected a finite number in [0, 1], got 3"),
        (["{path}", "--rule", "confusion:max_off_diag=2"], "max_off_diag: expected a finite number in [0, 1], got 2"),
        (
            ["{path}", "--rule", "feature_importance_overweight:threshold=2"],
            "threshold: expected a finite number in [0, 1]",
        ),
        (["{path}", "--rule", "weight_update_ratio:small_threshold=20"], "small_threshold 20 >= large_threshold 10"),
    ],
)
def test_usage_errors_exit_2(flat: Path, argv: list[str], message: str) -> None:
    result = rules(*(a.format(path=flat) for a in argv))
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_wrong_other_trials_is_a_usage_error_naming_the_rule_and_parameter(flat: Path) -> None:
    """hunt 48 F7: ``similar_across_runs:other_trials=`` a path with no trial gave the error of a wrong PATH
    (``tensortap rules: no tensortap trial at ...``, ``--json`` kind ``not_found``) though PATH was right, naming
    neither the rule nor the parameter. It is a usage error of the spec now, as other parameter errors are."""
    spec = f"similar_across_runs:other_trials={flat}/none"
    result = rules(str(flat), "--rule", spec)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"tensortap rules: --rule {spec!r}: other_trials: no tensortap trial at {flat}/none: nothing exists there\n"
    )
    error = strict_json(rules(str(flat), "--rule", spec, "--json").stdout)["error"]
    assert error["kind"] == "usage" and error["message"].startswith(f"--rule {spec!r}: other_trials: no tensortap")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--start-step", "1000"], "no step from step 1000 in "),
        (["--start-step", "10", "--end-step", "5"], "no step from step 10 before step 5 in "),
    ],
)
def test_an_empty_step_range_of_an_ended_trial_says_so(flat: Path, argv: list[str], message: str) -> None:
    """The hint "is the training still starting? use --follow" was given for a training that had ended."""
    result = rules(str(flat), "--rule", "loss_not_decreasing", *argv)
    assert result.returncode == 2
    assert message in result.stderr and "(its steps: 0-11)" in result.stderr, result.stderr
    assert "use --follow" not in result.stderr


def test_rules_that_could_judge_no_step_exit_2(tmp_path: Path) -> None:
    """hunt 44 F5: on a trial of one step (or weights saved every 10 steps with ``num_steps=5``), rules that
    compare steps judged none, and said "did not fire", exit 0. They say what they lacked now, exit 2."""
    with Writer(tmp_path / "sparse", save_config=SaveConfig(save_interval=10)) as w:
        for _ in range(21):
            with w.stepping():
                w.save("fc.weight", np.ones(4), ["weights"])
                w.save("losses/loss", np.float32(1.0), ["losses"])
    result = rules(str(tmp_path / "sparse"), "--rule", "weight_update_ratio:num_steps=5", "--rule", "unchanged_tensor")
    assert result.returncode == 2, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "WeightUpdateRatio: found none of its inputs: it needs weights saved at "
        "most num_steps=5 steps apart (parameter num_steps): saved 10 steps apart at the closest; raise num_steps, "
        "or save weights more often"
    )
    assert lines[1].startswith("UnchangedTensor: fired at 20")
    one = write_losses(tmp_path / "one", [1.0])
    result = rules(str(one), "--rule", "loss_not_decreasing", "--json")
    assert result.returncode == 2
    (rule,) = strict_json(result.stdout)["rules"]
    assert rule["status"] == "inputs_missing" and "its saved steps span 0 step(s) at most" in rule["missing_inputs"][0]


def test_two_rules_of_one_class_say_which_spec_each_line_is(flat: Path) -> None:
    result = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5", "--rule", "loss_not_decreasing")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("LossNotDecreasing (loss_not_decreasing:num_steps=5): fired at 5, 10")
    assert lines[1].startswith("LossNotDecreasing (loss_not_decreasing): fired at 10")
    single = rules(str(flat), "--rule", "loss_not_decreasing:num_steps=5")
    assert single.stdout.startswith("LossNotDecreasing: fired"), "one rule of its class: its name is enough"


def test_param_values_are_parsed_by_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with Writer(tmp_path) as w:
        with w.stepping():
            w.save("inputs/tanh", rng.normal(0, 3, (64, 4)), ["inputs"])
    assert rules(str(tmp_path), "--rule", "saturated_activation").returncode == 0
    result = rules(str(tmp_path), "--rule", "saturated_activation:threshold_tanh=-0.5,0.5,threshold_inactivity=90")
    assert result.returncode == 1
    assert "inputs/tanh: 100% of its 4 tanh units are saturated (input outside (-0.5, 0.5)" in result.stdout
    result = rules(str(tmp_path), "--rule", "exploding_tensor:only_nan=maybe")
    assert result.returncode == 2 and "only_nan: expected true or false, got 'maybe'" in result.stderr


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tensortap.cli", "rules", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_follow_runs_until_the_training_ends(tmp_path: Path) -> None:
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1, max_seconds=0.2))
    proc = cli(str(tmp_path), "--rule", "exploding_tensor", "--follow", "--json")
    time.sleep(1.0)
    for s in range(10):
        with w.stepping():
            w.save("losses/loss", np.float32(float("nan") if s == 6 else 1.0), ["losses"])
        time.sleep(0.05)
    w.close()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    report = json.loads(out)
    assert report["rules"][0]["fired_steps"] == [6] and report["rules"][0]["last_step"] == 9
    assert report["training_ended"] is True


def test_follow_stop_training_stops_a_writer_in_another_process(tmp_path: Path) -> None:
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1, max_seconds=0.2))
    proc = cli(str(tmp_path), "--rule", "exploding_tensor", "--follow", "--stop-training")
    stopped_at: list[int] = []

    def train() -> None:
        for s in range(400):
            with w.stepping():
                w.save("losses/loss", np.float32(float("inf") if s >= 20 else 1.0), ["losses"])
            if w.should_stop:
                stopped_at.append(s)
                break
            time.sleep(0.02)
        w.close()

    t = threading.Thread(target=train)
    t.start()
    t.join(60)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert stopped_at and 20 <= stopped_at[0] < 20 + 150, stopped_at
    trial = tensortap.create_trial(tmp_path)
    assert trial.end_reasons() == {"worker_0": "stop_request"}
    assert trial.stop_request()["rule"] == "ExplodingTensor" and trial.stop_request()["step"] == 20
    assert "ExplodingTensor fired at step 20: losses/loss: 0 NaN and 1 infinite value(s) at step 20" in out


def test_ctrl_c_during_follow_prints_what_was_evaluated_and_exits_130(tmp_path: Path) -> None:
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1, max_seconds=0.2))
    try:
        proc = cli(
            str(tmp_path), "--rule", "exploding_tensor", "--rule", "all_zero:collection_names=losses", "--follow"
        )
        for s in range(5):
            with w.stepping():
                w.save("losses/loss", np.float32(float("nan") if s == 3 else 1.0), ["losses"])
        w.flush()
        assert proc.stdout is not None
        live = proc.stdout.readline()  # printed when the rule first fires, while the training runs
        assert live.startswith("ExplodingTensor fired at step 3: losses/loss: 1 NaN"), live
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        w.close()
    assert proc.returncode == 130, err
    lines = out.splitlines()
    assert lines[0].startswith("ExplodingTensor: fired at 3 (1 step); at step 3: losses/loss: 1 NaN")
    assert lines[1].startswith("AllZero: did not fire (") and len(lines) == 2
    assert err.strip().endswith("tensortap rules: interrupted") and "Traceback" not in err


def test_rules_says_that_the_training_failed_and_why(tmp_path: Path) -> None:
    """A training that failed (reason ``exception`` or ``error``) ended ``rules --follow`` as one that
    finished: a gate in CI passed it with exit 0 and no word of the failure."""
    with pytest.raises(RuntimeError, match="loader died"):
        with Writer(tmp_path) as w:
            for _ in range(4):
                with w.stepping():
                    w.save("losses/loss", np.float32(1.0), ["losses"])
            raise RuntimeError("the data loader died")
    done = rules(str(tmp_path), "--rule", "exploding_tensor", "--follow")
    assert done.returncode == 0, done.stderr
    assert "ExplodingTensor: did not fire (4 steps up to step 3)" in done.stdout
    assert "worker_0 ended with reason 'exception': RuntimeError: the data loader died" in done.stderr
    # a stranger's error text of any length is cut
    with pytest.raises(RuntimeError):
        with Writer(tmp_path / "long") as w:
            with w.stepping():
                w.save("losses/loss", np.float32(1.0), ["losses"])
            raise RuntimeError("x" * 100_000)
    done = rules(str(tmp_path / "long"), "--rule", "exploding_tensor")
    assert f"RuntimeError: {'x' * 486}..." in done.stderr and len(done.stderr) < 2_000, len(done.stderr)
