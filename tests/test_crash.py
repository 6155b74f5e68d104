"""SPEC section 6: a crash leaves every published shard readable; SIGTERM, exit and fork behave."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import h5py
import numpy as np
import pytest
from helpers.trials import run_steps
from helpers.writer_proc import value_for

import tensortap
from tensortap import ReductionConfig, processes
from tensortap.backends.shard import ShardBuffer, ShardReader, prepare_shard
from tensortap.capture import ShardPolicy, Writer, counting
from tensortap.capture.handoff import Done
from tensortap.capture.testing import numpy_histogram_rule, numpy_rule_edges
from tensortap.reductions import pending_histogram


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


def test_sigkill_while_publishing_leaves_published_shards_readable(
    tmp_path: Path, writer_proc, caplog: pytest.LogCaptureFixture
) -> None:
    w = writer_proc(tmp_path, "--max-steps", "1")  # every step is a shard: always publishing
    w.cmd("steps", n=3, names=["a", "b"])
    w.cmd("flush")
    w.cmd("spin")
    time.sleep(0.7)
    assert w.signal(signal.SIGKILL) == -signal.SIGKILL
    assert _check_every_h5_is_whole(tmp_path) >= 3
    trial = tensortap.create_trial(tmp_path)
    steps = trial.steps()
    assert steps[:3] == [0, 1, 2]
    assert len(steps) > 3  # it was killed while publishing, not before
    assert steps == list(range(len(steps)))
    _check_values(trial, ["a", "b"])
    assert not [r for r in caplog.records if r.name == "tensortap"]  # a partial shard would warn
    assert trial.training_ended  # its process is gone without an end marker
    assert trial.end_reasons() == {"worker_0": "killed"}


def test_sigkill_loses_only_the_unpublished_buffer(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path)  # default policy: nothing is published before flush
    w.cmd("steps", n=4, names=["a"])
    w.cmd("flush")
    w.cmd("steps", n=3, names=["a"])
    assert w.signal(signal.SIGKILL) == -signal.SIGKILL
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    _check_values(trial, ["a"])
    assert trial.end_reasons() == {"worker_0": "killed"}


def test_check_says_a_killed_worker_wrote_no_end_marker(tmp_path: Path, writer_proc) -> None:
    """``check`` said "ok: no problems" of a killed training with no word of it, and left it out of
    ``unended_workers`` (which the docs define as the workers without an end marker): ``end_reasons()``
    counts a killed worker as ended, and ``check`` took every ended worker for one that wrote its marker."""
    w = writer_proc(tmp_path)
    w.cmd("steps", n=2, names=["a"])
    w.cmd("flush")
    assert w.signal(signal.SIGKILL) == -signal.SIGKILL
    text = subprocess.run([sys.executable, "-m", "tensortap", "check", str(tmp_path)], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "note: worker_0 killed: its process ended without writing its end marker" in text.stdout
    assert "still running" not in text.stdout
    data = json.loads(
        subprocess.run(
            [sys.executable, "-m", "tensortap", "check", str(tmp_path), "--json"], capture_output=True, text=True
        ).stdout
    )
    assert data["ok"] is True and data["unended_workers"] == ["worker_0"]


@pytest.mark.torch
def test_a_live_reader_learns_that_a_killed_training_ended(tmp_path: Path, writer_proc) -> None:
    """A training killed with SIGKILL writes no end marker; its worker record names its process, so a
    reader on the same machine counts it as ended (``killed``) instead of waiting for it for ever."""
    w = writer_proc(tmp_path, "--torch")
    w.cmd("steps", n=4)  # steps 0-2 end at the next optimizer step; step 3 is still being recorded
    w.cmd("flush")
    trial = tensortap.create_trial(tmp_path)  # a live reader, opened while the training runs
    assert trial.steps() == [0, 1, 2]
    assert not trial.training_ended
    with pytest.raises(tensortap.StepNotYetAvailable):
        trial.wait_for_steps([3], timeout=0.5)
    w.cmd("steps", n=3)  # buffered: the kill loses them
    assert w.signal(signal.SIGKILL) == -signal.SIGKILL
    with pytest.raises(tensortap.NoMoreData):  # it waited until its timeout (for ever without one)
        trial.wait_for_steps([3], timeout=60)
    assert trial.training_ended
    assert trial.end_reasons() == {"worker_0": "killed"}
    assert trial.steps() == [0, 1, 2]
    np.testing.assert_array_equal(trial.tensor("weight").value(2), _torch_weights(3)[2]["weight"])
    later = tensortap.create_trial(tmp_path)  # a reader opened afterwards, by its first refresh
    assert later.end_reasons() == {"worker_0": "killed"}
    assert later.steps() == [0, 1, 2]
    follow = subprocess.run(
        [sys.executable, "-m", "tensortap", "rules", str(tmp_path), "--rule", "exploding_tensor", "--follow"],
        capture_output=True,
        text=True,
        timeout=120,  # it never ended before
    )
    assert follow.returncode == 0, follow.stderr
    assert "did not fire (3 steps up to step 2)" in follow.stdout
    assert "worker_0 killed: its process ended" in follow.stderr
    ls = subprocess.run([sys.executable, "-m", "tensortap", "ls", str(tmp_path)], capture_output=True, text=True)
    assert "killed" in ls.stdout


def _run_id(out: Path) -> str:
    return json.loads((out / "workers" / "worker_0.json").read_text())["run_id"]


@pytest.mark.parametrize("refreshed", [False, True], ids=["resumed-before-a-refresh", "seen-killed-first"])
def test_a_live_reader_follows_a_training_resumed_after_its_process_was_killed(
    tmp_path: Path, writer_proc, refreshed: bool
) -> None:
    """A process killed, a new one resumes its run (``run_id``, the same worker): a reader opened during
    the first one follows the second, instead of counting the worker as ended (``killed``) for ever."""
    first = writer_proc(tmp_path)
    first.cmd("steps", n=3, names=["a"])
    first.cmd("flush")
    trial = tensortap.create_trial(tmp_path)  # a live reader, opened while the first process runs
    assert trial.steps() == [0, 1, 2] and not trial.training_ended
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL
    if refreshed:  # the reader saw the first process gone before the second started
        trial.refresh()
        assert trial.end_reasons() == {"worker_0": "killed"}
    second = writer_proc(tmp_path, "--run-id", _run_id(tmp_path), "--first-step", "3")
    second.cmd("steps", n=2, names=["a"])
    second.cmd("flush")
    trial.refresh()
    assert trial.end_reasons() == {} and not trial.training_ended
    assert trial.steps() == [0, 1, 2, 3, 4]
    with pytest.raises(tensortap.StepNotYetAvailable):  # it waits for the second process's next step
        trial.wait_for_steps([5], timeout=0.5)
    second.cmd("steps", n=1, names=["a"])
    second.cmd("close")
    trial.wait_for_steps([5], timeout=30)
    assert trial.end_reasons() == {"worker_0": "closed"}
    _check_values(trial, ["a"])
    assert trial.problems() == {}


def test_a_live_reader_follows_a_training_resumed_after_its_end_marker(tmp_path: Path, writer_proc) -> None:
    """The first process wrote its end marker; a reader saw it; a process resumes the run (which removes
    that marker): the reader counts the worker as running again, then takes the new end marker."""
    first = writer_proc(tmp_path)
    first.cmd("steps", n=3, names=["a"])
    first.cmd("flush")
    trial = tensortap.create_trial(tmp_path)
    first.cmd("close")
    assert first.wait()[0] == 0
    trial.refresh()
    assert trial.training_ended and trial.end_reasons() == {"worker_0": "closed"}
    second = writer_proc(tmp_path, "--run-id", _run_id(tmp_path), "--first-step", "3")
    trial.refresh()  # before the second process published anything
    assert not trial.training_ended and trial.end_reasons() == {}
    with pytest.raises(tensortap.StepNotYetAvailable):
        trial.wait_for_steps([3], timeout=0.5)
    second.cmd("steps", n=2, names=["a"])
    second.cmd("flush")
    trial.wait_for_steps([4], timeout=30)
    assert trial.steps() == [0, 1, 2, 3, 4] and not trial.training_ended
    assert second.signal(signal.SIGKILL) == -signal.SIGKILL  # its own end: killed, not the first one's
    with pytest.raises(tensortap.NoMoreData):
        trial.wait_for_steps([5], timeout=60)
    assert trial.end_reasons() == {"worker_0": "killed"}
    _check_values(trial, ["a"])


def test_a_reader_takes_the_end_of_a_run_resumed_and_ended_between_two_of_its_refreshes(
    tmp_path: Path, writer_proc
) -> None:
    """The reader holds the first process's end marker; a second process resumes the run, publishes and
    ends with another reason before the reader looks again: it reads the new end marker, not the old one."""
    first = writer_proc(tmp_path)
    first.cmd("steps", n=3, names=["a"])
    first.cmd("close")
    assert first.wait()[0] == 0
    trial = tensortap.create_trial(tmp_path)
    assert trial.end_reasons() == {"worker_0": "closed"}
    second = writer_proc(tmp_path, "--run-id", _run_id(tmp_path), "--first-step", "3")
    second.cmd("steps", n=2, names=["a"])
    second.cmd("exit")  # the interpreter's exit closes it: reason exit
    assert second.wait()[0] == 0
    trial.refresh()
    assert trial.end_reasons() == {"worker_0": "exit"} and trial.training_ended
    assert trial.steps() == [0, 1, 2, 3, 4]
    _check_values(trial, ["a"])


def test_a_process_is_taken_for_gone_only_where_this_reader_can_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader decides that a worker's process has ended only on the same machine, PID namespace and
    user (``/proc`` may hide other users' processes: hidepid), and tells a reused process id apart."""
    me = processes.process_record()
    if me is None:
        pytest.skip("no /proc to tell (not Linux)")
    assert not processes.process_gone({"pid": os.getpid(), "process": me})
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {"pid": int(done.stdout), "process": me}
    assert processes.process_gone(gone)
    assert not processes.process_gone({**gone, "process": {**me, "boot_id": "another machine"}})
    assert not processes.process_gone({**gone, "process": {**me, "pid_namespace": "pid:[1]"}})
    assert processes.process_gone({"pid": os.getpid(), "process": {**me, "start_ticks": me["start_ticks"] + 1}})
    for bad in ({}, {"pid": str(gone["pid"]), "process": me}, {"pid": True, "process": me}, {**gone, "process": "x"}):
        assert not processes.process_gone(bad)
    monkeypatch.setattr(processes.os, "getuid", lambda: 1000)  # a reader that is not root
    assert processes.process_gone({**gone, "process": {**me, "uid": 1000}})
    assert not processes.process_gone({**gone, "process": {**me, "uid": 1001}})  # another user's: cannot tell


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


