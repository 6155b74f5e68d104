"""The `tensortap` command: ls, show, check, export, --help and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tensortap
from tensortap.capture import Writer
from tensortap.cli import main


@pytest.fixture
def trial_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    with Writer(out, save_config=tensortap.SaveConfig(save_interval=2)) as w:
        for s in range(6):
            with w.stepping():
                w.save("fc1.weight", np.full((2, 3), s, dtype=np.float32), ["weights"])
                w.save("losses/loss", np.float64(1.0 / (s + 1)), ["losses"])
    return out


def test_ls_lists_workers_steps_and_tensors(trial_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(trial_dir)]) == 0
    out = capsys.readouterr().out
    assert "worker_0" in out and "[ended]" in out
    assert "steps    0, 2, 4" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("fc1", "losses/"))}
    assert lines["fc1.weight"][1:] == ["weights", "float32", "2x3", "3"]
    assert lines["losses/loss"][1:] == ["losses", "float64", "()", "3"]


def test_ls_json(trial_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(trial_dir), "--json", "--collection", "weights"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workers"] == ["worker_0"]
    assert data["steps"] == [0, 2, 4]
    assert list(data["tensors"]) == ["fc1.weight"]
    assert data["tensors"]["fc1.weight"]["shape"] == [2, 3]


def test_show_value_and_reduction(trial_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(trial_dir), "fc1.weight", "--step", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"4": [[4.0] * 3] * 2}
    assert main(["show", str(trial_dir), "fc1.weight", "--reduction", "l1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"0": 0.0, "2": 12.0, "4": 24.0}
    assert main(["show", str(trial_dir), "losses/loss", "--step", "2", "--mode", "train"]) == 0
    assert "0.333" in capsys.readouterr().out


def test_show_errors_exit_2(trial_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(trial_dir), "nope"]) == 2
    assert "no tensor named 'nope'" in capsys.readouterr().err
    assert main(["show", str(trial_dir), "fc1.weight", "--step", "3"]) == 2
    assert "step 3" in capsys.readouterr().err
    assert main(["ls", str(trial_dir / "missing")]) == 2


def test_check_clean_then_damaged(trial_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(trial_dir)]) == 0
    assert "ok" in capsys.readouterr().out
    shard = next((trial_dir / "shards" / "worker_0").glob("*.h5"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated, and named by an index record
    (trial_dir / "shards" / "worker_0" / "stray.h5").write_bytes(b"not hdf5 at all")  # named by none
    assert main(["check", str(trial_dir)]) == 1
    out = capsys.readouterr().out
    assert f"shards/worker_0/{shard.name}" in out
    assert "shards/worker_0/stray.h5" in out


def test_check_reports_index_naming_missing_shard(trial_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    next((trial_dir / "shards" / "worker_0").glob("*.h5")).unlink()
    assert main(["check", str(trial_dir)]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_export_csv(trial_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    assert main(["export", str(trial_dir), "--collection", "losses", "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "worker,mode,mode_step,step,name,reduction,value"
    assert len(lines) == 4 and lines[1].startswith("worker_0,TRAIN,0,0,losses/loss,value,1.0")


@pytest.mark.parametrize("command", [[], ["ls"], ["show"], ["check"], ["export"], ["plot"]])
def test_help_for_every_command(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tensortap.cli", *command, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "usage: tensortap" in result.stdout


def test_usage_error_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "tensortap.cli", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_plot_writes_an_image_of_the_series(trial_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tensortap.trial.plot import series

    trial = tensortap.create_trial(trial_dir)
    assert series(trial, "losses/loss") == {0: 1.0, 2: 1 / 3, 4: 0.2}
    assert series(trial, "fc1.weight", reduction="abs_max") == {0: 0.0, 2: 2.0, 4: 4.0}
    assert series(trial, "fc1.weight") == {0: 0.0, 2: 2.0, 4: 4.0}  # mean of a non-scalar
    out = tmp_path / "plot.png"
    assert main(["plot", str(trial_dir), "losses/loss", "--regex", "fc1", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(trial_dir), "--regex", "nothing-matches"]) == 2
