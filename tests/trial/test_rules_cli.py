"""``tensortap rules``: exit codes, --json, --list, --follow and --stop-training."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tensortap
from tensortap.capture import ShardPolicy, Writer
from tensortap.cli import main
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


def test_list_prints_every_rule_with_its_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--list"]) == 0
    out = capsys.readouterr().out
    for name, cls in BUILTIN_RULES.items():
        assert f"{name} ({cls.__name__}):" in out
        for p in parameters(cls):
            assert f"    {p.name}=" in out
    assert "    threshold=1e-07  (float)" in out
    assert main(["rules", "--list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == list(BUILTIN_RULES)


def test_exit_0_when_nothing_fires_and_1_when_a_rule_fires(
    falling: Path, flat: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rules", str(falling), "--rule", "loss_not_decreasing"]) == 0
    assert "LossNotDecreasing: did not fire (evaluated up to step 11)" in capsys.readouterr().out
    assert main(["rules", str(flat), "--rule", "loss_not_decreasing:num_steps=5", "--rule", "vanishing_gradient"]) == 1
    out = capsys.readouterr().out
    assert "LossNotDecreasing fired at step 5: losses/loss: loss 1 at TRAIN step 5 decreased 0%" in out
    assert "LossNotDecreasing: fired at 2 step(s)" in out
    assert "VanishingGradient needs collection 'gradients'" in out


def test_json_output(flat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", str(flat), "--rule", "loss_not_decreasing:num_steps=5,diff_percent=0.5", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fired"] is True and report["training_ended"] is True and report["stop_request"] is None
    (rule,) = report["rules"]
    assert rule["rule"] == "LossNotDecreasing" and rule["fired_steps"] == [5, 10]
    assert rule["spec"] == "loss_not_decreasing:num_steps=5,diff_percent=0.5"
    assert rule["verdicts"][0]["tensors"] == ["losses/loss"] and rule["missing_inputs"] == []
    assert main(["rules", str(flat), "--rule", "loss_not_decreasing:num_steps=5", "--end-step", "8", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["rules"][0]["fired_steps"] == [5]


def test_stop_training_writes_the_request(flat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", str(flat), "--rule", "loss_not_decreasing:num_steps=5", "--stop-training", "--json"]) == 1
    req = json.loads(capsys.readouterr().out)["stop_request"]
    assert req["rule"] == "LossNotDecreasing" and req["step"] == 5
    assert tensortap.create_trial(flat).stop_request()["step"] == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rule", "loss_not_decreasing"], "PATH is required"),
        (["{path}"], "give at least one --rule"),
        (["{path}", "--rule", "no_such_rule"], "'no_such_rule' is not a built-in rule; valid: vanishing_gradient"),
        (["{path}", "--rule", "vanishing_gradient:thresh=1"], "unknown parameter(s) thresh; valid: threshold"),
        (["{path}", "--rule", "loss_not_decreasing:num_steps=abc"], "num_steps: expected int, got 'abc'"),
        (["{path}", "--rule", "loss_not_decreasing:num_steps=0"], "num_steps: expected an integer >= 1, got 0"),
        (["{path}", "--rule", "tensor_variance"], "give max_threshold and/or min_threshold"),
        (["{path}", "--rule", "dead_relu:threshold_layer"], "expected param=value"),
        (["{path}/missing", "--rule", "all_zero"], "no trial at"),
    ],
)
def test_usage_errors_exit_2(flat: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["rules", *(a.format(path=flat) for a in argv)]) == 2
    assert message in capsys.readouterr().err


def test_param_values_are_parsed_by_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    with Writer(tmp_path) as w:
        with w.stepping():
            w.save("inputs/tanh", rng.normal(0, 3, (64, 4)), ["inputs"])
    assert main(["rules", str(tmp_path), "--rule", "saturated_activation"]) == 0
    assert (
        main(["rules", str(tmp_path), "--rule", "saturated_activation:threshold_tanh=-0.5,0.5,threshold_inactivity=90"])
        == 1
    )
    assert "inputs/tanh: 100% of its 4 tanh units are saturated (input outside (-0.5, 0.5)" in capsys.readouterr().out
    assert main(["rules", str(tmp_path), "--rule", "exploding_tensor:only_nan=maybe"]) == 2
    assert "only_nan: expected true or false, got 'maybe'" in capsys.readouterr().err


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
