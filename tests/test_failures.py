"""SPEC section 7: capture never breaks training; corrupt shards are skipped with a warning."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.trials import default_value, run_steps, write_trial

import tensortap
from tensortap import Mode, ShardUnreadable, StepState, TensorUnavailableForStep
from tensortap.backends import shard as shard_module
from tensortap.backends.shard import PreparedShard
from tensortap.capture import ShardPolicy, TensorOps, Writer
from tensortap.capture import writer as writer_module
from tensortap.capture.writer import IN_FLIGHT


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tensortap" and r.levelno >= logging.ERROR]


def _train(w: Writer, n: int = 3) -> None:
    """What a training loop does with the hook: every call must go through without raising."""
    for _ in range(n):
        with w.stepping():
            w.save("a", np.ones(3))
            w.save_scalar("loss", 0.5, collections=["losses"])
        assert not w.should_stop
    w.flush()


def _shard(out: Path, seq: int) -> Path:
    return out / "shards" / "worker_0" / f"{seq:010d}.h5"


@pytest.fixture
def unwritable(tmp_path: Path) -> Path:
    """A trial path whose parent is a regular file: nothing can be created there, even by root."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    return blocker / "trial"


@pytest.mark.parametrize("out", ["unwritable", "/proc/tensortap-trial"])
def test_unwritable_out_dir_logs_once_and_disables(
    out: str, unwritable: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = unwritable if out == "unwritable" else Path(out)
    caplog.set_level(logging.ERROR, logger="tensortap")
    w = Writer(path)
    assert w.failed
    _train(w)
    assert not w.begin_step()
    w.end_step()
    w.close()
    errors = _errors(caplog)
    assert len(errors) == 1
    assert str(path) in errors[0].getMessage()
    assert "capture is disabled" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the cause is logged with it
    assert not path.exists()


def test_unwritable_out_dir_raises_when_strict(unwritable: Path) -> None:
    with pytest.raises(RuntimeError, match=str(unwritable)) as info:
        Writer(unwritable, strict=True)
    assert isinstance(info.value.__cause__, OSError)


def test_tensor_that_cannot_be_converted_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tensortap")
    with Writer(tmp_path) as w:
        run_steps(w, 2)
        with w.stepping():
            w.save("a", default_value("a", 2))
            w.save("obj", np.array([object(), 1], dtype=object))
            w.save("obj", np.array([object(), 2], dtype=object))
        assert not w.failed  # the tensor is skipped; capture goes on
        _train(w)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "obj" in warnings[0].getMessage()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3, 4, 5]  # the step with the bad tensor keeps its other tensors
    assert trial.tensor("a").steps() == [0, 1, 2, 3, 4, 5]
    assert "obj" not in trial.tensor_names()
    assert trial.training_ended


class _AsItComes(TensorOps):
    """An adapter's ops that hand back whatever ``numpy.asarray`` makes of a value, as the Keras ops did of a
    TensorFlow ``IndexedSlices`` gradient (an object array) before they made it dense."""

    def prepare(self, value: Any, keys: Sequence[str], raw: bool) -> tuple[np.ndarray | None, dict[str, float], None]:
        return np.asarray(value), {}, None


class _AdapterWriter(Writer):
    ops = _AsItComes()


def test_a_value_an_adapter_cannot_store_is_skipped_with_one_warning_not_the_capture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An adapter's ops that let through a value of a dtype no shard holds: that tensor is skipped, once named;
    before, staging it failed and turned the whole capture off at its first step."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    with _AdapterWriter(tmp_path) as w:
        for step in range(3):
            with w.stepping():
                w.save("a", np.full(2, step, dtype=np.float32))
                w.save("sparse", np.array([object(), step], dtype=object))
        assert not w.failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sparse" in warnings[0] and "dtype object" in warnings[0]
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor("a").steps() == [0, 1, 2] and trial.tensor_names() == ["a"]


