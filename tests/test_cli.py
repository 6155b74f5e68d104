"""The `tensortap` command, through real subprocesses: output, --json, exit codes, wrong paths, names, pipes."""

from __future__ import annotations

import io
import json
import os
import pickle
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.cli import cli, strict_json

import tensortap
from tensortap import TrialNotFound, UnknownName
from tensortap.capture import ShardPolicy, Writer
from tensortap.trial.index import IMPORT_FAILED
from tensortap.trial.views import RUNNING


def user_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Check a user error: the exit status, a one-line message on stderr, nothing on stdout, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    return result.stderr


def write_run(out: Path, n: int = 6, close: bool = True, **kw: Any) -> Writer:
    w = Writer(out, save_config=tensortap.SaveConfig(save_interval=2), **kw)
    for s in range(n):
        with w.stepping():
            w.save("fc1.weight", np.full((2, 3), s, dtype=np.float32), ["weights"])
            w.save("losses/loss", np.float64(1.0 / (s + 1)), ["losses"])
            odd = np.array([1.0, -2.0, np.nan, np.inf, 5.0], dtype=np.float32) * (s + 1)
            w.save("act/odd", odd, ["outputs"])
    if close:
        w.close()
    else:
        w.flush()
    return w


@pytest.fixture
def trial_dir(tmp_path: Path) -> Path:
    write_run(tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------ ls
def test_ls_lists_workers_steps_and_tensors(trial_dir: Path) -> None:
    result = cli("ls", str(trial_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "worker_0" in out and "[ended]" in out
    assert "steps    0-4 (3 steps)" in out  # every other step saved: no saved step between
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("fc1", "losses/"))}
    assert lines["fc1.weight"][1:] == ["weights", "float32", "2x3", "3"]
    assert lines["losses/loss"][1:] == ["losses", "float64", "()", "3"]
    assert "\033[" not in out  # not a terminal: no colour


def test_ls_json(trial_dir: Path) -> None:
    result = cli("ls", str(trial_dir), "--json", "--collection", "weights")
    data = strict_json(result.stdout)
    assert data["workers"] == ["worker_0"] and data["training_ended"] is True
    assert data["steps"] == [0, 2, 4] and data["complete_steps"] == [0, 2, 4]
    assert data["modes"] == {"TRAIN": [0, 2, 4]} and data["end_reasons"] == {"worker_0": "closed"}
    assert list(data["tensors"]) == ["fc1.weight"]
    assert data["tensors"]["fc1.weight"] == {
        "collections": ["weights"],
        "dtype": "float32",
        "orig_dtype": None,
        "shape": [2, 3],
        "steps": 3,
    }


def test_ls_of_a_folder_of_trials_lists_them(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "first", n=4)
    live = write_run(tmp_path / "runs" / "group" / "second", n=6, close=False)
    (tmp_path / "runs" / "notes.txt").write_text("not a trial")
    write_run(tmp_path / "runs" / "stranger", n=2)
    (tmp_path / "runs" / "stranger" / "workers" / "worker_0.json").write_text("[1, 2]")  # untrusted input
    newer = tmp_path / "runs" / "zz-newer"
    write_run(newer, n=2)
    worker = newer / "workers" / "worker_0.json"
    worker.write_text(json.dumps({**json.loads(worker.read_text()), "format_version": 99}))  # a newer tensortap
    try:
        result = cli("ls", str(tmp_path / "runs"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{tmp_path / 'runs'} is not a trial; it holds 4 trials:\n")
        rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[3:]}
        assert rows["stranger"][1:4] == ["-", "1", "ended"]
        assert rows["zz-newer"][1:5] == ["-", "-", "newer", "format"]  # listed as such, the others too
        assert "zz-newer was written by a newer tensortap than this one" in result.stderr
        assert (
            "skipping workers/worker_0.json: unreadable record (not a valid worker record: not an object)"
            in result.stderr
        )
        assert rows["first"][1:5] == ["numpy", "2", "ended", "0.3333"]  # last loss 1/3 at step 2
        # one wording of a run without its end marker: ls of the folder, of the trial and its notebook view
        assert rows["group/second"][1:3] == ["numpy", "3"] and f"  {RUNNING}  0.2 (" in result.stdout  # 1/5 at step 4
        second = tmp_path / "runs" / "group" / "second"
        assert f"[{RUNNING}]" in cli("ls", str(second)).stdout
        assert f"<td style='text-align:left'>{RUNNING}</td>" in tensortap.create_trial(second)._repr_html_()
        data = strict_json(cli("ls", str(tmp_path / "runs"), "--json").stdout)
        first, second, _, unread = data["trials"]
        assert unread["name"] == "zz-newer" and unread["steps"] is None and "upgrade tensortap" in unread["error"]
        assert first["error"] is None
        assert first["name"] == "first" and first["ended"] is True and first["steps"] == 2
        assert first["last_loss"] == {"name": "losses/loss", "step": 2, "value": 1 / 3}
        assert second["name"] == "group/second" and second["ended"] is False and second["framework"] == "numpy"
    finally:
        live.close()


KILLED_WORKERS = """
import numpy as np, os, signal, sys
from tensortap.capture import Writer
writers = [Writer(sys.argv[1], rank=rank, world_size=int(sys.argv[2])) for rank in range(int(sys.argv[2]))]
for w in writers:
    with w.stepping():
        w.save("losses/loss", np.float32(0.5), ["losses"])
    w.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_ls_of_a_folder_gives_each_trial_the_status_ls_of_the_trial_gives(tmp_path: Path) -> None:
    """hunt 57 A57-1: ``ls`` of a folder of trials said ``ended`` or ``running`` alone, in no colour: a training
    that died of an exception, one killed and an smdebug import that stopped midway read as plain "ended",
    where ``ls`` of each trial said so (in red). Now each row's status is that of ``ls`` of the trial
    (``tensortap.trial.views.status_parts``), coloured by its worst tone; ``--json`` gives ``end_reasons``.
    An import that failed now reads so in ``ls`` of the trial too."""
    runs = tmp_path / "runs"
    write_run(runs / "ok", n=2)
    w = write_run(runs / "failed", n=2, close=False)
    w.close_for_exit("exception", "RuntimeError: CUDA out of memory")
    write_run(runs / "import", n=2, close=False).close(IMPORT_FAILED)
    subprocess.run([sys.executable, "-c", KILLED_WORKERS, str(runs / "killed"), "1"], timeout=120)
    statuses = {
        "failed": "ended: worker_0 ended with reason 'exception': RuntimeError: CUDA out of memory",
        "import": "ended: worker_0 ended with reason 'import failed'",
        "killed": "ended: worker_0 killed",
        "ok": "ended",
    }
    result = cli("ls", str(runs))
    assert result.returncode == 0, result.stderr
    for name, status in statuses.items():
        assert f"[{status}]" in cli("ls", str(runs / name)).stdout
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{name} "))
        assert f"  {status}  " in line, line
    trials = {t["name"]: t for t in strict_json(cli("ls", str(runs), "--json").stdout)["trials"]}
    assert trials["killed"]["end_reasons"] == {"worker_0": "killed"}
    assert trials["import"]["end_reasons"] == {"worker_0": IMPORT_FAILED}
    coloured = on_terminal(["ls", str(runs)], {"NO_COLOR": None})
    assert f"\033[31m{statuses['failed']}\033[0m" in coloured and "\033[32mended\033[0m" in coloured


def test_ls_and_check_name_the_first_workers_and_count_the_others(tmp_path: Path) -> None:
    """hunt 57 A57-5: ``ls``'s workers line and the note of killed workers (``ls``, ``check``, ``rules``) named
    every worker: a line of thousands of characters for a job of 512 ranks. Now the first 10 are named and the
    others counted, as the notes of failed and awaited workers are."""
    subprocess.run([sys.executable, "-c", KILLED_WORKERS, str(tmp_path / "run"), "12"], timeout=120)
    named = "worker_0, worker_1, worker_10, worker_11, worker_2, worker_3, worker_4, worker_5, worker_6, worker_7"
    listing = cli("ls", str(tmp_path / "run")).stdout
    assert f"workers  {named} and 2 more  [ended: {named} and 2 more killed]\n" in listing
    check = cli("check", str(tmp_path / "run"))
    assert check.returncode == 0 and check.stdout.startswith(f"note: {named} and 2 more killed: "), check.stdout


def test_ls_of_a_folder_of_trials_refuses_the_options_that_select_tensors(tmp_path: Path) -> None:
    """``ls FOLDER --collection C`` (or ``--regex``) listed the trials and dropped the option silently, as if
    no trial had a tensor outside it: now exit 2, naming the option and a trial to give instead. Every other
    command refuses a folder of trials (exit 2, listing them); ``ls`` without these options lists them."""
    write_run(tmp_path / "runs" / "first", n=2)
    write_run(tmp_path / "runs" / "second", n=2)
    runs = str(tmp_path / "runs")
    err = user_error(cli("ls", runs, "--collection", "weights"))
    assert err == (
        f"tensortap ls: --collection selects tensors of one trial; {runs} is a folder of 2 trials: "
        f"give one of them, e.g. {runs}/first\n"
    )
    assert "--regex selects tensors of one trial" in user_error(cli("ls", runs, "--regex", "fc1"))
    result = cli("ls", runs, "--collection", "weights", "--regex", "fc1", "--json")
    assert result.returncode == 2 and strict_json(result.stdout)["error"]["kind"] == "usage"
    assert "--collection and --regex select tensors of one trial" in result.stderr
    for command in (
        ["show", runs, "fc1.weight"],
        ["check", runs],
        ["export", runs],
        ["rules", runs, "--rule", "all_zero"],
        ["report", runs, "-o", str(tmp_path / "report.html")],
        ["plot", runs, "fc1.weight", "-o", str(tmp_path / "plot.png")],
    ):
        assert "it is a folder of trials, not a trial; trials found below it: first, second" in user_error(
            cli(*command)
        )
    assert cli("ls", runs).returncode == 0


# ---------------------------------------------------------------------- show
def test_show_scalar_summary_full_and_reduction(trial_dir: Path) -> None:
    out = cli("show", str(trial_dir), "losses/loss", "--step", "2").stdout
    assert out == "step 2: 0.333333\n"  # significant digits, not 0.3333333333333333
    out = cli("show", str(trial_dir), "act/odd", "--step", "4").stdout
    assert out == "step 4: float32 (5,) min -10 mean 6.667 max 25 nan 1 inf 1\n"
    out = cli("show", str(trial_dir), "act/odd", "--step", "4", "--full").stdout
    assert out.splitlines()[1] == "[  5. -10.  nan  inf  25.]"
    out = cli("show", str(trial_dir), "fc1.weight", "--reduction", "l1").stdout
    assert out == "step 0: 0\nstep 2: 12\nstep 4: 24\n"


def test_show_says_the_mode_step_of_each_global_step(tmp_path: Path) -> None:
    """Without --mode, ``show`` printed global steps alone: an eval loss read as "step 3", which is no eval step."""
    with Writer(tmp_path) as w:
        for mode in ("train", "train", "train", "eval", "eval", "train"):
            with w.stepping(mode):
                w.save("losses/loss", np.float32(1.0), ["losses"])
    out = cli("show", str(tmp_path), "losses/loss").stdout.splitlines()
    assert [line.split(":")[0] for line in out] == [
        "step 0", "step 1", "step 2", "step 3 (eval step 0)", "step 4 (eval step 1)", "step 5 (train step 3)",
    ]  # fmt: skip
    out = cli("show", str(tmp_path), "losses/loss", "--mode", "eval").stdout.splitlines()
    assert [line.split(":")[0] for line in out] == ["step 0 (eval)", "step 1 (eval)"]


def test_show_json_has_no_nan_literals(trial_dir: Path) -> None:
    data = strict_json(cli("show", str(trial_dir), "act/odd", "--step", "0", "--full", "--json").stdout)
    (entry,) = data["steps"]
    assert data["tensor"] == "act/odd" and data["reduction"] is None
    assert entry["value"] == [1.0, -2.0, "NaN", "Infinity", 5.0]
    assert (entry["min"], entry["max"], entry["nan_count"], entry["inf_count"]) == (-2.0, 5.0, 1, 1)
    data = strict_json(cli("show", str(trial_dir), "act/odd", "--reduction", "max", "--json").stdout)
    assert [e["value"] for e in data["steps"]] == ["NaN", "NaN", "NaN"]  # the saved max of a tensor with a NaN
    data = strict_json(cli("show", str(trial_dir), "losses/loss", "--json").stdout)
    assert [(e["step"], e["value"]) for e in data["steps"]] == [(0, 1.0), (2, 1 / 3), (4, 0.2)]


def test_show_says_what_an_array_without_finite_values_holds(tmp_path: Path) -> None:
    """``show`` printed ``min None mean None max None`` for an array without elements and for one of NaNs
    alone: now it says ``no values`` (beside the shape), ``all NaN`` with the count, or the NaN and
    infinite counts where no element is finite; ``--json`` gives ``size`` and ``null`` min, mean, max."""
    with Writer(tmp_path / "run") as w, w.stepping():
        w.save("empty", np.zeros((0,), dtype=np.float32), ["outputs"])
        w.save("empty2d", np.zeros((3, 0), dtype=np.float32), ["outputs"])
        w.save("nans", np.full(4, np.nan, dtype=np.float32), ["outputs"])
        w.save("nonfinite", np.array([np.nan, np.inf, -np.inf], dtype=np.float32), ["outputs"])
        w.save("some", np.array([1.0, np.nan, 3.0, np.inf], dtype=np.float32), ["outputs"])
    run = str(tmp_path / "run")
    shown = {
        "empty": "float32 (0,) no values",
        "empty2d": "float32 (3, 0) no values",
        "nans": "float32 (4,) all NaN (4 values)",
        "nonfinite": "float32 (3,) no finite value: nan 1 inf 2",
        "some": "float32 (4,) min 1 mean 2 max 3 nan 1 inf 1",
    }
    for name, text in shown.items():
        result = cli("show", run, name)
        assert (result.returncode, result.stdout) == (0, f"step 0: {text}\n"), (name, result.stderr)
    summaries = {
        "empty": ([0], 0, None, 0, 0),
        "empty2d": ([3, 0], 0, None, 0, 0),
        "nans": ([4], 4, None, 4, 0),
        "nonfinite": ([3], 3, None, 1, 2),
        "some": ([4], 4, 1.0, 1, 1),
    }
    for name, (shape, size, low, nans, infs) in summaries.items():
        (entry,) = strict_json(cli("show", run, name, "--json").stdout)["steps"]
        got = (entry["shape"], entry["size"], entry["min"], entry["nan_count"], entry["inf_count"])
        assert got == (shape, size, low, nans, infs), name


# --------------------------------------------------------------------- check
def test_an_error_raised_by_a_ctrl_c_is_an_interruption(capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C that lands in a lock's ``with`` block of the standard library (``Condition.wait``) comes out
    as ``RuntimeError('cannot release un-acquired lock')``: ``check`` of a remote trial then exited 2 with
    "unexpected error" (seen once in CI) instead of 130 "interrupted"."""
    import argparse

    from tensortap.cli import _run

    def interrupted_in_a_lock(args: argparse.Namespace) -> int:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot release un-acquired lock") from None

    def failed(args: argparse.Namespace) -> int:
        raise RuntimeError("cannot release un-acquired lock")

    def run(func: Any) -> int:
        return _run(argparse.Namespace(command="check", func=func, json=False))

    assert run(interrupted_in_a_lock) == 130
    assert capsys.readouterr().err == "tensortap check: interrupted\n"
    assert run(failed) == 2  # without a Ctrl-C behind it: an unexpected error
    assert "unexpected error: RuntimeError('cannot release un-acquired lock')" in capsys.readouterr().err


def test_check_says_which_workers_wrote_no_end_marker(tmp_path: Path) -> None:
    """``check`` said "ok: no problems" of a trial whose training never ended (a copy of a run killed on
    another machine, or one still running), with no word of it: the files are sound, the run is not over."""
    w = write_run(tmp_path / "run", close=False)
    result = cli("check", str(tmp_path / "run"))
    assert result.returncode == 0 and "ok: no problems" in result.stdout
    assert "note: worker_0 wrote no end marker: the training is still running" in result.stdout
    data = strict_json(cli("check", str(tmp_path / "run"), "--json").stdout)
    assert data["ok"] is True and data["unended_workers"] == ["worker_0"]
    w.close()
    assert strict_json(cli("check", str(tmp_path / "run"), "--json").stdout)["unended_workers"] == []
    assert "note:" not in cli("check", str(tmp_path / "run")).stdout


def test_check_clean_then_damaged(trial_dir: Path) -> None:
    result = cli("check", str(trial_dir))
    assert result.returncode == 0 and "ok" in result.stdout
    assert strict_json(cli("check", str(trial_dir), "--json").stdout) == {
        "path": str(trial_dir),
        "ok": True,
        "problems": [],
        "unended_workers": [],
    }
    shard = next((trial_dir / "shards" / "worker_0").glob("*.h5"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated, and named by an index record
    (trial_dir / "shards" / "worker_0" / "stray.h5").write_bytes(b"not hdf5 at all")  # named by none
    result = cli("check", str(trial_dir))
    assert result.returncode == 1
    assert f"shards/worker_0/{shard.name}" in result.stdout and "shards/worker_0/stray.h5" in result.stdout
    assert "2 problem(s) found" in result.stderr
    report = cli("check", str(trial_dir), "--json")
    assert report.returncode == 1
    data = strict_json(report.stdout)
    assert data["ok"] is False and len(data["problems"]) == 2


def test_check_opens_the_trial_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check`` opened the trial twice: once to find its problems, once more (a second storage, listed and
    its records read again) to say which workers had not ended, so that the two answers could come from two
    states of a live trial. Now it checks the storage of the one trial it opens."""
    import tensortap.trial.trial as trial_module
    from tensortap.cli import main

    live = write_run(tmp_path / "run", close=False)
    opened: list[str] = []

    def counted(path: Any, **options: Any) -> Any:
        opened.append(str(path))
        return get_storage(path, **options)

    get_storage = trial_module.get_storage
    monkeypatch.setattr(trial_module, "get_storage", counted)
    try:
        assert main(["check", str(tmp_path / "run"), "--json"]) == 0
    finally:
        live.close()
    data = strict_json(capsys.readouterr().out)
    assert data["ok"] is True and data["unended_workers"] == ["worker_0"]
    assert opened == [str(tmp_path / "run")]


# -------------------------------------------------------------- wrong paths
@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["show", "{path}", "losses/loss"],
        ["rules", "{path}", "--rule", "all_zero"],
        ["check"],
        ["plot", "{path}", "losses/loss"],
        ["export"],
    ],
)
@pytest.mark.parametrize("kind", ["parent", "file", "misspelt"])
def test_a_path_without_a_trial_is_an_error_not_an_empty_trial(tmp_path: Path, command: list[str], kind: str) -> None:
    write_run(tmp_path / "runs" / "alpha", n=2)
    write_run(tmp_path / "runs" / "beta", n=2)
    (tmp_path / "runs" / "notes.txt").write_text("hello")
    path = {"parent": tmp_path, "file": tmp_path / "runs" / "notes.txt", "misspelt": tmp_path / "runs" / "alpah"}[kind]
    args = [a.format(path=path) for a in command] if len(command) > 1 else [*command, str(path)]
    if kind == "parent" and command == ["ls"]:
        result = cli(*args)  # ls lists the trials of a folder
        assert result.returncode == 0 and "runs/alpha" in result.stdout and "runs/beta" in result.stdout
        return
    err = user_error(cli(*args))
    assert f"tensortap {command[0]}: no tensortap trial at {path}" in err
    expected = {
        "parent": "trials found below it: runs/alpha, runs/beta",
        "file": "it is a file",
        "misspelt": "nothing exists there, did you mean 'alpha'?",
    }[kind]
    assert expected in err


def test_create_trial_accepts_a_started_or_empty_trial_and_waits(tmp_path: Path) -> None:
    w = Writer(tmp_path / "started")  # a live run about to save its first step: its worker record exists
    try:
        assert tensortap.create_trial(tmp_path / "started").steps() == []
        assert cli("ls", str(tmp_path / "started")).returncode == 0
    finally:
        w.close()
    (tmp_path / "empty").mkdir()
    assert tensortap.create_trial(tmp_path / "empty").workers() == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("lr: 1")
    with pytest.raises(TrialNotFound, match="none of a trial's marker files"):
        tensortap.create_trial(tmp_path / "other")
    with pytest.raises(TrialNotFound, match="trials found below it: started") as info:
        tensortap.create_trial(tmp_path, wait=True)  # a parent folder never becomes a trial: no waiting
    assert info.value.trials_below == ["started"] and info.value.why == "it is a folder of trials, not a trial"
    with pytest.raises(TrialNotFound, match="it is a file"):
        tensortap.create_trial(tmp_path / "other" / "config.yaml", wait=True)  # neither does a file
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("kind", ["fifo", "device", "empty"])
def test_a_fifo_a_device_or_an_empty_path_is_no_trial(tmp_path: Path, kind: str) -> None:
    """Neither a FIFO nor ``/dev/null`` is an empty trial, and ``""`` is not the current folder."""
    write_run(tmp_path / "run", n=2)  # a trial in the current folder, which "" must not read
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path, why = {
        "fifo": (str(fifo), "neither a folder nor a file"),
        "device": (os.devnull, "neither a folder nor a file"),
        "empty": ("", "the path is empty"),
    }[kind]
    with pytest.raises(TrialNotFound, match=why):
        tensortap.create_trial(path, wait=True, timeout=30)  # nothing to wait for: at once
    result = subprocess.run(
        [sys.executable, "-m", "tensortap.cli", "check", path, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path / "run",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert why in result.stderr
    error = strict_json(result.stdout)["error"]
    assert error["kind"] == "not_found" and why in error["message"]


def test_a_trial_whose_workers_are_all_hidden_says_so(tmp_path: Path) -> None:
    """A worker named with a leading dot is hidden (skipped by readers): the message said the folder held
    none of a trial's marker files, though workers/ and index/ were there (second hostile-input audit)."""
    run = tmp_path / "run"
    write_run(run, n=2)
    for folder in ("workers", "index", "shards", "end"):
        for entry in (run / folder).iterdir():
            entry.rename(entry.with_name("." + entry.name))
    with pytest.raises(TrialNotFound, match=r"its end/, index/, workers/ hold no worker's records \(names starting"):
        tensortap.create_trial(run)
    assert "hidden and not read" in user_error(cli("ls", str(run)))


# ------------------------------------------------------------ unknown names
def test_unknown_names_are_errors_with_suggestions(trial_dir: Path) -> None:
    trial = tensortap.create_trial(trial_dir)
    with pytest.raises(UnknownName, match=r"no collection 'gradient' in .*did you mean 'gradients'") as caught:
        trial.tensor_names(collection="gradient")
    copy = pickle.loads(pickle.dumps(caught.value))  # as a process pool hands it back
    assert str(copy) == str(caught.value) and (copy.kind, copy.name) == ("collection", "gradient")
    assert copy.valid == caught.value.valid and "gradients" in copy.valid
    with pytest.raises(KeyError, match=r"did you mean 'fc1\.weight'"):
        trial.tensor("fc1.weigth")
    with pytest.raises(ValueError, match="did you mean 'mean'"):
        trial.tensor("fc1.weight").reduction_value(0, "maen")
    assert trial.tensor_names(collection="gradients") == []  # configured, nothing saved: empty, not an error
    for args, message in [
        (["ls", str(trial_dir), "--collection", "weight"], "no collection 'weight' in"),
        (["show", str(trial_dir), "fc1.weigth"], "no tensor named 'fc1.weigth'"),
        (["show", str(trial_dir), "fc1.weight", "--reduction", "meen"], "no reduction 'meen'; did you mean 'mean'"),
        (["show", str(trial_dir), "fc1.weight", "--reduction", "foo"], "(valid: min, max, mean, std, variance, sum"),
        (["show", str(trial_dir), "fc1.weight", "--reduction", "abs_maen"], "did you mean 'abs_mean'"),
        (["rules", str(trial_dir), "--rule", "all_zeros"], "no built-in rule 'all_zeros'; did you mean 'all_zero'"),
        (["rules", str(trial_dir), "--rule", "all_zero:collection=weights"], "did you mean 'collection_names'"),
        (["ls", str(trial_dir), "--regex", "fc1("], "regex: 'fc1(' is not a valid regular expression"),
    ]:
        assert message in user_error(cli(*args)), args


def test_ls_cuts_a_very_long_name_as_plots_do(tmp_path: Path) -> None:
    """hunt 41 F10: one tensor name of 3,000 characters made every row of ``ls`` 3,000 columns wide (short names
    padded to it), so the other columns of every tensor were off an 80-column screen; plots cut names at 120."""
    long = "w/" + "A" * 3000 + "/end"
    with Writer(tmp_path / "run") as w, w.stepping():
        w.save(long, np.float32(1.0), ["weights"])
        w.save("short", np.float32(2.0), ["weights"])
    result = cli("ls", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert max(map(len, rows)) < 200, max(map(len, rows))
    (row,) = [r for r in rows if r.startswith("w/AAA")]
    assert "\u2026" in row and "A/end" in row and "weights" in row
    assert long in strict_json(cli("ls", str(tmp_path / "run"), "--json").stdout)["tensors"]  # whole in JSON


# ------------------------------------------------------------- pipes, deps
@pytest.fixture
def big_trial(tmp_path: Path) -> Path:
    with Writer(tmp_path / "big") as w, w.stepping():
        for i in range(3000):
            w.save(f"scalar/{i:05d}", np.float32(i), ["metrics"])
        w.save("big", np.arange(90_000, dtype=np.float32).reshape(300, 300), ["weights"])
    return tmp_path / "big"


@pytest.mark.parametrize("command", [["ls"], ["show", "{path}", "big", "--full"], ["export"], ["ls", "--json"]])
def test_a_pipe_closed_early_ends_quietly(big_trial: Path, command: list[str]) -> None:
    args = [a.format(path=big_trial) for a in command] if len(command) > 1 and "{path}" in command[1] else None
    args = args or [command[0], str(big_trial), *command[1:]]
    quoted = " ".join(f"'{a}'" for a in args)
    result = subprocess.run(
        f"set -o pipefail; '{sys.executable}' -m tensortap.cli {quoted} | head -n 2",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr == ""  # no BrokenPipeError, no "Exception ignored"
    assert result.returncode == 141  # 128 + SIGPIPE, like other tools whose reader went away


def test_a_missing_optional_dependency_says_what_to_install(trial_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "nopandas" / "pandas"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pandas'\", name='pandas')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    err = user_error(cli("export", str(trial_dir), env=env))
    assert 'export: this needs pandas, which is not installed: pip install "tensortap[notebook]"' in err


def test_a_parquet_export_without_pyarrow_says_which_extra_installs_it(trial_dir: Path, tmp_path: Path) -> None:
    """pandas' own error (no extra named, its newlines shown as ``\\n``) was printed; no extra held pyarrow."""
    fake = tmp_path / "nopyarrow" / "pyarrow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pyarrow'\", name='pyarrow')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    err = user_error(cli("export", str(trial_dir), "-o", str(tmp_path / "t.parquet"), env=env))
    assert err == 'tensortap export: this needs pyarrow, which is not installed: pip install "tensortap[notebook]"\n'
    assert not (tmp_path / "t.parquet").exists()
    result = cli("export", str(trial_dir), "-o", str(tmp_path / "t.parquet"))  # the real pyarrow
    assert result.returncode == 0 and (tmp_path / "t.parquet").exists(), result.stderr


# -------------------------------------------------- entry points, verbosity
def test_python_m_tensortap_and_version(trial_dir: Path) -> None:
    result = cli("--version", module="tensortap")
    assert result.returncode == 0 and result.stdout == f"tensortap {tensortap.__version__}\n"
    assert cli("ls", str(trial_dir), module="tensortap").stdout == cli("ls", str(trial_dir)).stdout


@pytest.mark.parametrize("command", [[], ["ls"], ["show"], ["check"], ["export"], ["plot"], ["rules"]])
def test_help_for_every_command(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: tensortap" in result.stdout
    if command:
        assert "-q, --quiet" in result.stdout and "-v, --verbose" in result.stdout


def test_usage_error_exit_2() -> None:
    result = cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_warnings_go_to_stderr_and_quiet_silences_them(trial_dir: Path) -> None:
    (trial_dir / "index" / "worker_0" / "0000000009.json").write_text("{not json")
    for command in (["ls", str(trial_dir)], ["show", str(trial_dir), "losses/loss"], ["export", str(trial_dir)]):
        loud = cli(*command)
        assert loud.returncode == 0 and "tensortap: skipping index/worker_0/0000000009.json" in loud.stderr
        for quiet in (cli(*command, "-q"), cli("-q", *command)):
            assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout
    assert cli("check", str(trial_dir), "-q").returncode == 1


def test_quiet_and_verbose_together_are_a_usage_error(trial_dir: Path) -> None:
    """``-q`` before the subcommand and ``-v`` after it (or the other way round) were both taken, ``-q`` winning
    without a word; each parser refused the two only when both were given to it."""
    run = str(trial_dir)
    for args in (["-q", "ls", run, "-v"], ["-v", "ls", run, "-q"], ["-vv", "show", run, "losses/loss", "--quiet"]):
        assert "error: argument -v/--verbose: not allowed with argument -q/--quiet" in user_error(cli(*args))
    result = cli("-q", "ls", run, "-v", "--json")
    assert result.returncode == 2 and strict_json(result.stdout)["error"]["kind"] == "usage"
    assert cli("-v", "ls", run, "-v").returncode == 0 and cli("-q", "ls", run, "-q").returncode == 0


def ctrl_c_in(function: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line ``args``, which sends itself a SIGINT (a Ctrl-C) when ``function`` is called."""
    start = (
        "import signal, sys\n"
        "from tensortap.cli import main\n"
        "def ctrl_c(frame, event, arg):\n"
        f"    if event == 'call' and frame.f_code.co_name == {function!r}:\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "sys.setprofile(ctrl_c)\n"
        "sys.exit(main())\n"
    )
    return subprocess.run([sys.executable, "-c", start, *args], capture_output=True, text=True, timeout=120)


def test_a_ctrl_c_while_the_command_starts_is_an_interruption(trial_dir: Path) -> None:
    """A Ctrl-C in the first second, while the command still imported its subcommands' modules (NumPy,
    h5py), printed a traceback. Here it comes as the command builds its parser (a SIGINT the process
    sends itself then): one line and exit 130, as a Ctrl-C later on; with ``--json`` an error object."""
    result = ctrl_c_in("build_parser", "ls", str(trial_dir))
    assert (result.returncode, result.stderr, result.stdout) == (130, "tensortap: interrupted\n", "")
    result = ctrl_c_in("build_parser", "ls", str(trial_dir), "--json")
    assert (result.returncode, result.stderr) == (130, "tensortap: interrupted\n")
    assert strict_json(result.stdout) == {"error": {"command": None, "kind": "interrupted", "message": "interrupted"}}


def test_a_ctrl_c_before_the_followed_trial_exists_prints_json(tmp_path: Path) -> None:
    """``rules --follow --json`` interrupted while it waits for the trial to appear printed nothing on stdout,
    not valid JSON (hunt 30 L3): now the error object of kind ``interrupted``; exit 130."""
    result = ctrl_c_in(
        "open_trial", "rules", str(tmp_path / "later"), "--rule", "loss_not_decreasing", "--follow", "--json"
    )
    assert (result.returncode, result.stderr) == (130, "tensortap rules: interrupted\n")
    assert strict_json(result.stdout)["error"] == {"command": "rules", "kind": "interrupted", "message": "interrupted"}


def on_terminal(args: list[str], env: dict[str, str] | None = None) -> str:
    """What ``tensortap ARGS`` writes to standard output when that is a terminal (a pseudo-terminal)."""
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensortap.cli", *args],
        stdout=child_fd,
        stderr=subprocess.PIPE,
        env={k: v for k, v in {**os.environ, "TERM": "xterm", **(env or {})}.items() if v is not None},
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(trial_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    assert "\033[1m" in on_terminal(["ls", str(trial_dir)], {**env, "NO_COLOR": ""})  # an empty one does not count
    assert "\033[" not in on_terminal(["ls", str(trial_dir)], {"NO_COLOR": "1"})


def test_plot_writes_an_image_of_the_series(trial_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tensortap.trial.plot import series

    trial = tensortap.create_trial(trial_dir)
    assert series(trial, "losses/loss") == {0: 1.0, 2: 1 / 3, 4: 0.2}
    assert series(trial, "fc1.weight", reduction="abs_max") == {0: 0.0, 2: 2.0, 4: 4.0}
    out = tmp_path / "plot.png"
    result = cli("plot", str(trial_dir), "losses/loss", "--regex", "fc1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "give tensor names" in user_error(cli("plot", str(trial_dir), "--regex", "nothing-matches"))


def test_main_in_a_program_logs_to_stderr_then_leaves_its_logging_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``main`` called in a program (a notebook, a test): the command's warnings go to stderr, and afterwards
    the ``tensortap`` logger has the handlers, level and propagation it had. Before, a handler on the
    stderr of that moment stayed: a later warning wrote to a closed stream (pytest printed ``--- Logging
    error ---``) and never reached the program's own handlers."""
    import logging

    from tensortap.cli import main

    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1)) as w:
        for step in range(2):
            with w.stepping():
                w.save("a", np.arange(3.0) + step)
    first = sorted((tmp_path / "shards" / "worker_0").glob("*.h5"))[0]
    with open(first, "r+b") as f:
        f.truncate(100)  # the index says otherwise: the reader skips it with a warning
    logger = logging.getLogger("tensortap")
    before = (list(logger.handlers), logger.level, logger.propagate)
    assert main(["show", str(tmp_path), "a"]) == 0  # step 0 cannot be read, step 1 is shown
    assert "tensortap: skipping shards/worker_0/0000000000.h5" in capsys.readouterr().err  # the logger's line
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        assert list(tensortap.create_trial(tmp_path).tensor("a").values()) == [1]
    assert any("skipping shards/worker_0/0000000000.h5" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().err == ""  # the program's handlers only, no stream left behind


# ------------------------------------------------------------------ report
@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("nosuch", "no built-in rule 'nosuch'"),
        ("vanishing_gradient:thresh=1", "did you mean 'threshold'"),
        ("vanishing_gradient:threshold=abc", "threshold: expected"),
    ],
)
def test_report_with_an_unknown_rule_or_parameter_is_an_error_and_writes_nothing(
    trial_dir: Path, tmp_path: Path, rule: str, message: str
) -> None:
    """As ``rules`` does: exit 2 with the suggestions, before the report is written (it wrote the error
    into the page as "not run" and exited 0)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.html"
    assert message in user_error(cli("report", str(trial_dir), "--rule", rule, "-o", str(out)))
    assert not out.exists()


def test_report_to_a_file_that_is_not_html_is_a_usage_error(trial_dir: Path, tmp_path: Path) -> None:
    """Hunt 33 L5: `report -o r.txt` wrote HTML into r.txt and exited 0, while `plot` refused a wrong suffix.
    Both check it as `plot` did, before any work: exit 2, nothing written."""
    pytest.importorskip("matplotlib")
    from tensortap.trial.report import write_report

    out = tmp_path / "r.txt"
    assert user_error(cli("report", str(trial_dir), "-o", str(out))) == (
        f"tensortap report: output: {str(out)!r} must end in .html or .htm\n"
    )
    with pytest.raises(ValueError, match=r"must end in \.html or \.htm$"):
        write_report(tensortap.create_trial(trial_dir), out)
    assert not out.exists()


# ------------------------------------------------------------------- rules
def test_rules_from_a_start_step_count_only_the_steps_evaluated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Steps 0, 2, ..., 18 saved; from step 10 the rule evaluates 10-18, 5 steps (it said all 10 saved)."""
    from tensortap.cli import main

    write_run(tmp_path / "run", n=20)
    args = ["rules", str(tmp_path / "run"), "--rule", "exploding_tensor:collection_names=weights", "--start-step"]
    assert main([*args, "10"]) == 0
    assert "ExplodingTensor: did not fire (5 steps up to step 18)" in capsys.readouterr().out
    assert main([*args, "10", "--json"]) == 0
    (rule,) = strict_json(capsys.readouterr().out)["rules"]
    assert (rule["last_step"], rule["evaluated_steps"]) == (18, 5)


# ----------------------------------------------------------- damaged shards
def damaged_run(path: Path, nan_at: int | None = None) -> Path:
    """Steps 0-8 in three shards of three steps, the middle one (steps 3-5) truncated; ``w`` holds a NaN at
    step ``nan_at``."""
    with Writer(path, shard_policy=ShardPolicy(max_steps=3)) as w:
        for step in range(9):
            with w.stepping():
                value = np.arange(4.0) + step
                if step == nan_at:
                    value[1] = np.nan
                w.save("w", value, ["weights"])
    shard = sorted((path / "shards" / "worker_0").glob("*.h5"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return path


def test_show_skips_the_steps_of_a_damaged_shard_and_shows_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It stopped at step 3 with exit 2 and never showed steps 6-8 (with --json: nothing on stdout)."""
    from tensortap.cli import main

    path = damaged_run(tmp_path / "run")
    assert main(["show", str(path), "w", "--reduction", "max"]) == 0
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == [f"step {s}" for s in (0, 1, 2, 6, 7, 8)]
    assert "skipping shards/worker_0/0000000001.h5" in err and "3 steps skipped at 3-5" in err
    assert main(["show", str(path), "w", "--json"]) == 0
    data = strict_json(capsys.readouterr().out)
    assert [e["step"] for e in data["steps"]] == [0, 1, 2, 6, 7, 8] and data["skipped_steps"] == [3, 4, 5]
    assert data["steps"][-1]["max"] == 11.0


@pytest.mark.parametrize("pack_bytes", [0, 1 << 18], ids=["grouped", "packed"])
def test_show_of_one_step_of_a_damaged_shard_names_the_shard_once(
    pack_bytes: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``show --step`` on a value that fails its checksum said so twice on stderr: the reader's warning
    (``skipping <shard>: <why>``) and the error (``... shard <shard> cannot be read: <why>``). The error alone
    says it now, the same with ``-q`` and ``--json``; and it names the value by its place in the shard (a value
    read where the record says was "value 0" whatever its step). Over every step the reader's warning names
    the shard, ``show``'s own line the steps."""
    from tensortap.cli import main

    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=3, pack_bytes=pack_bytes)) as w:
        for step in range(3):
            with w.stepping():
                w.save("w", np.arange(4.0) + step, ["weights"])
    shard = "shards/worker_0/0000000000.h5"
    at = json.loads((tmp_path / "index" / "worker_0" / "0000000000.json").read_text())["tensors"]["w"]["raw_at"]
    data = bytearray((tmp_path / shard).read_bytes())
    data[at["data"] + 32 + 3] ^= 0x10  # a byte of the value of step 1 (four float64 a value)
    (tmp_path / shard).write_bytes(bytes(data))
    why = "value 1 of tensor step 1 does not match its checksum"
    for extra in ([], ["-q"], ["--json"]):
        assert main(["show", str(tmp_path), "w", "--step", "1", *extra]) == 2
        out, err = capsys.readouterr()
        assert err == f"tensortap show: 'w' at step 1: shard {shard} cannot be read: {why}\n", (extra, err)
        assert not extra or extra == ["-q"] or strict_json(out)["error"]["message"] == err[len("tensortap show: ") : -1]
    assert main(["show", str(tmp_path), "w"]) == 0
    err = capsys.readouterr().err
    assert err.count(shard) == 1 and f"skipping {shard}: {why}" in err and "2 steps skipped at 1-2" in err, err


@pytest.mark.parametrize("nan_at", [None, 7])
def test_rules_skip_the_steps_of_a_damaged_shard_and_judge_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nan_at: int | None
) -> None:
    """A step the rule cannot read is evidence neither way: skipped, said so, the others judged, and the
    exit status is the rules' (it exited 2 with nothing on stdout at the first unreadable step)."""
    from tensortap.cli import main
    from tensortap.rules import ExplodingTensor, invoke_rule

    path = damaged_run(tmp_path / "run", nan_at)
    args = ["rules", str(path), "--rule", "exploding_tensor"]
    assert main(args) == (0 if nan_at is None else 1)
    line = capsys.readouterr().out
    assert "3 steps skipped (3-5): their shards cannot be read" in line
    assert ("did not fire (6 steps up to step 8;" in line) if nan_at is None else ("fired at 7 (1 step)" in line)
    assert main([*args, "--json"]) == (0 if nan_at is None else 1)
    (rule,) = strict_json(capsys.readouterr().out)["rules"]
    assert (rule["evaluated_steps"], rule["skipped_steps"]) == (6, [3, 4, 5])
    assert rule["fired_steps"] == ([] if nan_at is None else [7])
    rule_object = ExplodingTensor(tensortap.create_trial(path))
    assert invoke_rule(rule_object, wait=False) == ([] if nan_at is None else [7])
    assert rule_object.skipped_steps == [3, 4, 5]


# ------------------------------------------------------------- odd names
ODD_NAMES = [
    "\x1b]0;pwned\x07\x1b[31mred",
    "a\nb",
    "tab\there",
    "\u202eRTL",
    "c1\x9bcsi",
    "del\x7f",
    "lo\u200bss",
    "ls\u2028ep",
    "mark\u200f",
]


def test_control_characters_in_names_are_escaped_in_text_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stranger's tensor names reached the terminal raw: escape codes retitled and coloured it, and a
    newline forged a table row. Now every control character is written as Python writes it."""
    import re

    from tensortap.cli import main

    control = re.compile("[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")

    with Writer(tmp_path / "run") as w, w.stepping():
        for name in ODD_NAMES:
            w.save(name, np.array([1.0, np.nan]), ["weights"])
    run = str(tmp_path / "run")

    def text_of(*args: str) -> tuple[list[str], str]:
        main(list(args))
        out, err = capsys.readouterr()
        assert not control.search(out.replace("\n", "")), out
        assert not control.search(err.replace("\n", "")), err
        return out.splitlines(), err

    lines, _ = text_of("ls", run)
    rows = lines[lines.index(next(line for line in lines if line.startswith("tensor "))) + 2 :]
    assert [row.split("  ")[0] for row in rows] == [n.encode("unicode_escape").decode() for n in sorted(ODD_NAMES)]
    assert r"\x1b]0;pwned\x07\x1b[31mred" in rows[0] and r"a\nb" in "\n".join(rows)
    lines, _ = text_of("rules", run, "--rule", "exploding_tensor")
    assert len(lines) == 1 and r"\x1b]0;pwned" in lines[0]
    _, err = text_of("show", run, "a\nc")  # the suggestion quotes the name with repr, the message is escaped too
    assert r"did you mean 'a\nb'" in err


def test_a_name_holding_a_backslash_escape_reads_apart_from_the_control_character(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``printable`` escaped control characters and left backslashes as they were: a name holding the
    four characters ``\\x1b`` printed as the name holding the escape character did, in one ``ls`` table.
    Now a name's backslashes are escaped too (messages, which quote names with ``repr``, keep theirs)."""
    from tensortap.cli import main

    with Writer(tmp_path / "run") as w, w.stepping():
        for name in ("\x1b[31m", "\\x1b[31m", "a\\b"):
            w.save(name, np.zeros(2, dtype=np.float32), ["weights"])
    assert main(["ls", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[0] for line in lines[lines.index(next(x for x in lines if x.startswith("tensor "))) + 2 :]]
    assert sorted(rows) == sorted([r"\x1b[31m", r"\\x1b[31m", r"a\\b"])  # three names, three texts
    assert main(["show", str(tmp_path / "run"), "a\\c"]) == 2  # the suggestion's repr is not escaped twice
    assert r"did you mean 'a\\b'" in capsys.readouterr().err


def test_export_escapes_names_on_a_terminal_and_keeps_them_in_a_pipe(tmp_path: Path) -> None:
    """``export PATH`` wrote a stranger's names to the terminal raw (CSV quotes a newline, not an escape
    code); on a terminal they are escaped now, and a pipe still gets them as they are."""
    import re

    pd = pytest.importorskip("pandas")

    with Writer(tmp_path / "run") as w, w.stepping():
        for name in ODD_NAMES:
            w.save(name, np.array([1.0, 2.0]), ["weights"])
    shown = on_terminal(["export", str(tmp_path / "run")]).replace("\r\n", "\n")
    assert not re.search(
        "[\x00-\x09\x0b-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]", shown
    ), shown
    assert r"\x1b]0;pwned\x07\x1b[31mred" in shown and ",a\\nb," in shown
    piped = subprocess.run(
        [sys.executable, "-m", "tensortap.cli", "export", str(tmp_path / "run")], capture_output=True, text=True
    )
    names = set(pd.read_csv(io.StringIO(piped.stdout))["name"])
    assert piped.returncode == 0 and names == set(ODD_NAMES), names


@pytest.mark.parametrize(
    "env", [{"PYTHONIOENCODING": "ascii"}, {"PYTHONUTF8": "0"}], ids=["PYTHONIOENCODING", "no-UTF-8-mode"]
)
def test_an_ascii_output_writes_what_it_cannot_encode_as_escapes(tmp_path: Path, env: dict[str, str]) -> None:
    """With standard output in ASCII (a C locale without UTF-8 mode, or ``PYTHONIOENCODING=ascii``), a name
    outside ASCII stopped ``ls``, ``export`` and ``rules`` at its line: "unexpected error" or "'ascii' codec
    can't encode", exit 2. Such characters are written as escapes now, as Python writes them."""
    names = ["gr\u00f6\u00dfe", "\u6743\u91cd/\u5c42"]
    with Writer(tmp_path / "run") as w, w.stepping():
        for name in names:
            w.save(name, np.zeros(2, dtype=np.float32), ["weights"])
    run = str(tmp_path / "run")
    env = {"LANG": "C", "LC_ALL": "C", **env}
    for args, status in ((["ls", run], 0), (["export", run], 0), (["rules", run, "--rule", "all_zero"], 1)):
        result = cli(*args, env=env)
        assert result.returncode == status and "Traceback" not in result.stderr, result.stderr
        assert result.stdout.isascii() and r"gr\xf6\xdfe" in result.stdout, result.stdout
    assert r"\u6743\u91cd/\u5c42" in cli("ls", run, env=env).stdout
    assert list(strict_json(cli("ls", run, "--json", env=env).stdout)["tensors"]) == sorted(names)


def test_ls_aligns_the_columns_of_long_and_wide_names(tmp_path: Path) -> None:
    """A name of East Asian wide characters (two columns each on a terminal) or with a combining accent pushed
    the rest of its row off the columns of the others. A name over 120 characters is cut around an ellipsis
    (hunt 41 F10: ``test_ls_cuts_a_very_long_name_as_plots_do``); its row is aligned all the same."""
    import unicodedata

    long = "encoder/" * 30 + "weight"
    names = ["\u6743\u91cd/\u5c42", "cafe\u0301", long, "b"]
    with Writer(tmp_path / "run") as w, w.stepping():
        for name in names:
            w.save(name, np.zeros(2, dtype=np.float32), ["weights"])

    def width(text: str) -> int:  # the columns a terminal gives text
        wide = [unicodedata.east_asian_width(c) in "WF" for c in text if not unicodedata.combining(c)]
        return len(wide) + sum(wide)

    for env in ({}, {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": "ascii"}):  # escapes are wider than the name
        lines = cli("ls", str(tmp_path / "run"), env=env).stdout.splitlines()
        rows = lines[lines.index(next(line for line in lines if line.startswith("tensor "))) :]
        starts = {width(row[: row.index("weights" if i else "collections")]) for i, row in enumerate(rows) if i != 1}
        assert len(starts) == 1 and len(rows) == 6, rows
        assert any(row.startswith(long[:59]) and f"{long[-59:]}  " in row for row in rows)


# ------------------------------------------------------------ --json errors
@pytest.mark.parametrize(
    ("args", "kind", "message"),
    [
        (["show", "{run}", "no/such"], "unknown_name", "no tensor named 'no/such'"),
        (["ls", "{file}"], "not_found", "it is a file"),
        (["check", "{missing}"], "not_found", "nothing exists there"),
        (["rules", "{run}", "--rule", "nosuch"], "unknown_name", "no built-in rule 'nosuch'"),
        (["rules", "{run}", "--rule", "overfit:nosuch=1"], "unknown_name", "no parameter 'nosuch' of Overfit"),
        (["rules", "{run}", "--rule", "loss_not_decreasing:window=abc"], "usage", "window: expected int"),
        (["rules", "{run}", "--rule", "overfit:patience=0"], "usage", "--rule 'overfit:patience=0': patience"),
        (["rules", "{run}", "--rule", "overfit:patience"], "usage", "expected param=value, got 'patience'"),
        (["report", "{run}", "--rule", "overfit:patience=0", "-o", "{html}"], "usage", "patience: expected"),
        (["rules"], "usage", "PATH is required"),
        (["show", "{run}"], "usage", "the following arguments are required: name"),
        (["show", "{run}", "fc1.weight", "--step", "x"], "usage", "invalid int value: 'x'"),
    ],
)
def test_a_json_command_that_fails_prints_one_error_object(
    trial_dir: Path, tmp_path: Path, args: list[str], kind: str, message: str
) -> None:
    """A script reading stdout got nothing (invalid JSON) when the command exited 2."""
    (tmp_path / "a_file").write_text("x")
    paths = {"run": str(trial_dir), "file": str(tmp_path / "a_file"), "missing": str(tmp_path / "nope")}
    paths["html"] = str(tmp_path / "report.html")  # report: nothing is written
    result = cli(*[a.format(**paths) for a in args], "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = strict_json(result.stdout)["error"]
    assert (error["command"], error["kind"]) == (args[0], kind)
    assert message in error["message"] and message in result.stderr
    assert not (tmp_path / "report.html").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "args",
    [
        ["check", "{run}", "--json"],
        ["rules", "{run}", "--rule", "loss_not_decreasing", "--json"],
        ["show", "{run}", "losses/loss", "--json"],
        ["show", "{run}", "no/such", "--json"],  # an error first, then its JSON object cannot be written
        ["ls", "{run}", "--json"],
        ["ls", "{run}"],
    ],
)
def test_a_stdout_that_cannot_be_written_is_an_error_of_one_line(trial_dir: Path, args: list[str]) -> None:
    """``--json`` to a full disk (``> /dev/full``) printed two tracebacks (the error object was written to the
    stdout that had just failed) and exited 1, which ``check`` and ``rules`` use for "problems found"."""
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "tensortap.cli", *[a.format(run=trial_dir) for a in args]],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    expected = "no tensor named 'no/such'" if "no/such" in args else "[Errno 28] No space left on device"
    assert line.startswith(f"tensortap {args[0]}: ") and expected in line, line


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "{run}"],
        ["ls", "{run}", "--json"],
        ["show", "{run}", "losses/loss"],
        ["export", "{run}"],
        ["rules", "{run}", "--rule", "exploding_tensor", "--json"],
    ],
)
def test_a_closed_stdout_is_an_error_of_one_line(trial_dir: Path, args: list[str]) -> None:
    """hunt 41 F1: run with standard output closed (``>&-``, as cron or a service may run it), Python gives no
    ``sys.stdout``: ``ls`` and ``show`` said "unexpected error: AttributeError(...)", and ``--json`` printed a
    traceback and exited 1, which ``rules`` uses for "a rule fired" (the rule had not)."""
    result = subprocess.run(
        [sys.executable, "-m", "tensortap.cli", *[a.format(run=trial_dir) for a in args]],
        preexec_fn=lambda: os.close(1),
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line == "tensortap: standard output is closed: give the command one (> FILE, > /dev/null)"


def test_export_tensorboard_takes_collection_and_refuses_output(trial_dir: Path, tmp_path: Path) -> None:
    """``--collection`` was ignored by ``export tensorboard`` (every tensor written) and ``-o`` too (no file)."""
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    def tags(logdir: Path) -> dict[str, list[str]]:
        events = ea_mod.EventAccumulator(str(logdir / "train"), size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        return {kind: sorted(events.Tags()[kind]) for kind in ("scalars", "histograms")}

    result = cli("export", "tensorboard", str(trial_dir), str(tmp_path / "losses"), "--collection", "losses", "--json")
    assert result.returncode == 0, result.stderr
    assert strict_json(result.stdout) == {
        "path": str(trial_dir),
        "logdir": str(tmp_path / "losses"),
        "scalars": 3,
        "histograms": 0,
    }
    assert tags(tmp_path / "losses") == {"scalars": ["losses/loss"], "histograms": []}
    err = user_error(cli("export", "tensorboard", str(trial_dir), str(tmp_path / "no"), "--collection", "nosuch"))
    assert "no collection 'nosuch'" in err and not (tmp_path / "no").exists()
    err = user_error(cli("export", "tensorboard", str(trial_dir), str(tmp_path / "tb"), "-o", str(tmp_path / "x.csv")))
    assert err == (
        "tensortap export: -o/--output is for tables (CSV, Parquet); `export tensorboard` writes into LOGDIR "
        f"({tmp_path / 'tb'})\n"
    )
    assert not (tmp_path / "tb").exists() and not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("command", ["export", "plot", "report"])
def test_an_output_whose_folder_is_a_file_or_missing_says_so(command: str, trial_dir: Path, tmp_path: Path) -> None:
    """``export -o afile/x.csv`` said pandas' "Cannot save file into a non-existent directory: 'afile'" of a folder
    that was a file; ``report`` ran its rules, then failed with a bare "[Errno 20] Not a directory" (session 49's
    hunt 20). Each says what is wrong with the path, exit 2, before reading the trial."""
    pytest.importorskip("pandas")
    base = tmp_path / "out"
    base.mkdir()
    (base / "afile").write_text("")
    suffix = {"export": ".csv", "plot": ".png", "report": ".html"}[command]
    for folder, why in (("afile", "is a file, not a folder"), ("nodir", "no folder")):
        out = str(base / folder / f"x{suffix}")
        err = user_error(cli(command, str(trial_dir), "-o", out))
        said = f"{base / folder} {why}" if folder == "afile" else f"{why} {base / folder}"
        assert err == f"tensortap {command}: output: {out!r}: {said}\n", err
    assert sorted(p.name for p in base.iterdir()) == ["afile"]


def test_an_output_under_home_or_at_a_url_is_written(trial_dir: Path, tmp_path: Path) -> None:
    """``-o ~/x.csv`` and ``export_table(trial, "memory://...")`` were written by pandas; 806f9d5's folder check
    refused both ("no folder ~", "no folder memory:"); ``plot -o ~/x.png`` was an error (session 49's hunt 22)."""
    pytest.importorskip("pandas")
    fsspec = pytest.importorskip("fsspec")
    from tensortap.trial.export import export_table

    assert cli("export", str(trial_dir), "-o", "~/x.csv", env={"HOME": str(tmp_path)}).returncode == 0
    assert (tmp_path / "x.csv").read_text().startswith("worker,")
    pytest.importorskip("matplotlib")  # and matplotlib took ~ for a folder's name (it was an error before)
    assert cli("plot", str(trial_dir), "losses/loss", "-o", "~/x.png", env={"HOME": str(tmp_path)}).returncode == 0
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG")
    rows = export_table(tensortap.create_trial(trial_dir), "memory://tensortap-out/x.csv")
    assert rows and fsspec.filesystem("memory").cat("/tensortap-out/x.csv").startswith(b"worker,")
    # a URL at its file system's root (written by the storage of the URL's folder since session 58: "memory:/")
    assert export_table(tensortap.create_trial(trial_dir), "memory://tensortap-root-x.csv") == rows
    assert fsspec.filesystem("memory").cat("/tensortap-root-x.csv").startswith(b"worker,")


def test_export_tensorboard_into_a_folder_of_an_earlier_export_is_refused(trial_dir: Path, tmp_path: Path) -> None:
    """A second export into one LOGDIR wrote a second event file beside the first: TensorBoard showed every
    point twice (session 49's hunt 20). It is refused (exit 2), naming an earlier event file; nothing is written."""
    pytest.importorskip("tensorboardX")
    assert cli("export", "tensorboard", str(trial_dir), str(tmp_path / "tb")).returncode == 0
    before = sorted(p for p in (tmp_path / "tb").rglob("*") if p.is_file())
    assert before
    err = user_error(cli("export", "tensorboard", str(trial_dir), str(tmp_path / "tb")))
    assert any(f"{tmp_path / 'tb'} holds event files already ({path})" in err for path in before), err
    assert sorted(p for p in (tmp_path / "tb").rglob("*") if p.is_file()) == before
    other = tmp_path / "runs" / "lightning_logs" / "version_0" / "events.out.tfevents.1.host"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"")  # another run in the folder, which the export does not write: left alone
    assert cli("export", "tensorboard", str(trial_dir), str(tmp_path / "runs")).returncode == 0
    assert (tmp_path / "runs" / "train").is_dir()


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_export_tensorboard_into_a_url_of_an_earlier_export_is_refused_and_writes_nothing_beside(
    trial_dir: Path, tmp_path: Path, scheme: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 52 F2: into a URL LOGDIR (``file://``, ``memory://``, ``s3://``) a second export was not refused (the
    earlier event files were looked for with ``os.scandir`` of the URL, which never exists): TensorBoard drew every
    point twice. A ``file://`` LOGDIR also left empty folders ``./file:/...`` in the current folder (tensorboardX
    made them). The URL is listed through its storage and refused as a local LOGDIR; nothing is made elsewhere."""
    pytest.importorskip("tensorboardX")
    import fsspec

    from tensortap.cli import main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    logdir = f"file://{tmp_path}/tb" if scheme == "file" else f"memory://{tmp_path.name}-f2/tb"
    fs, root = fsspec.core.url_to_fs(logdir)
    assert main(["export", "tensorboard", str(trial_dir), logdir]) == 0
    capsys.readouterr()
    before = sorted(fs.find(root))
    assert before and all("/train/events.out.tfevents." in p for p in before)
    assert main(["export", "tensorboard", str(trial_dir), logdir, "--json"]) == 2
    error = strict_json(capsys.readouterr().out)["error"]
    assert f"{logdir} holds event files already ({logdir}/train/events.out.tfevents." in error["message"]
    assert sorted(fs.find(root)) == before
    assert list(cwd.iterdir()) == []


def test_rules_list_says_that_it_ignores_a_path(trial_dir: Path) -> None:
    """``rules PATH --list`` listed the built-in rules and ignored PATH without a word."""
    result = cli("rules", str(trial_dir), "--list", "--json")
    assert result.returncode == 0 and strict_json(result.stdout)[0]["name"]
    assert result.stderr == ("tensortap rules: --list lists the built-in rules and reads no trial: PATH ignored\n")
    assert cli("rules", "--list").stderr == ""


def test_options_that_do_nothing_together_are_named_and_slips_of_hunt_52(trial_dir: Path, tmp_path: Path) -> None:
    """hunt 52 F5 and F7: ``rules --idle-timeout`` without ``--follow``, ``rules --list`` with ``--follow``,
    ``--stop-training`` or a step option, and ``show --reduction --full`` were taken and ignored without a word:
    each is now named in a warning, as ``--list PATH`` was. ``export -o x.txt`` was kind ``input`` (``report``'s
    and ``plot``'s ``usage``), and ``rules --follow`` that stopped waiting before any step said "at step -1"."""
    result = cli("rules", str(trial_dir), "--rule", "exploding_tensor", "--idle-timeout", "5")
    assert result.returncode == 1  # it fired: the trial holds NaN
    assert "tensortap rules: --idle-timeout is for --follow (a run that waits for steps): ignored\n" in result.stderr
    result = cli("rules", "--list", "--follow", "--stop-training", "--start-step", "3")
    assert result.returncode == 0 and result.stderr == (
        "tensortap rules: --list lists the built-in rules and reads no trial: "
        "--follow, --stop-training, --start-step ignored\n"
    )
    result = cli("show", str(trial_dir), "losses/loss", "--step", "2", "--reduction", "mean", "--full")
    assert result.returncode == 0
    assert result.stderr == "tensortap show: --reduction shows one number a step: --full ignored\n"
    result = cli("export", str(trial_dir), "-o", str(tmp_path / "x.txt"), "--json")
    assert result.returncode == 2 and strict_json(result.stdout)["error"]["kind"] == "usage"
    (tmp_path / "empty").mkdir()
    result = cli("rules", str(tmp_path / "empty"), "--rule", "exploding_tensor", "--follow", "--idle-timeout", "0")
    assert "rules stop waiting before any step" in result.stderr and "step -1" not in result.stderr


def test_rules_follow_from_a_start_step_that_stops_waiting_before_it_says_so(tmp_path: Path) -> None:
    """re-read 58 (of session 57's diff) A5b: ``rules --follow --start-step 5`` that stopped waiting before any
    step said "rules stop waiting at step 4", a step it never saw."""
    (tmp_path / "empty").mkdir()
    args = ("--rule", "exploding_tensor", "--follow", "--idle-timeout", "0", "--start-step", "5")
    result = cli("rules", str(tmp_path / "empty"), *args)
    assert "rules stop waiting before any step from step 5" in result.stderr and "step 4" not in result.stderr


# ---------------------------------------------------- hunt 33 (M3, L1, L4, L6, L8, L9), hunt 31 (L2)
def write_reductions_only(out: Path) -> None:
    """A loss and a weight captured under a ReductionConfig without ``save_raw_tensor``: reductions only."""
    config = tensortap.ReductionConfig(reductions=["mean", "max"], norms=["l2"])
    with Writer(out, reduction_config=config) as w:
        for s in range(3):
            with w.stepping():
                w.save("losses/loss", np.float32(3 - s), ["losses"])
                w.save("fc1.weight", np.full((2, 3), s, dtype=np.float32), ["weights"])


def test_show_of_a_tensor_that_saved_only_reductions_prints_them(tmp_path: Path) -> None:
    """hunt 33 M3: ``show`` of a tensor that saved only reductions exited 2 telling to capture again with
    ``save_raw_tensor=True``; it now prints the saved reductions of each step (``--json``: ``reductions``),
    and ``--reduction`` one of them, as before; ``to_series()`` no longer calls a loss "not a scalar"."""
    write_reductions_only(tmp_path / "run")
    run = str(tmp_path / "run")
    result = cli("show", run, "losses/loss")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"step {s}: reductions only: l2 {3 - s} max {3 - s} mean {3 - s}" for s in range(3)
    ]
    data = strict_json(cli("show", run, "fc1.weight", "--step", "2", "--json").stdout)
    assert data["steps"] == [{"step": 2, "reductions": {"mean": 2.0, "max": 2.0, "l2": pytest.approx(np.sqrt(24))}}]
    assert cli("show", run, "losses/loss", "--reduction", "mean").stdout == "step 0: 3\nstep 1: 2\nstep 2: 1\n"
    loss = tensortap.create_trial(run).tensor("losses/loss")
    with pytest.raises(
        ValueError, match=r"has no values, only reductions were saved: pass reduction= one of l2, max, mean$"
    ):
        loss.to_series()
    assert loss.to_series("mean").to_dict() == {0: 3.0, 1: 2.0, 2: 1.0}
    with pytest.raises(tensortap.TensorUnavailableForStep, match=r"read one with reduction_value\(step, REDUCTION\)"):
        loss.value(0)


def test_step_lists_of_steps_saved_every_n_read_as_ranges(trial_dir: Path) -> None:
    """hunt 33 L1: steps saved every 2nd step printed ``0, 2, 4 (3 steps)`` (and ``...`` hid one number of a
    longer list); steps are consecutive where no saved step lies between, in ``ls`` and ``show``'s errors."""
    out = cli("ls", str(trial_dir)).stdout
    assert "train    0-4 (3 steps)" in out and "steps    0-4 (3 steps)" in out
    err = user_error(cli("show", str(trial_dir), "losses/loss", "--mode", "eval"))
    assert err == "tensortap show: 'losses/loss' has no eval step; it was saved at train steps 0-4 (3 steps)\n"


def test_show_of_a_tensor_whose_steps_wait_for_a_worker_says_so(tmp_path: Path) -> None:
    """hunt 33 L4: ``show`` of a tensor whose steps are all incomplete said "has no step" while ``ls`` listed
    its 3 steps: now it says they are not complete yet and which worker they wait for."""
    with Writer(tmp_path, rank=0, world_size=2) as w:
        for s in range(3):
            with w.stepping():
                w.save("losses/loss", np.float32(3 - s), ["losses"])
    err = user_error(cli("show", str(tmp_path), "losses/loss"))
    assert err == (
        "tensortap show: 'losses/loss' has no complete step yet: 3 saved steps wait for the other workers to "
        "write them (worker_1 has written nothing yet)\n"
    )


def test_show_worker_shows_the_steps_it_saved_before_the_other_workers_and_knows_its_workers(
    tmp_path: Path,
) -> None:
    """hunt 52 F1 and F6: ``show NAME --worker worker_1`` of a run whose rank 0 has not written yet said
    "'losses/loss' has no step saved by worker 'worker_1'" (exit 2) while ``--step 1`` and the API's
    ``values(worker="worker_1")`` read its steps: it listed the complete steps only. It shows every step the
    worker saved, as the API. A worker the trial does not have was "no step saved by worker" (kind ``input``),
    or with ``--step`` "did not save it": it is the API's unknown name with the closest names."""
    with Writer(tmp_path, rank=1, world_size=2) as w:
        for s in range(3):
            with w.stepping():
                w.save("losses/loss", np.float32(s), ["losses"])
    result = cli("show", str(tmp_path), "losses/loss", "--worker", "worker_1")
    assert (result.returncode, result.stdout) == (0, "step 0: 0\nstep 1: 1\nstep 2: 2\n"), result.stderr
    loss = tensortap.create_trial(tmp_path).tensor("losses/loss")
    assert loss.steps(worker="worker_1") == sorted(loss.values(worker="worker_1")) == [0, 1, 2]
    assert loss.steps(mode="train", worker="worker_1") == [0, 1, 2]
    for more in ([], ["--step", "1"]):
        result = cli("show", str(tmp_path), "losses/loss", "--worker", "worker_9", *more, "--json")
        error = strict_json(result.stdout)["error"]
        assert result.returncode == 2 and error["kind"] == "unknown_name"
        assert error["message"].startswith(f"no worker 'worker_9' in {tmp_path}; did you mean 'worker_1'")
    with pytest.raises(UnknownName, match="no worker 'worker_9'"):
        loss.value(0, worker="worker_9")


def test_mode_in_any_case_and_as_any_integer(tmp_path: Path) -> None:
    """hunt 33 L6: ``--mode EVAL`` was an argparse error while the API takes ``mode="EVAL"``, and
    ``Mode.parse(np.int64(2))`` was refused while ``2`` worked. A bool is no mode."""
    with Writer(tmp_path) as w:
        for mode in ("train", "eval"):
            with w.stepping(mode):
                w.save("losses/loss", np.float32(1.0), ["losses"])
    assert cli("show", str(tmp_path), "losses/loss", "--mode", "EVAL").stdout == "step 0 (eval): 1\n"
    assert tensortap.Mode.parse(np.int64(2)) is tensortap.Mode.EVAL
    assert tensortap.create_trial(tmp_path).steps(mode=np.int64(2)) == [0]
    with pytest.raises(ValueError, match="True is not a mode"):
        tensortap.Mode.parse(True)


def test_a_negative_step_is_refused_as_such(trial_dir: Path) -> None:
    """hunt 33 L8: ``value(-1)`` said "step -1 was not saved and never will be"; a negative step is now a
    ValueError naming it, and ``show --step -1`` exit 2, as ``rules --start-step -5``."""
    loss = tensortap.create_trial(trial_dir).tensor("losses/loss")
    for read in (loss.value, loss.has_raw, loss.workers):
        with pytest.raises(ValueError, match="step: expected a step >= 0, got -1"):
            read(-1)
    err = user_error(cli("show", str(trial_dir), "losses/loss", "--step", "-1"))
    assert err == "tensortap show: step: expected a step >= 0, got -1\n"


def test_plot_errors_name_the_run_by_its_path(trial_dir: Path, tmp_path: Path) -> None:
    """hunt 33 L9: ``plot`` named the run by its last path component (``in run``), ``show`` by its path."""
    err = user_error(cli("plot", str(trial_dir), "nope", "-o", str(tmp_path / "p.png")))
    assert err == f"tensortap plot: no tensor named 'nope' in {trial_dir}\n"


def test_ls_shows_the_run_folders_of_a_trial_and_of_a_folder(tmp_path: Path) -> None:
    """hunt 31 L2: after ``if_exists="new_run"`` (GridSearchCV's fits), later runs are in ``out/run-<n>``,
    each a trial: ``ls out`` showed the first fit alone, ``ls PARENT`` none of the run folders."""
    out = tmp_path / "parent" / "out"
    for fit in range(8):  # the first fit in `out`, as the XGBoost callback writes it, the others in run folders
        with Writer(out, if_exists="new_run" if fit else "error") as w, w.stepping():
            w.save("losses/loss", np.float32(1.0), ["losses"])
    text = cli("ls", str(out)).stdout
    assert (
        "runs     run-0, run-1, run-2, run-3, run-4 and 2 more: later runs in this folder, each a trial "
        f"(tensortap ls {out}/run-0)" in text
    )
    assert strict_json(cli("ls", str(out), "--json").stdout)["runs"] == [f"run-{n}" for n in range(7)]
    listing = cli("ls", str(tmp_path / "parent"))
    assert listing.stdout.startswith(f"{tmp_path / 'parent'} is not a trial; it holds 8 trials:")
    names = [r["name"] for r in strict_json(cli("ls", str(tmp_path / "parent"), "--json").stdout)["trials"]]
    assert names == ["out", *(f"out/run-{n}" for n in range(7))]
