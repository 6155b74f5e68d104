"""SPEC section 6: a crash leaves every published shard readable; SIGTERM, exit and fork behave."""

from __future__ import annotations

import multiprocessing
import signal
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.trials import run_steps
from helpers.writer_proc import value_for

import tensortap
from tensortap.backends.shard import ShardBuffer, ShardReader, write_shard
from tensortap.capture import Writer


def _check_every_h5_is_whole(out: Path) -> int:
    """Open and read every ``.h5`` file of the trial; return how many there are."""
    files = sorted(out.rglob("*.h5"))
    for path in files:
        with h5py.File(path, "r") as f:
            assert f.attrs["format"] == b"tensortap-shard"  # fixed-length UTF-8 (format 2)
        reader = ShardReader(str(path))
        reader.validate()
        reader.close()
    return len(files)


def _check_values(trial: tensortap.Trial, names: list[str]) -> None:
    for name in names:
        values = trial.tensor(name).values()
        assert list(values) == trial.steps()
        for step, v in values.items():
            np.testing.assert_array_equal(v, value_for(name, step, 0))


def test_sigkill_while_publishing_leaves_published_shards_readable(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path, "--max-steps", "1")  # every step is a shard: always publishing
    w.cmd("steps", n=3, names=["a", "b"])
    w.cmd("flush")
    w.cmd("spin")
    time.sleep(0.7)
    assert w.signal(signal.SIGKILL) == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial shard would warn
        assert _check_every_h5_is_whole(tmp_path) >= 3
        trial = tensortap.create_trial(tmp_path)
        steps = trial.steps()
        assert steps[:3] == [0, 1, 2]
        assert len(steps) > 3  # it was killed while publishing, not before
        assert steps == list(range(len(steps)))
        _check_values(trial, ["a", "b"])
    assert not trial.training_ended
    assert trial.end_reasons() == {}


def test_sigkill_loses_only_the_unpublished_buffer(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path)  # default policy: nothing is published before flush
    w.cmd("steps", n=4, names=["a"])
    w.cmd("flush")
    w.cmd("steps", n=3, names=["a"])
    assert w.signal(signal.SIGKILL) == -signal.SIGKILL
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    _check_values(trial, ["a"])
    assert not trial.training_ended


def test_sigterm_publishes_the_buffer_and_ends(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path)  # max 60 s per shard: everything is still buffered
    w.cmd("steps", n=5, names=["a"])
    assert not list(tmp_path.rglob("*.h5"))
    assert w.signal(signal.SIGTERM) == -signal.SIGTERM  # and the process still terminates
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3, 4]
    _check_values(trial, ["a"])
    assert trial.training_ended
    assert trial.end_reasons() == {"worker_0": "sigterm"}


def test_sigterm_runs_the_handler_the_program_had_before(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path, "--own-sigterm-handler")
    w.cmd("steps", n=2, names=["a"])
    assert w.signal(signal.SIGTERM) == 3  # the program's own handler decided how to exit
    w.expect("own handler")
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    assert trial.end_reasons() == {"worker_0": "sigterm"}


def test_sigterm_mid_step_drops_only_the_step_in_progress(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path)
    w.cmd("spin")
    time.sleep(0.5)
    assert w.signal(signal.SIGTERM) == -signal.SIGTERM
    assert _check_every_h5_is_whole(tmp_path) >= 1
    trial = tensortap.create_trial(tmp_path)
    steps = trial.steps()
    assert len(steps) > 1
    assert steps == list(range(len(steps)))
    _check_values(trial, ["a", "b"])
    assert trial.end_reasons() == {"worker_0": "sigterm"}


def test_interpreter_exit_without_close_publishes_and_ends(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path)
    w.cmd("steps", n=3, names=["a"], mode="EVAL")
    w.cmd("exit")
    status, err = w.wait()
    assert status == 0, err
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode="EVAL") == [0, 1, 2]
    _check_values(trial, ["a"])
    assert trial.training_ended
    assert trial.end_reasons() == {"worker_0": "exit"}


@pytest.mark.parametrize("shape", [(2,), (3,)])  # (3,): the half-added value made the column ragged
def test_rollback_after_a_half_staged_value(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """SIGTERM's handler may run while ``ShardBuffer.stage`` has added a value but not recorded it yet."""
    buf = ShardBuffer()
    buf.stage(0, "a", ["custom"], np.ones(2), {"mean": 1.0}, None)
    buf.commit(0, 1, 0)
    buf.columns["a"].add_raw(1, np.zeros(shape), 8)  # what stage() does first for step 1 ...
    buf.columns["a"].red.append((1, "mean", 0.0))  # ... before it records what it added
    buf.stage(1, "b", ["custom"], np.ones(1), {}, None)
    buf.rollback()
    assert list(buf.columns) == ["a"]
    path = tmp_path / "shard.h5"
    record = write_shard(str(path), "worker_0", 0, buf, "shards/worker_0/0000000000.h5")
    assert record["steps"] == [[0, 1, 0]]
    assert record["tensors"]["a"]["raw_steps"] == "*"
    reader = ShardReader(str(path))
    assert list(reader.values("a")) == [0]
    np.testing.assert_array_equal(reader.value("a", 0), np.ones(2))
    assert reader.reductions("a") == {(0, "mean"): 1.0}
    reader.close()


def _child_that_touches_the_hook(w: Writer) -> None:
    with w.stepping():
        w.save("a", np.zeros(2))
    w.close()


@pytest.mark.parametrize("target", [None, _child_that_touches_the_hook])
def test_forked_child_neither_hangs_nor_publishes_the_parents_steps(tmp_path: Path, target) -> None:
    """A DataLoader worker forked mid-training exits normally; only the parent writes the trial."""
    w = Writer(tmp_path)
    run_steps(w, 3)  # buffered in the parent when it forks
    child = multiprocessing.get_context("fork").Process(target=target, args=(w,) if target else ())
    child.start()
    child.join(timeout=20)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung and child.exitcode == 0
    assert not list(tmp_path.rglob("*.h5")) and not (tmp_path / "end").exists()
    run_steps(w, 2)
    w.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3, 4]
    assert trial.tensor("a").values()[4].shape == (3,)  # the parent's values, not the child's
    assert trial.end_reasons() == {"worker_0": "closed"}