@pytest.mark.parametrize("error", [ValueError("bad batch"), KeyboardInterrupt()], ids=["ValueError", "Ctrl-C"])
def test_a_step_left_by_an_exception_is_dropped_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    """``with w.stepping():`` left half-way: the step is not written (it kept the tensors offered before)."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=2)) as w:
        run_steps(w, 1, names=("a", "b"))
        with pytest.raises(type(error)), w.stepping():
            w.save("a", default_value("a", 1))
            raise error
        run_steps(w, 2, names=("a", "b"))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 2, 3]
    for name in ("a", "b"):
        values = trial.tensor(name).values()
        assert sorted(values) == [0, 2, 3]
        for step, v in values.items():
            np.testing.assert_array_equal(v, default_value(name, step))
    assert trial.end_reasons() == {"worker_0": "closed"}
    assert trial.problems() == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step 1 " in warnings[0] and type(error).__name__ in warnings[0]


def test_a_ctrl_c_that_leaves_the_hooks_with_block_mid_step_drops_that_step(tmp_path: Path) -> None:
    """A step opened by ``begin_step`` and left by an uncaught Ctrl-C is dropped, as the exit handlers do."""
    with pytest.raises(KeyboardInterrupt), Writer(tmp_path) as w:
        run_steps(w, 1, names=("a", "b"))
        w.begin_step()
        w.save("a", default_value("a", 1))
        raise KeyboardInterrupt
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0] and trial.tensor_names() == ["a", "b"]
    assert trial.end_reasons() == {"worker_0": "closed"}
    _ended_at(tmp_path, 0)


def _ended_at(out: Path, step: int, mode: str = "TRAIN") -> None:
    """The end marker says the training reached ``step`` (the last of ``mode``), and readers say there is no
    step after it: a step dropped last is no step of the trial (it counted one, which readers called "not
    saved and never will be", and said the training ended there)."""
    end = json.loads((out / "end" / "worker_0.json").read_text())
    assert (end["last_step"], end["mode_steps"]) == (step, {mode: step})
    with pytest.raises(tensortap.NoMoreData, match=f"ended at step {step}"):
        tensortap.create_trial(out).tensor("a").value(step + 1)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_step_dropped_last_is_not_reached(tmp_path: Path, error: BaseException) -> None:
    """The last step left by an exception (caught, or a Ctrl-C that ends the run) is not counted as reached."""
    with pytest.raises(type(error)), Writer(tmp_path) as w:
        run_steps(w, 2, names=("a",))
        with w.stepping():
            w.save("a", default_value("a", 2))
            raise error
    _ended_at(tmp_path, 1)
    with Writer(tmp_path / "caught") as w:
        run_steps(w, 2, names=("a",))
        with pytest.raises(type(error)), w.stepping():
            raise error
    _ended_at(tmp_path / "caught", 1)
    with pytest.raises(type(error)), Writer(tmp_path / "begun") as w:  # the exit handlers' drop (close_for_exit)
        run_steps(w, 2, names=("a",))
        w.begin_step()
        raise error
    _ended_at(tmp_path / "begun", 1)


def test_tensor_that_cannot_be_converted_raises_when_strict(tmp_path: Path) -> None:
    with Writer(tmp_path, strict=True) as w, w.stepping():
        with pytest.raises(RuntimeError, match="'obj'"):
            w.save("obj", np.array(["text"]))


def _break_publishing(out: Path) -> Callable[[], None]:
    """Make publishing fail (the shards folder is a file); return what puts back the shards published before (the
    storage is back): a reader looks for the shards of the records it reads."""
    aside = out.parent / f"{out.name}-shards"
    shutil.move(out / "shards", aside)
    (out / "shards").write_text("in the way")

    def restore() -> None:
        (out / "shards").unlink()
        shutil.move(aside, out / "shards")

    return restore


def test_publish_failure_mid_run_logs_once_and_disables(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tensortap")
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    run_steps(w, 2)
    w.flush()
    live = tensortap.create_trial(tmp_path, refresh_interval=0)
    restore = _break_publishing(tmp_path)
    run_steps(w, 3)
    w.flush()
    assert w.failed
    # training goes on without capture: live readers (rules --follow) must not wait for it
    assert live.training_ended
    _train(w)
    w.close()
    errors = _errors(caplog)
    assert len(errors) == 1
    assert "cannot publish" in errors[0].getMessage()
    restore()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    # the end marker still tells live readers (rules --follow) that nothing more will come, and why
    assert trial.end_reasons() == {"worker_0": "error"}
    end = json.loads((tmp_path / "end" / "worker_0.json").read_text())
    assert "Not a directory" in end["error"]
    w.close_for_exit("exit")  # at interpreter exit: nothing left to do, and nothing to fail


def test_an_end_marker_the_storage_refused_when_capture_turned_off_is_written_at_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Capture turned off by a storage error, and the end marker refused then too: the storage came back before
    ``close()``, which did not try again, so readers later said the worker was killed (its steps lost)."""
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    run_steps(w, 2)
    w.flush()
    restore = _break_publishing(tmp_path)
    shutil.rmtree(tmp_path / "end", ignore_errors=True)
    (tmp_path / "end").write_text("in the way")
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        run_steps(w, 2)
        w.flush()
        assert w.failed
        (tmp_path / "end").unlink()  # the storage is back
        restore()
        w.close()
    refused = [r.getMessage() for r in caplog.records if "cannot write the end marker" in r.getMessage()]
    assert len(refused) == 1 and refused[0].startswith(
        f"tensortap: cannot write the end marker of worker_0 to {tmp_path}:"
    )
    trial = tensortap.create_trial(tmp_path)
    assert trial.end_reasons() == {"worker_0": "error"} and trial.steps() == [0, 1]


def test_a_disk_that_fills_while_values_are_written_logs_once_and_keeps_what_was_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The values go into the shard file with ``os.pwrite`` after HDF5 has laid it out: a full disk
    there fails that publish like any other (once, logged), and leaves no partial shard behind."""
    import errno
    import os

    from tensortap.backends import shard

    caplog.set_level(logging.ERROR, logger="tensortap")
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    run_steps(w, 2)
    w.flush()

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shard.os, "pwrite", full)
    monkeypatch.setattr(shard.os, "pwritev", full)
    run_steps(w, 3)
    w.flush()
    assert w.failed
    w.close()
    errors = _errors(caplog)
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    assert trial.end_reasons() == {"worker_0": "error"}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no partial shard left


class _HeldPublishes:
    """The writer's shard publishes, held: the n-th waits until ``gates[n]`` opens (the last gate for any
    after), then publishes for real; ``begun`` is released as each one begins, ``keys`` lists them."""

    def __init__(self, w: Writer, monkeypatch: pytest.MonkeyPatch, gates: int) -> None:
        assert w.writer is not None
        storage = w.writer.storage
        publish = storage.publish_file
        self.gates = [threading.Event() for _ in range(gates)]
        self.begun = threading.Semaphore(0)
        self.keys: list[str] = []

        def held(local: str, key: str) -> None:
            gate = self.gates[min(len(self.keys), gates - 1)]
            self.keys.append(key)
            self.begun.release()
            assert gate.wait(60)
            publish(local, key)

        monkeypatch.setattr(storage, "publish_file", held)


def _hand_off_while_shard_0_is_held(w: Writer, held: _HeldPublishes) -> threading.Thread:
    """Step 0 (shard 0, held at its gate) and the steps after it up to IN_FLIGHT shards handed off, none
    of which waits; then one more step on another thread, whose hand-off waits for shard 0."""
    run_steps(w, 1)  # shard 0 is handed off; the writer thread holds it at its gate
    assert held.begun.acquire(timeout=60)
    run_steps(w, IN_FLIGHT - 1)  # handed off behind shard 0, without waiting for it
    last = threading.Thread(target=run_steps, args=(w, 1))
    last.start()  # this shard is full at once: its hand-off waits for shard 0
    last.join(1.0)
    assert last.is_alive()
    return last


def test_a_full_shard_waits_while_the_one_before_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ShardPolicy.max_bytes bounds the memory of unpublished steps: IN_FLIGHT shards are published
    while the next is built, and the training waits (backpressure) before it would hold one more."""
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    held = _HeldPublishes(w, monkeypatch, gates=1)
    last = _hand_off_while_shard_0_is_held(w, held)
    assert w.writer is not None
    # shard 0 (publishing), the shards handed off behind it, the one being built
    assert len(w.writer._buffers) == IN_FLIGHT + 2
    held.gates[0].set()
    last.join(60)
    assert not last.is_alive()
    w.close()
    assert tensortap.create_trial(tmp_path).steps() == list(range(IN_FLIGHT + 1))


def test_a_hand_off_waits_for_the_shards_before_it_not_for_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job that publishes shard 0 stops there: it used to go on to shard 1 when shard 1 was
    handed off meanwhile, so the training, waiting for that job, waited for shard 1's publish too
    (every other hand-off of a training saving every step waited for a whole publish)."""
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    held = _HeldPublishes(w, monkeypatch, gates=2)
    last = _hand_off_while_shard_0_is_held(w, held)
    held.gates[0].set()
    assert held.begun.acquire(timeout=60)  # shard 1's publish began, and is held at its gate
    last.join(30)  # less than the policy's timeout (60 s), past which a hand-off stops waiting
    assert not last.is_alive()  # the training went on while shard 1 was being published
    held.gates[1].set()
    w.close()
    assert len(held.keys) == IN_FLIGHT + 1
    assert tensortap.create_trial(tmp_path).steps() == list(range(IN_FLIGHT + 1))


class _HeldPrepares:
    """The writer's shard preparations (``prepare_shard``), shard 0's held until :meth:`release`; ``fail``
    lists the shards whose next preparation raises ``OSError`` (once each); ``done`` is set as each
    preparation ends, ``threads`` names the thread that wrote each shard's values."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: Sequence[int] = ()) -> None:
        self.gate = threading.Event()
        self.fail = list(fail)
        self.done = {seq: threading.Event() for seq in range(8)}
        self.threads: dict[int, str] = {}
        prepare, write = writer_module.prepare_shard, PreparedShard.write

        def held_prepare(path: str, worker: str, seq: int, *args: Any) -> PreparedShard:
            assert seq != 0 or self.gate.wait(60)
            try:
                if seq in self.fail:
                    self.fail.remove(seq)
                    raise OSError(f"cannot prepare shard {seq}")
                return prepare(path, worker, seq, *args)
            finally:
                self.done[seq].set()

        def watched_write(prepared: PreparedShard) -> dict[str, Any]:
            seq = prepared.record_head["seq"]
            self.threads[seq] = threading.current_thread().name
            if seq == 0:  # shard 1, handed off, is prepared meanwhile (or never, if this thread must)
                self.done[1].wait(10)
            return write(prepared)

        monkeypatch.setattr(writer_module, "prepare_shard", held_prepare)
        monkeypatch.setattr(PreparedShard, "write", watched_write)

    def release(self, w: Writer) -> None:
        """Release shard 0's preparation once shards 0 and 1 are handed off (neither waits)."""
        run_steps(w, 2)
        self.gate.set()


def test_the_next_shard_is_prepared_while_the_values_of_one_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two stages of a publish overlap: shard 0's values are written on a thread of their own while
    the writer thread prepares shard 1, whose publish then uses that preparation."""
    held = _HeldPrepares(monkeypatch)
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    held.release(w)
    w.close()
    assert held.threads == {0: "tensortap-shard-values", 1: "tensortap-writer"}  # shard 1: nothing behind it
    assert held.done[1].is_set() and not held.done[2].is_set()  # each shard prepared once
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    for step in (0, 1):
        np.testing.assert_array_equal(trial.tensor("a").value(step), default_value("a", step))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_shard_whose_early_preparation_failed_is_prepared_again_by_its_own_publish(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _HeldPrepares(monkeypatch, fail=[1])
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    held.release(w)
    w.close()
    assert not held.fail and not _errors(caplog)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    np.testing.assert_array_equal(trial.tensor("a").value(1), default_value("a", 1))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_shard_whose_preparation_fails_twice_turns_capture_off_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _HeldPrepares(monkeypatch, fail=[1, 1])
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    held.release(w)
    w.close()
    errors = _errors(caplog)
    assert len(errors) == 1 and "cannot prepare shard 1" in errors[0].getMessage()
    assert tensortap.create_trial(tmp_path).steps() == [0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_write_of_values_leaves_no_prepared_shard_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard 0's values cannot be written while shard 1 is prepared: capture turns off, shard 1's
    prepared file is removed, nothing is published."""
    held = _HeldPrepares(monkeypatch)
    monkeypatch.setattr(shard_module, "_pwrite_all", _no_space)
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    held.release(w)
    w.close()
    errors = _errors(caplog)
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    assert held.threads == {0: "tensortap-shard-values"} and held.done[1].is_set()
    assert tensortap.create_trial(tmp_path).steps() == []
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def _no_space(*_: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_publish_failure_raises_when_strict(tmp_path: Path) -> None:
    w = Writer(tmp_path, strict=True, shard_policy=ShardPolicy(max_steps=1))
    run_steps(w, 1)
    w.flush()
    _break_publishing(tmp_path)
    run_steps(w, 1)
    with pytest.raises(RuntimeError, match="cannot publish"):
        w.flush()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_shard_is_skipped_with_a_warning_naming_it(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    write_trial(tmp_path, 4, names=["a", "b"], shard_policy=ShardPolicy(max_steps=1))
    bad = _shard(tmp_path, 1)
    data = bad.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x89HDF junk" * 100, "empty": b""}[damage])
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    a = trial.tensor("a")
    np.testing.assert_array_equal(a.value(0), default_value("a", 0))
    with pytest.raises(TensorUnavailableForStep, match="read"):
        a.value(1)
    assert [r.name for r in caplog.records if "0000000001.h5" in r.getMessage()] == ["tensortap"]
    assert set(a.values()) == {0, 2, 3}
    np.testing.assert_array_equal(trial.tensor("b").values()[3], default_value("b", 3))
    assert list(trial.problems()) == ["shards/worker_0/0000000001.h5"]
    # once found unreadable, the shard's step is no longer listed as saved; its values still name the shard
    assert trial.steps() == [0, 2, 3]
    assert trial.has_passed_step(1) is StepState.UNAVAILABLE
    for tensor in (a, trial.tensor("b")):  # b at step 1 was never read: the shard was skipped for a
        with pytest.raises(ShardUnreadable, match=r"at step 1: shard shards/worker_0/0000000001.h5 cannot be read: "):
            tensor.value(1)
        with pytest.raises(ShardUnreadable, match=r"at train step 1: shard shards/worker_0/0000000001.h5 cannot "):
            tensor.value(1, mode=Mode.TRAIN)
        with pytest.raises(ShardUnreadable):
            tensor.reduction_value(1, "mean")
    assert [r.getMessage().count("0000000001.h5") for r in caplog.records if "0000000001.h5" in r.getMessage()] == [1]


def test_corrupt_shard_warns_once_through_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_trial(tmp_path, 3, shard_policy=ShardPolicy(max_steps=1))
    _shard(tmp_path, 2).write_bytes(b"garbage")
    trial = tensortap.create_trial(tmp_path)
    assert set(trial.tensor("a").values()) == {0, 1}
    assert set(trial.tensor("a").values()) == {0, 1}
    assert len([r for r in caplog.records if "0000000002.h5" in r.getMessage()]) == 1


def test_garbage_index_record_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_trial(tmp_path, 3, shard_policy=ShardPolicy(max_steps=1))
    (tmp_path / "index" / "worker_0" / "0000000001.json").write_text("{not json")
    (tmp_path / "index" / "worker_0" / "0000000007.json").write_text('{"format": "something else"}')
    trial = tensortap.create_trial(tmp_path)
    messages = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "0000000001.json" in messages and "0000000007.json" in messages
    assert trial.steps() == [0, 2]
    np.testing.assert_array_equal(trial.tensor("a").value(2), default_value("a", 2))


def test_stray_h5_file_is_ignored_by_the_trial(tmp_path: Path) -> None:
    write_trial(tmp_path, 2)
    (tmp_path / "shards" / "worker_0" / "stray.h5").write_bytes(b"junk")
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    assert set(trial.tensor("a").values()) == {0, 1}


def test_calls_after_close_are_harmless(tmp_path: Path) -> None:
    w = Writer(tmp_path)
    run_steps(w, 2)
    w.close()
    w.close()  # idempotent
    _train(w)
    w.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_a_name_that_is_not_valid_unicode_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tensortap")
    with Writer(tmp_path) as w:
        run_steps(w, 2)
        for _ in range(2):
            with w.stepping():
                w.save("lone \udc80 surrogate", np.ones(2))
                w.save("a", np.zeros(2))
        assert not w.failed
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "surrogate" in warnings[0].getMessage()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    assert trial.tensor_names() == ["a"]
    assert trial.training_ended


def test_a_trial_folder_removed_while_the_training_writes_it_is_said_and_stays_claimed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The trial's folder moved (or removed) mid-run: the writer made it anew without a word, with no worker
    record; ``check`` said "ok", and a later run, not refused, wrote over its shards and index records."""
    from tensortap.trial.check import storage_problems

    out = tmp_path / "trial"
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        w = Writer(out, shard_policy=ShardPolicy(max_steps=2))
        run_steps(w, 4, ["x"])
        w.flush()
        out.rename(tmp_path / "moved")
        run_steps(w, 6, ["x"])
        w.close()
    lost = [r.getMessage() for r in caplog.records if "lost the record" in r.getMessage()]
    assert len(lost) == 1 and "the 2 shard(s) published before are not there" in lost[0]
    trial = tensortap.create_trial(out)
    assert trial.steps() == list(range(4, 10)) and trial.end_reasons() == {"worker_0": "closed"}
    for step in trial.steps():
        np.testing.assert_array_equal(trial.tensor("x").value(step), default_value("x", step))
    assert tensortap.create_trial(tmp_path / "moved").steps() == [0, 1, 2, 3]
    with pytest.raises(tensortap.TrialExistsError):
        Writer(out)
    (out / "workers" / "worker_0.json").unlink()  # such a trial, made before: index records, no worker record
    with pytest.raises(tensortap.TrialExistsError):
        Writer(out)  # not taken for a free folder
    assert storage_problems(tensortap.create_trial(out).storage) == [
        "index/worker_0: index records of a worker that has no worker record (workers/worker_0.json)"
    ]


def test_a_reader_open_while_the_trial_folder_is_removed_forgets_the_steps_that_went_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader opened before the folder was removed kept listing the steps whose records and shards went with
    it (the worker's record, written again, is of the same run), while ``values()`` left them out and
    ``value`` raised (hunt 30 L1): now it lists what a fresh reader lists, and says why the others went."""
    out = tmp_path / "trial"
    w = Writer(out, shard_policy=ShardPolicy(max_steps=2))
    run_steps(w, 4, ["x"])
    w.flush()
    trial = tensortap.create_trial(out)
    assert trial.steps() == [0, 1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        shutil.rmtree(out)
        run_steps(w, 6, ["x"])
        w.flush()
        trial.refresh()
    assert trial.steps() == list(range(4, 10)) == tensortap.create_trial(out).steps()
    assert sorted(trial.tensor("x").values()) == trial.tensor("x").steps() == trial.steps()
    with pytest.raises(ShardUnreadable, match="its index record is gone"):
        trial.tensor("x").value(0)
    gone = [r.getMessage() for r in caplog.records if "its index record is gone" in r.getMessage()]
    assert len(gone) == 2, gone  # one per shard
    w.close()


def test_a_set_up_waits_while_the_storage_answers_and_no_longer() -> None:
    """hunt 35 F6, F7: a hook's set-up (the claim of its worker, an overwrite, a resume) was given
    ``ShardPolicy.timeout`` in all: a large trial on a store that answered every request (1,479 of them) was
    given up as one that "did not answer within 60 s". The bound is one on progress now: the set-up goes on
    while the storage answers its batches (here 8 answers 0.1 s apart, 0.8 s in all, under a bound of 0.5 s),
    and is given up once none came for the bound."""

    def answering(answered: Any) -> str:
        for _ in range(8):
            time.sleep(0.1)
            answered()
        return "set up"

    def stops_answering(answered: Any) -> None:
        answered()
        time.sleep(5)

    assert writer_module.run_bounded(answering, 0.5, "setting up") == "set up"
    with pytest.raises(TimeoutError, match=r"setting up: the storage did not answer within 0\.5 s"):
        writer_module.run_bounded(stops_answering, 0.5, "setting up")