EXIT_WITHOUT_THREADS = """
import atexit, sys, threading
import numpy as np
from tensortap.capture import Writer

w = Writer(sys.argv[1])
for step in range(3):
    with w.stepping():
        w.save("a", np.full(4, float(step)))

def refuse_new_threads():  # what Python 3.12 does once the interpreter shuts down
    def start(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")
    threading.Thread.start = start

# registered after tensortap's exit handlers (threading's, then atexit's), each runs before them
threading._register_atexit(refuse_new_threads)
atexit.register(refuse_new_threads)
"""


def test_an_exit_where_no_thread_can_start_still_publishes(tmp_path: Path) -> None:
    """Python 3.12 starts no thread at interpreter shutdown: a script that ended without ``close()`` lost
    every step its last shard held (end reason ``error``: the shard layout helper's thread could not
    start). The exit handler now publishes without new threads."""
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITHOUT_THREADS, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "cannot publish" not in done.stderr, done.stderr
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2] and trial.end_reasons() == {"worker_0": "exit"}
    np.testing.assert_array_equal(trial.tensor("a").value(2), np.full(4, 2.0))


TRAINING_THAT_RAISES = """
import sys
import torch
import torch.nn.functional as F
import tensortap
import tensortap.torch as ttt



class Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise ValueError("no text")


torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
hook = ttt.capture(model, sys.argv[1], optimizer=opt, save_config=tensortap.SaveConfig(save_interval=1))
for step in range(6):
    opt.zero_grad()
    loss = F.cross_entropy(model(torch.ones(2, 4) * step), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    print(float(loss), flush=True)
    if step == 3:
        raise {exception}("the data loader broke")
"""


@pytest.mark.torch
@pytest.mark.parametrize(
    ("exception", "reason", "error"),
    [
        ("RuntimeError", "exception", "RuntimeError: the data loader broke"),
        ("KeyboardInterrupt", "exit", None),
        ("Unprintable", "exception", "Unprintable"),  # its str() raises: its type alone
    ],
    ids=["error", "ctrl-c", "unprintable"],
)
def test_a_training_that_raises_ends_with_the_reason_exception_and_its_text(
    tmp_path: Path, exception: str, reason: str, error: str | None
) -> None:
    """A script whose training raises (uncaught) ended with the reason ``exit``, as if it had finished:
    a reader could not tell a failed run from a finished one. An uncaught Ctrl-C stays ``exit``; an
    exception that cannot be printed still reaches the previous excepthook (its traceback is shown)."""
    script = TRAINING_THAT_RAISES.replace("{exception}", exception)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" in done.stderr and exception in done.stderr, done.stderr
    assert "Error in sys.excepthook" not in done.stderr, done.stderr
    trial = tensortap.create_trial(tmp_path)
    assert trial.end_reasons() == {"worker_0": reason}
    end = json.loads((tmp_path / "end" / "worker_0.json").read_text())
    assert end.get("error") == error
    losses = [float(line) for line in done.stdout.split()]
    assert trial.tensor("losses/loss").values(mode="train") == pytest.approx(dict(enumerate(losses)), abs=0)


@pytest.mark.parametrize("shape", [(2,), (3,)])  # (3,): the half-added value made the column ragged
def test_rollback_after_a_half_staged_value(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """SIGTERM's handler may run while ``ShardBuffer.stage`` has added a value but not recorded it yet."""
    buf = ShardBuffer()
    buf.stage(0, "a", ["custom"], np.ones(2), {"mean": 1.0}, None)
    buf.commit(0, 1, 0)
    buf.columns["a"].add_raw(1, np.zeros(shape), lambda nbytes: 8)  # what stage() does first for step 1 ...
    buf.columns["a"].red.append((1, "mean", 0.0))  # ... before it records what it added
    buf.stage(1, "b", ["custom"], np.ones(1), {}, None)
    buf.rollback()
    assert list(buf.columns) == ["a"]
    path = tmp_path / "shard.h5"
    record = prepare_shard(str(path), "worker_0", 0, buf, "shards/worker_0/0000000000.h5").write()
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


# ---------------------------------------------------------------- signals while a hook records a step
def _torch_weights(steps: int) -> list[dict[str, np.ndarray]]:
    """The parameters after each of ``steps`` optimizer steps of the helper's training, as training computes them."""
    from helpers.writer_proc import torch_model, torch_step

    model, opt, x, y = torch_model()
    out = []
    for _ in range(steps):
        torch_step(model, opt, x, y)
        out.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    return out


def _check_published_prefix(trial: tensortap.Trial, torch_run: bool) -> list[int]:
    steps = trial.steps()
    assert steps == list(range(len(steps)))
    if torch_run:
        expected = _torch_weights(len(steps))
        for name in ("weight", "bias"):
            for step, v in trial.tensor(name).values().items():
                np.testing.assert_array_equal(v, expected[step][name])  # bit-equal
    else:
        _check_values(trial, ["a"])
    return steps


@pytest.mark.parametrize("torch_run", [False, pytest.param(True, marks=pytest.mark.torch)], ids=["numpy", "torch"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_hook_records_a_step_publishes_that_step(
    tmp_path: Path, writer_proc, sig: signal.Signals, torch_run: bool
) -> None:
    """The signal lands inside ``end_step`` of step 2 (a step listener sends it): step 2 finished, so it is kept."""
    args = ["--signal-at", f"{sig.name}:2", *(["--torch"] if torch_run else [])]
    w = writer_proc(tmp_path, *args)
    w.send("steps", n=200, names=["a"], delay=0)
    w.expect("signalled 2")  # the handler did not end the process inside the hook
    if sig == signal.SIGTERM:
        status, err = w.wait()
        assert status == -signal.SIGTERM
    else:
        # the KeyboardInterrupt lands in the user's code: between two steps, or in the read of the next
        # command (stdin stays open: a program that ended first would drop the Ctrl-C still deferred)
        w.proc.wait(timeout=60)
        status, err = w.wait()
        assert "KeyboardInterrupt" in err and status != 0, err
    trial = tensortap.create_trial(tmp_path)
    steps = _check_published_prefix(trial, torch_run)
    assert 2 in steps
    assert trial.end_reasons() == {"worker_0": "sigterm" if sig == signal.SIGTERM else "exit"}


def test_sigterm_while_the_main_thread_holds_the_buffer_pool_lock(tmp_path: Path, writer_proc) -> None:
    """Today's deadlock: the handler published (taking the pool's lock) inside ``BufferPool.get``."""
    w = writer_proc(tmp_path, "--signal-in-pool", "SIGTERM", "--max-steps", "2")
    w.send("steps", n=2000, names=["a", "b"])
    assert w.proc.wait(timeout=60) == -signal.SIGTERM  # a deadlock never returns
    trial = tensortap.create_trial(tmp_path)
    steps = trial.steps()
    assert steps and steps == list(range(len(steps)))
    _check_values(trial, ["a", "b"])
    assert trial.end_reasons() == {"worker_0": "sigterm"}


def _interrupt_repeatedly(w, count: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        time.sleep(rng.uniform(0.002, 0.02))
        w.proc.send_signal(signal.SIGINT)


@pytest.mark.parametrize("handler", ["tensortap", "default"])
def test_caught_ctrl_c_leaves_a_consistent_trial(tmp_path: Path, writer_proc, handler: str) -> None:
    """A notebook: Ctrl-C lands anywhere, the user catches it and trains on; then the trial is consistent.

    ``default``: Python's own SIGINT handler is back (Jupyter restores it around every cell),
    so the KeyboardInterrupt may land inside tensortap's code.
    """
    w = writer_proc(tmp_path, "--max-steps", "3", *(["--default-sigint"] if handler == "default" else []))
    w.send("steps", n=100_000, names=["a", "b", "c"], catch=True)
    w.expect("catching")  # a Ctrl-C before the user's try block would end the process, as it should
    _interrupt_repeatedly(w, 40, seed=7)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(timeout=60) == -signal.SIGTERM, "".join(w.errors)
    trial = tensortap.create_trial(tmp_path)
    steps = set(trial.steps())
    assert steps
    for name in ("a", "b", "c"):
        values = trial.tensor(name).values()
        assert set(values) <= steps  # no tensor lists a step that steps() does not have
        for step, v in values.items():
            np.testing.assert_array_equal(v, value_for(name, step, 0))
    assert trial.problems() == {}


def test_a_done_flag_outlives_a_waiter_interrupted_holding_its_lock() -> None:
    """``Done`` (what the training thread waits on for the writer thread): a waiter interrupted between
    taking its lock and giving it back leaves the lock held; every later wait must still see the flag."""
    assert not Done().wait(0.05)  # never set: the wait ends at its timeout
    later = Done()
    threading.Timer(0.05, later.set).start()
    assert later.wait(10)  # set by another thread while waiting
    done = Done()
    done.set()
    done.set()  # once; a second call does nothing
    assert done._lock.acquire(timeout=0)  # an interrupted waiter's acquire, never released
    assert done.wait(0) and done.wait(1) and done.is_set()


# where a full shard is handed to the writer thread: the writer's commit, its job queue and the shard
# buffers. The standard library's Python code is not traced: an interrupt inside a threading.Condition
# (at the return of its __enter__, say) can leave its lock held, in any program, which is why the
# handoff waits on bare locks only (capture/handoff.py; test_caught_ctrl_c_leaves_a_consistent_trial).
HANDOFF_CODE = (
    os.path.join("capture", "writer.py"),
    os.path.join("capture", "handoff.py"),
    os.path.join("backends", "shard.py"),
)


#: What the interrupter counts: bytecodes, or lines on Python 3.12 and later, whose ``sys.settrace`` sends
#: no opcode event to frames that turn them on in their call event (3.12.1, 3.13.0; lines come through).
TRACE_EVENT = "opcode" if sys.version_info < (3, 12) else "line"


class Interrupter:
    """A tracer (``sys.settrace``) that raises ``KeyboardInterrupt`` before the ``at``-th bytecode
    (:data:`TRACE_EVENT`) executed in ``code`` (files), as Python's default SIGINT handler may; None:
    only counts them."""

    def __init__(self, at: int | None, code: tuple[str, ...] = HANDOFF_CODE) -> None:
        self.at = at
        self.code = code
        self.seen = 0
        self.fired = False

    def __call__(self, frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        if not frame.f_code.co_filename.endswith(self.code):
            return None
        frame.f_trace_opcodes = TRACE_EVENT == "opcode"
        frame.f_trace_lines = TRACE_EVENT == "line"
        return self.opcode

    def opcode(self, frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        if event == TRACE_EVENT:
            self.seen += 1
            if self.seen == self.at:
                self.fired = True
                raise KeyboardInterrupt  # a raising tracer is removed: one interrupt per run
        return self.opcode


def _steps_with_an_interrupt(w: Writer, body: Callable[[int], None]) -> list[int]:
    """Six steps of ``w``, each running ``body(step)``, which sets a tracer (``sys.settrace``) where the
    interrupt is to come; the user catches it and trains on. Return the steps that finished (their
    ``with`` block ended without an exception)."""
    finished = []
    for _ in range(6):
        try:
            with w.stepping():
                step = w.step
                body(step)
            finished.append(step)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
    return finished


def _train_through_an_interrupted_handoff(out: Path, at: int | None) -> tuple[list[int], Interrupter]:
    """Six steps in shards of two; the commit of step 3 hands the shard of steps 2 and 3 to the writer
    thread, interrupted before its ``at``-th bytecode. Return the steps that finished."""
    tracer = Interrupter(at)
    with Writer(out, shard_policy=ShardPolicy(max_steps=2)) as w:

        def body(step: int) -> None:
            for name in ("a", "b"):
                w.save(name, value_for(name, step, 0))
            if step == 3:
                assert w.writer is not None
                w.writer.drain()  # the shard before is published: the same bytecodes every time
                sys.settrace(tracer)

        return _steps_with_an_interrupt(w, body), tracer


def test_ctrl_c_at_every_bytecode_of_the_handoff_loses_no_finished_step(tmp_path: Path) -> None:
    """Python's default SIGINT handler (Jupyter's) raises between any two bytecodes; here, deterministically,
    at each bytecode of tensortap's code in the commit that hands a full shard to the writer thread.
    Every step that finished is published, values are right, and the trial is consistent."""
    _, reference = _train_through_an_interrupted_handoff(tmp_path / "reference", None)
    assert reference.seen > (50 if TRACE_EVENT == "opcode" else 30)  # the handoff ran, traced
    for at in range(1, reference.seen + 1):
        out = tmp_path / f"at{at}"
        finished, tracer = _train_through_an_interrupted_handoff(out, at)
        assert tracer.fired, f"bytecode {at} of {reference.seen}: the handoff ran fewer bytecodes"
        trial = tensortap.create_trial(out)
        steps = trial.steps()
        assert set(finished) <= set(steps), f"interrupted at bytecode {at}: lost finished steps"
        assert set(finished) >= set(range(6)) - {3}  # only the interrupted step may be missing
        for name in ("a", "b"):
            values = trial.tensor(name).values()
            assert sorted(values) == steps, f"interrupted at bytecode {at}"
            for step, v in values.items():
                np.testing.assert_array_equal(v, value_for(name, step, 0))
        assert trial.problems() == {} and trial.end_reasons() == {"worker_0": "closed"}


def _histograms_through_an_interrupted_handoff(out: Path, at: int | None) -> tuple[list[int], Interrupter]:
    """Six steps saving a histogram of ``h`` every step; step 3, which takes its values into a buffer of the
    counting thread and hands them over, is interrupted before its ``at``-th bytecode in
    ``capture/counting.py``. Return the steps that finished."""
    tracer = Interrupter(at, (os.path.join("capture", "counting.py"),))
    with Writer(out, reduction_config=ReductionConfig(histogram=8)) as w:

        def body(step: int) -> None:
            if step == 3:
                assert counting.COUNTER.wait_idle(5.0)  # a recycled buffer is free: the same bytecodes
                sys.settrace(tracer)
            w.save("h", _histogram_value(step))

        return _steps_with_an_interrupt(w, body), tracer


def _histogram_value(step: int) -> np.ndarray:
    """``h`` at ``step``: wider every step, so later values also fill the outer bins."""
    return np.linspace(-1.0, 1.0, 50, dtype=np.float32) * (1 + 0.3 * step)


def test_ctrl_c_at_every_bytecode_of_the_histogram_handoff_loses_nothing(tmp_path: Path) -> None:
    """The training thread's side of the counting thread (a buffer to copy into, the step's histograms
    handed over), interrupted at each of its bytecodes: every finished step's histogram is the NumPy
    rule's on the value at save, and the counting thread still counts (no lock left held)."""
    _, reference = _histograms_through_an_interrupted_handoff(tmp_path / "reference", None)
    assert reference.seen > (20 if TRACE_EVENT == "opcode" else 10)  # the histogram was taken and handed over
    edges = numpy_rule_edges(_histogram_value(0), 8)
    for at in range(1, reference.seen + 1):
        out = tmp_path / f"at{at}"
        finished, tracer = _histograms_through_an_interrupted_handoff(out, at)
        assert tracer.fired, f"bytecode {at} of {reference.seen}: the handoff ran fewer bytecodes"
        assert set(finished) >= set(range(6)) - {3}, f"interrupted at bytecode {at}"
        t = tensortap.create_trial(out).tensor("h")
        for step in finished:
            hist = t.histogram_value(step)
            np.testing.assert_array_equal(hist.edges, edges)
            expected = numpy_histogram_rule(_histogram_value(step), edges)
            np.testing.assert_array_equal(hist.counts, expected, err_msg=f"interrupted at bytecode {at}")
        assert counting.COUNTER.wait_idle(5.0) and counting.COUNTER.has_room(), f"interrupted at bytecode {at}"


def test_histograms_are_counted_by_the_waiting_thread_when_the_counting_thread_never_started() -> None:
    """An interrupt between claiming the counting thread's start (the first submit of the process)
    and starting it leaves no thread: ``wait_idle`` counts what was queued on the calling thread."""
    counter = counting.HistogramCounter()
    next(counter._claims)  # the start claimed, then interrupted before the thread was made
    values = np.linspace(-1.0, 1.0, 50, dtype=np.float32)
    edges = numpy_rule_edges(values, 8)
    hists = [pending_histogram(values * k, edges) for k in (1, 3)]
    counter.submit(hists)
    assert counter._thread is None and all(h.values is not None for h in hists)
    assert counter.wait_idle(5.0)
    assert all(h.values is None for h in hists)  # counted by wait_idle, not by resolve below
    for k, h in zip((1, 3), hists, strict=True):
        np.testing.assert_array_equal(h.resolve().counts, numpy_histogram_rule(values * k, edges))


# ---------------------------------------------------------------- the seeded crash campaign
CAMPAIGN_SEED = 20261130
CAMPAIGN_RUNS = 40  # half SIGKILL, half SIGTERM
# The documented crash window (docs/reliability.md): a SIGKILL loses at most the steps
# committed in the last max_seconds, plus the time one publish takes; the test allows 1 s for it.
PUBLISH_ALLOWANCE = 1.0


class ForkServer:
    """``writer_proc.py --fork-server``: forks one training child per run, imports paid once."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "helpers" / "writer_proc.py"), "--fork-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._answer() == "ready"

    def _answer(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _send(self, **cmd: object) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def run(self, out: Path, log: Path, seed: int, max_steps: int, max_seconds: float) -> int:
        answer = self._send(
            op="run", out=str(out), log=str(log), seed=seed, max_steps=max_steps, max_seconds=max_seconds
        )
        return int(answer.removeprefix("pid "))

    def wait(self, pid: int) -> int:
        return int(self._send(op="wait", pid=pid).removeprefix("status "))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _committed(log: Path) -> tuple[bool, list[tuple[int, float]]]:
    """Whether the child's writer existed, and the (step, monotonic time) of every step it logged as committed."""
    lines = log.read_text().splitlines() if log.exists() else []
    ready = bool(lines) and lines[0] == "ready"
    steps = [(int(s), float(t)) for s, t in (line.split() for line in lines[1:] if line.count(" ") == 1)]
    return ready, steps


def _wait_for_ready(log: Path) -> None:
    for _ in range(15000):  # 30 s at most
        if _committed(log)[0]:
            return
        time.sleep(0.002)
    raise AssertionError(f"{log}: the training child never started")


def test_seeded_crash_campaign(tmp_path: Path) -> None:
    """SIGKILL and SIGTERM at random points of a training child that publishes all the time.

    Every published shard reads; published steps are a prefix of the steps; every value is
    bit-equal to what training saved; SIGTERM keeps every committed step; SIGKILL loses only
    steps committed within the documented window.
    """
    rng = random.Random(CAMPAIGN_SEED)
    server = ForkServer()
    windows: list[float] = []
    try:
        for run in range(CAMPAIGN_RUNS):
            sig = signal.SIGKILL if run % 2 == 0 else signal.SIGTERM
            out, log = tmp_path / f"run{run}", tmp_path / f"run{run}.log"
            max_seconds = rng.choice([0.1, 0.25, 0.5])
            pid = server.run(out, log, rng.randrange(1 << 30), rng.choice([1, 4, 25, 1000]), max_seconds)
            if rng.random() < 0.9:  # else: while the writer is being set up
                _wait_for_ready(log)
                time.sleep(rng.uniform(0.0, 0.8))
            killed_at = time.monotonic()
            os.kill(pid, sig)
            assert server.wait(pid) == -sig, f"run {run}"
            ready, committed = _committed(log)
            if not ready:
                continue
            _check_every_h5_is_whole(out)
            trial = tensortap.create_trial(out)
            steps = trial.steps()
            assert steps == list(range(len(steps))), f"run {run}: not a prefix"
            if steps:
                _check_values(trial, ["a", "b"])
                assert trial.tensor("metrics/loss").values() == {s: np.float32(s) for s in steps}
            assert not trial.problems(), f"run {run}: {trial.problems()}"  # a partial or unreadable file
            lost = [(s, t) for s, t in committed if s >= len(steps)]
            if sig == signal.SIGTERM:
                assert not lost, f"run {run}: SIGTERM lost committed steps {lost[:3]}"
                assert trial.end_reasons() == {"worker_0": "sigterm"}
            elif lost:
                windows.append(killed_at - lost[0][1])
                assert windows[-1] <= max_seconds + PUBLISH_ALLOWANCE, f"run {run}: lost {len(lost)} steps"
    finally:
        server.close()
    print(f"crash campaign: {len(windows)} SIGKILL runs lost steps; longest window {max(windows, default=0):.3f} s")


# ---------------------------------------------------------------- interrupts while closing
def _close_interrupted(out: Path, at: int | None) -> Interrupter:
    """Five steps in shards of two, then ``close()`` interrupted before its ``at``-th bytecode of the hook's,
    the writer's and the handoff's code; the user catches the ``KeyboardInterrupt`` and calls ``close()``
    again, as in a notebook. Not the shard buffer's: close() empties the process's buffer pool, and a raise
    on the bytecodes that end its ``with`` block, before ``__exit__`` (which CPython's handler does not do,
    see test_ctrl_c_at_every_bytecode_of_the_histogram_handoff_loses_nothing), would leave its lock held."""
    code = tuple(os.path.join("capture", name) for name in ("writer.py", "handoff.py", "core.py"))
    tracer = Interrupter(at, code)
    w = Writer(out, shard_policy=ShardPolicy(max_steps=2))
    for step in range(5):
        with w.stepping():
            for name in ("a", "b"):
                w.save(name, value_for(name, step, 0))
    assert w.writer is not None
    w.writer.drain()  # the shards before are published: close() publishes step 4 and the end marker
    sys.settrace(tracer)
    try:
        w.close()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    w.close()
    return tracer


def test_ctrl_c_at_every_bytecode_of_close_then_close_again_loses_nothing(tmp_path: Path) -> None:
    """A Ctrl-C while ``close()`` waits for the last publish threw the jobs it waited for away: a second
    ``close()`` then waited for nothing, and the exit handlers too (the last steps and the end marker were
    lost at exit). Interrupted at each bytecode, then closed again: every step and the end marker are there
    when the second ``close()`` returns."""
    reference = _close_interrupted(tmp_path / "reference", None)
    assert reference.seen > (50 if TRACE_EVENT == "opcode" else 30)
    fired = 0
    for at in range(1, reference.seen + 1):
        out = tmp_path / f"at{at}"
        fired += _close_interrupted(out, at).fired  # the waits' loops run a few bytecodes more or less
        trial = tensortap.create_trial(out)
        assert trial.steps() == [0, 1, 2, 3, 4], f"interrupted at bytecode {at}"
        _check_values(trial, ["a", "b"])
        assert trial.problems() == {} and trial.end_reasons() == {"worker_0": "closed"}, f"bytecode {at}"
    assert fired >= reference.seen - 20


INTERRUPTED_EXIT = """
import os, sys, threading
import numpy as np
from tensortap.capture import Writer

writers = [Writer(os.path.join(sys.argv[1], str(i))) for i in range(3)]
for w in writers:
    for step in range(3):
        with w.stepping():
            w.save("a", np.full(4, float(step)))

HANDOFF = os.path.join("capture", "handoff.py")

def interrupt(frame, event, arg):  # once, in the exit handler: at a job's making, or its wait
    if event == "call" and frame.f_code.co_filename.endswith(HANDOFF) and frame.f_code.co_name == sys.argv[2]:
        sys.settrace(None)
        raise KeyboardInterrupt
    return None

# registered after tensortap's exit handler, it runs before it
threading._register_atexit(lambda: sys.settrace(interrupt))
"""


@pytest.mark.parametrize("where", ["__init__", "wait"])
def test_an_interrupt_in_the_exit_handler_still_closes_every_hook(tmp_path: Path, where: str) -> None:
    """A ``KeyboardInterrupt`` (or another library's signal handler raising, torch's SIGCHLD one) while the
    exit handler closes one hook stopped it there ("Exception ignored in ..."), and lost what that hook's
    close had handed off. The exit handler now closes every hook, closes the interrupted one again, and
    raises nothing at exit. ``__init__``: before the publish job is queued; ``wait``: waiting for it."""
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_EXIT, str(tmp_path), where], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "Exception ignored" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for i in range(3):
        trial = tensortap.create_trial(tmp_path / str(i))
        assert trial.steps() == [0, 1, 2] and trial.end_reasons() == {"worker_0": "exit"}, i
        np.testing.assert_array_equal(trial.tensor("a").value(2), np.full(4, 2.0))


CTRL_C_AT_THE_END = """
import os, signal, sys
import numpy as np
from tensortap.capture import Writer

w = Writer(sys.argv[1])

def ctrl_c(record):  # the hook calls this: the SIGINT lands in capture code and is deferred
    if record.step == 2:
        os.kill(os.getpid(), signal.SIGINT)

w.step_listeners.append(ctrl_c)
for step in range(3):
    with w.stepping():
        w.save("a", np.full(4, float(step)))
# the program ends here, 2 ms before the relay thread sends the Ctrl-C again: the exit handler (capture
# code too) finds it still deferred
"""


def test_a_ctrl_c_still_deferred_at_exit_is_dropped_after_closing(tmp_path: Path) -> None:
    """A Ctrl-C deferred in capture code as the program ends was raised inside the exit handler before
    anything was closed ("Exception ignored", KeyboardInterrupt tracebacks, the closing cut short). The
    program is ending: everything is closed (reason ``exit``) and the Ctrl-C dropped."""
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_AT_THE_END, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "KeyboardInterrupt" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2] and trial.end_reasons() == {"worker_0": "exit"}


FIRST_HOOK_IN_A_THREAD = """
import os, sys, threading, time
import numpy as np
from tensortap.capture import Writer

def train(w, n):
    for step in range(n):
        with w.stepping():
            w.save("a", np.full(4, float(step)))

first = []
t = threading.Thread(target=lambda: first.append(Writer(os.path.join(sys.argv[1], "thread"))))
t.start()
t.join()
train(first[0], 3)
if sys.argv[2] == "main":  # a later hook in the main thread installs the signal handlers
    train(Writer(os.path.join(sys.argv[1], "main")), 2)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("then", ["main", "none"])
def test_a_hook_made_first_in_another_thread(tmp_path: Path, then: str) -> None:
    """The first hook made in another thread than the main one cannot install the SIGTERM handler (Python
    sets handlers from the main thread only), and none was installed later either: SIGTERM lost the
    buffered steps of every hook of the process. A later hook made in the main thread installs it; until
    then one warning says what is not covered."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FIRST_HOOK_IN_A_THREAD, str(tmp_path), then],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert err.count("not the main thread") == 1 and "SIGTERM" in err, err
    if then == "none":  # documented: as after a SIGKILL, the buffered steps are lost
        assert not (tmp_path / "thread" / "end").exists()
        return
    for folder, steps in (("thread", [0, 1, 2]), ("main", [0, 1])):
        trial = tensortap.create_trial(tmp_path / folder)
        assert trial.steps() == steps and trial.end_reasons() == {"worker_0": "sigterm"}, folder
