"""SPEC section 4 and 8: a trial read while another process is still writing it."""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.trials import run_steps, write_trial
from helpers.writer_proc import value_for

import tensortap
from tensortap import (
    NoMoreData,
    ShardUnreadable,
    StepNotYetAvailable,
    StepState,
    StepUnavailable,
    TensorUnavailable,
    TensorUnavailableForStep,
    TrialNotFound,
)
from tensortap.backends.storage import LocalStorage
from tensortap.capture import ShardPolicy, Writer
from tensortap.capture.writer import LIVE_SHARE, TrialWriter, publish_deadline
from tensortap.trial.index import SHARDS_ASKED_FOR
from tensortap.trial.trial import REFRESH_SECONDS


def _later() -> None:
    time.sleep(REFRESH_SECONDS + 0.05)  # the next call refreshes on its own


def test_live_trial_sees_new_steps_and_names_without_recreation(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path, "--interval", "2")
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == []
    assert trial.workers() == ["worker_0"]
    assert not trial.training_ended

    w.cmd("steps", n=5, names=["a"])  # steps 0..4, saved 0, 2, 4
    w.cmd("flush")
    _later()
    assert trial.steps() == [0, 2, 4]
    assert trial.tensor_names() == ["a"]
    np.testing.assert_array_equal(trial.tensor("a").value(2), value_for("a", 2, 0))
    assert trial.has_passed_step(2) is StepState.AVAILABLE
    assert trial.has_passed_step(3) is StepState.UNAVAILABLE  # skipped, and step 4 came after it
    assert trial.has_passed_step(6) is StepState.NOT_YET_AVAILABLE
    assert trial.last_complete_step() == 4
    with pytest.raises(StepUnavailable):
        trial.tensor("a").value(3)
    with pytest.raises(StepNotYetAvailable):
        trial.tensor("a").value(6)
    with pytest.raises(TensorUnavailable, match="'b'"):
        trial.tensor("b")

    w.cmd("steps", n=3, names=["a", "b"])  # steps 5..7, saved 6
    w.cmd("flush")
    _later()
    assert trial.steps() == [0, 2, 4, 6]
    assert trial.tensor_names() == ["a", "b"]
    b = trial.tensor("b")
    assert b.steps() == [6]
    np.testing.assert_array_equal(b.value(6), value_for("b", 6, 0))
    with pytest.raises(TensorUnavailableForStep, match="'b' was not saved at step 4"):
        b.value(4)
    assert trial.has_passed_step(6) is StepState.AVAILABLE

    w.cmd("close")
    _later()
    assert trial.training_ended
    assert trial.end_reasons() == {"worker_0": "closed"}
    assert trial.has_passed_step(7) is StepState.UNAVAILABLE  # counted (last step 7), not saved
    assert trial.has_passed_step(8) is StepState.UNAVAILABLE
    with pytest.raises(StepUnavailable):
        trial.tensor("a").value(7)
    with pytest.raises(NoMoreData):
        trial.tensor("a").value(8)
    with pytest.raises(NoMoreData):
        trial.wait_for_steps([8], timeout=5)
    trial.wait_for_steps([6, 7])  # passed: returns at once


def test_wait_for_steps(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path)
    w.cmd("steps", n=2, names=["a"])
    w.cmd("flush")
    trial = tensortap.create_trial(tmp_path)
    trial.wait_for_steps([0, 1], timeout=5)
    t0 = time.monotonic()
    with pytest.raises(StepNotYetAvailable) as info:
        trial.wait_for_steps([1, 2], timeout=0.3)
    assert info.value.step == 2
    assert 0.3 <= time.monotonic() - t0 < 5

    w.send("steps", n=1, names=["a"], delay=0.5)  # step 2 lands in about half a second
    w.send("flush")
    t0 = time.monotonic()
    trial.wait_for_steps([2], timeout=20)
    assert time.monotonic() - t0 >= 0.3
    np.testing.assert_array_equal(trial.tensor("a").value(2), value_for("a", 2, 0))
    w.expect("ok steps")
    w.expect("ok flush")

    waiter_error: list[BaseException] = []

    def wait_past_end() -> None:
        try:
            trial.wait_for_steps([3, 10])
        except BaseException as exc:
            waiter_error.append(exc)

    waiter = threading.Thread(target=wait_past_end)
    waiter.start()
    w.cmd("steps", n=1, names=["a"])  # step 3, then the end at step 3: step 10 never comes
    w.cmd("close")
    waiter.join(timeout=20)
    assert not waiter.is_alive()
    assert len(waiter_error) == 1 and isinstance(waiter_error[0], NoMoreData)
    assert trial.steps() == [0, 1, 2, 3]


def test_mode_steps_live(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path)
    w.cmd("steps", n=3, names=["a"], mode="TRAIN")  # global 0..2
    w.cmd("steps", n=2, names=["a"], mode="EVAL")  # global 3, 4
    w.cmd("flush")
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps(mode="EVAL") == [0, 1]
    assert trial.has_passed_step(1, mode="EVAL") is StepState.AVAILABLE
    assert trial.has_passed_step(2, mode="EVAL") is StepState.NOT_YET_AVAILABLE
    np.testing.assert_array_equal(trial.tensor("a").value(1, mode="EVAL"), value_for("a", 4, 0))
    w.cmd("close")
    _later()
    with pytest.raises(NoMoreData):
        trial.tensor("a").value(2, mode="EVAL")
    with pytest.raises(NoMoreData):
        trial.wait_for_steps([2], mode="EVAL", timeout=5)
    assert trial.steps(mode="TRAIN") == [0, 1, 2]


def test_missing_trial_raises_trial_not_found(tmp_path: Path) -> None:
    with pytest.raises(TrialNotFound) as info:
        tensortap.create_trial(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    assert "nope" in str(info.value)
    t0 = time.monotonic()
    with pytest.raises(TrialNotFound):
        tensortap.create_trial(tmp_path / "nope", wait=True, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3


def test_wait_for_a_trial_that_appears(tmp_path: Path) -> None:
    out = tmp_path / "later"
    timer = threading.Timer(0.3, out.mkdir)
    timer.start()
    trial = tensortap.create_trial(out, wait=True, timeout=20)
    timer.join()
    assert trial.steps() == []


def test_empty_trial_directory(tmp_path: Path) -> None:
    trial = tensortap.open_trial(tmp_path)
    assert trial.steps() == []
    assert trial.steps(show_incomplete=True) == []
    assert trial.tensor_names() == []
    assert trial.workers() == []
    assert trial.modes() == []
    assert trial.last_complete_step() is None
    assert not trial.training_ended
    assert trial.has_passed_step(0) is StepState.NOT_YET_AVAILABLE
    with pytest.raises(StepNotYetAvailable):
        trial.wait_for_steps([0], timeout=0.2)
    assert trial.to_pandas().empty


def test_data_reaches_a_live_reader_within_max_seconds_without_flush(tmp_path: Path, writer_proc) -> None:
    w = writer_proc(tmp_path, "--max-seconds", "0.3")
    trial = tensortap.create_trial(tmp_path)
    w.cmd("steps", n=3, names=["a"])  # then the writer idles: only its thread can publish
    trial.wait_for_steps([0, 1, 2], timeout=8)  # 0.3 s plus polling, with room for a loaded machine
    assert trial.steps() == [0, 1, 2]
    np.testing.assert_array_equal(trial.tensor("a").value(2), value_for("a", 2, 0))
    assert not trial.training_ended


def test_live_deadline_publishes_long_before_max_seconds(tmp_path: Path, writer_proc) -> None:
    # max_seconds is an hour: only the live deadline can publish these steps while the writer idles
    w = writer_proc(tmp_path, "--max-seconds", "3600", "--live-seconds", "0.2")
    trial = tensortap.create_trial(tmp_path)
    w.cmd("steps", n=3, names=["a"])
    trial.wait_for_steps([0, 1, 2], timeout=60)  # far below an hour, with room for a loaded machine
    assert trial.steps() == [0, 1, 2]
    np.testing.assert_array_equal(trial.tensor("a").value(2), value_for("a", 2, 0))
    assert not trial.training_ended


def test_publish_deadline_stretches_from_live_seconds_to_max_seconds_with_publish_cost() -> None:
    policy = ShardPolicy(max_seconds=2.0, live_seconds=0.5)
    assert publish_deadline(policy, 0.0) == 0.5  # before the first publish, and while publishing is cheap
    assert publish_deadline(policy, 0.5 * LIVE_SHARE) == 0.5
    # a publish costing 50 ms of CPU: once a second at most, so publishing keeps to LIVE_SHARE of the time
    assert publish_deadline(policy, 1.0 * LIVE_SHARE) == pytest.approx(1.0)
    assert publish_deadline(policy, 10.0) == 2.0  # never later than max_seconds
    assert publish_deadline(ShardPolicy(max_seconds=2.0, live_seconds=None), 0.0) == 2.0
    assert publish_deadline(ShardPolicy(max_seconds=0.3), 0.0) == 0.3  # live_seconds past max_seconds: no effect
    assert ShardPolicy().live_seconds is not None and ShardPolicy().live_seconds < ShardPolicy().max_seconds


def test_the_one_off_cost_of_the_first_publish_does_not_stretch_the_live_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first publish pays one-off costs (it is laid out in the training process while the layout
    process starts; 0.16 s of CPU measured for a small PyTorch model against 2-6 ms for the next ones).
    It set the moving average of a publish's CPU time, which stretched the live deadline from 0.5 s to
    ``max_seconds`` (2 s) for the next several shards: with the default ``save_interval`` of 100,
    readers saw the first saved steps after 2 s."""
    prepare = TrialWriter._prepare
    calls = []

    def first_slow(self: TrialWriter, *args: Any) -> Any:
        calls.append(1)
        until = time.thread_time() + (0.3 if len(calls) == 1 else 0.0)
        while time.thread_time() < until:  # CPU time of the writer thread, as a one-off start-up cost
            pass
        return prepare(self, *args)

    monkeypatch.setattr(TrialWriter, "_prepare", first_slow)
    policy = ShardPolicy(max_steps=1)  # each step a shard
    w = Writer(tmp_path, shard_policy=policy)
    for _ in range(3):
        run_steps(w, 1)
        w.flush()
    assert len(calls) == 3
    assert w.writer is not None
    assert w.writer._publish_cpu < 0.1  # the later publishes' cost: milliseconds (0.15 s or more before)
    assert publish_deadline(policy, w.writer._publish_cpu) < policy.max_seconds
    w.close()


@pytest.mark.parametrize("bad", [0, -1.0, "0.5", True])
def test_live_seconds_must_be_a_positive_number_or_none(bad: object) -> None:
    with pytest.raises(ValueError, match="live_seconds"):
        ShardPolicy(live_seconds=bad)  # type: ignore[arg-type]
    assert ShardPolicy.from_json({"live_seconds": None}).live_seconds is None


class _ClosingStorage(LocalStorage):
    """A local trial whose writer finishes right after the reader lists its index records."""

    def __init__(self, root: Path, on_index_listed) -> None:
        super().__init__(root)
        self.on_index_listed = on_index_listed

    def entries(self, prefix: str) -> tuple[list[str], list[str]]:  # how a reader lists a worker's records
        names = super().entries(prefix)
        if prefix == "index/worker_0" and self.on_index_listed is not None:
            callback, self.on_index_listed = self.on_index_listed, None
            callback()
        return names


def test_end_marker_written_during_a_refresh_hides_no_step(tmp_path: Path) -> None:
    w = Writer(tmp_path)
    run_steps(w, 3)
    w.flush()
    run_steps(w, 2)  # steps 3, 4: still buffered
    trial = tensortap.create_trial(_ClosingStorage(tmp_path, w.close))
    for step in range(5):  # never "unavailable" for a step that was saved
        assert trial.has_passed_step(step) is not StepState.UNAVAILABLE
    trial.refresh()
    assert trial.training_ended
    assert trial.steps() == [0, 1, 2, 3, 4]
    assert trial.has_passed_step(4) is StepState.AVAILABLE


class _FailingOnceStorage(LocalStorage):
    """A local trial whose first batch of index records fails to arrive (a connection reset, say)."""

    fail = False

    def read_json_many(self, keys: Sequence[str]) -> list[Any]:
        if self.fail and any(key.startswith("index/") for key in keys):
            self.fail = False
            raise ConnectionError("connection reset by peer")
        return super().read_json_many(keys)


def test_index_records_a_failed_refresh_did_not_read_are_read_by_the_next(tmp_path: Path) -> None:
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    run_steps(w, 2)
    w.flush()
    storage = _FailingOnceStorage(tmp_path)
    trial = tensortap.create_trial(storage)
    assert trial.steps() == [0, 1]
    run_steps(w, 3)  # steps 2, 3, 4
    w.close()
    storage.fail = True
    with pytest.raises(ConnectionError):
        trial.refresh()
    trial.refresh()
    assert trial.steps() == [0, 1, 2, 3, 4]
    assert trial.training_ended


class _ResumingStorage(LocalStorage):
    """A local trial whose run is resumed (its end marker removed) right after a reader lists the end markers."""

    def __init__(self, root: Path, on_ends_listed: Callable[[], None] | None) -> None:
        super().__init__(root)
        self.on_ends_listed = on_ends_listed

    def list(self, prefix: str) -> list[str]:
        names = super().list(prefix)
        if prefix == "end" and self.on_ends_listed is not None:
            callback, self.on_ends_listed = self.on_ends_listed, None
            callback()
        return names


def test_an_end_marker_that_a_resumed_run_removes_after_it_was_listed_is_no_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A resumed run removes the end marker: one listed just before is gone when read, and is no damage."""
    with Writer(tmp_path) as first:
        run_steps(first, 2)
    resumed: list[Writer] = []
    storage = _ResumingStorage(tmp_path, lambda: resumed.append(Writer(tmp_path, run_id=first.run_id)))
    trial = tensortap.create_trial(storage)
    assert not trial.training_ended and trial.end_reasons() == {}
    assert trial.problems() == {}
    assert not [r for r in caplog.records if r.name == "tensortap"]
    second = resumed[0]
    second.step = first.step
    run_steps(second, 1)
    second.close()
    trial.refresh()
    assert trial.end_reasons() == {"worker_0": "closed"} and trial.steps() == [0, 1, 2]


class _OverwrittenStorage(LocalStorage):
    """A local trial overwritten by a new run just before a reader lists the index records of ``worker_0``."""

    before_index_listed: Callable[[], None] | None = None

    def entries(self, prefix: str) -> tuple[list[str], list[str]]:  # how a reader lists a worker's records
        if prefix == "index/worker_0" and self.before_index_listed is not None:
            callback, self.before_index_listed = self.before_index_listed, None
            callback()
        return super().entries(prefix)


def test_a_run_that_overwrote_an_open_worker_during_a_refresh_is_seen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new run claiming the worker and publishing as many records as were read, after the refresh looked at
    the worker records and before it listed the index records, kept the old steps for that refresh: the new
    run's values shown under them (steps 0, 2, 4 as 0, 1, 2). On local storage the worker record's version is
    taken once the records are listed."""
    policy = ShardPolicy(max_steps=1)
    old = Writer(tmp_path, shard_policy=policy)
    run_steps(old, 3, value=lambda _, step: float(step))
    old.flush()
    storage = _OverwrittenStorage(tmp_path)
    trial = tensortap.create_trial(storage, refresh_interval=3600)  # only trial.refresh() below looks again
    assert _steps_of(trial) == {0: 0.0, 1: 1.0, 2: 2.0}
    runs: list[Writer] = []

    def overwrite() -> None:
        new = Writer(tmp_path, shard_policy=policy, if_exists="overwrite")
        runs.append(new)
        for step in (0, 2, 4):
            with new.stepping(step=step):
                new.save("a", 100.0 + step, ["custom"])
        new.flush()

    storage.before_index_listed = overwrite
    trial.refresh()
    assert len(runs) == 1  # the run overwrote the worker during the refresh
    assert _steps_of(trial) == {0: 100.0, 2: 102.0, 4: 104.0} and trial.steps() == [0, 2, 4]
    warned = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    assert len(warned) == 2, warned
    assert "still wrote worker_0 there: it is turned off" in warned[0]  # the writer: `old` is of this process
    assert "worker_0 was overwritten by a new run" in warned[1]  # the reader
    runs[0].close()
    old.close()


def _steps_of(trial: tensortap.Trial) -> dict[int, float]:
    return {s: float(v) for s, v in trial.tensor("a").values().items()}


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def trial_at(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A new trial's URL and storage options: a local folder, ``memory://``, a prefix on the S3 server."""
    if request.param == "s3":
        return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_options")
    return (str(tmp_path) if request.param == "local" else f"memory://tensortap-{uuid.uuid4().hex}"), {}


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_a_reader_held_across_an_overwrite_of_a_format_1_trial_reads_the_new_run(
    tmp_path: Path, steps: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A format-1 worker record has no run_id: the reader let a new run that overwrote the worker pass as the
    same run, and went on reading the old run's values (as many steps: without a word; fewer: the steps no
    longer there too; more: the old ones, then the new run's), silently (session 47's compatibility hunt)."""
    shutil.copytree(Path(__file__).parent / "data" / "trial_format_1", tmp_path / "t")
    trial = tensortap.create_trial(tmp_path / "t")
    assert trial.steps() == [0, 1, 2] and trial.tensor("ragged").value(1).tolist() == [1, 1]
    with Writer(tmp_path / "t", if_exists="overwrite", shard_policy=ShardPolicy(max_steps=1)) as w:
        for step in range(steps):
            with w.stepping():
                w.save("ragged", np.full(2, 100 + step, dtype=np.int16))
    with caplog.at_level("WARNING", logger="tensortap"):
        trial.refresh()
    assert trial.steps() == list(range(steps))
    assert {s: trial.tensor("ragged").value(s).tolist() for s in range(steps)} == {
        s: [100 + s] * 2 for s in range(steps)
    }
    warned = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    assert len(warned) == 1 and "worker_0 was overwritten by a new run" in warned[0], warned


@pytest.mark.parametrize(
    "first_run",
    [
        "ended",
        "ended, fewer records",
        "ended, as many records",
        "ended, as many records, other steps",
        "open",
        "open, as many records",
        "open, as many records, other steps, the new run open",
    ],
)
def test_a_reader_held_across_an_overwrite_reads_the_new_run(
    trial_at: tuple[str, dict[str, Any]], first_run: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A notebook keeps a trial open while a training cell is run again with ``if_exists="overwrite"``: the new
    run's records reuse the old ones' names, so the reader saw none of them, kept the old steps (their shards
    now the new run's: checksum errors), then showed an empty trial, or refused the new records as another
    process's. It forgets the old run, with one warning, and reads the new one. On object storage, a run with
    as many records that ended between two refreshes was not seen: the reader kept the old steps and read
    the new run's values under them (steps 0, 2, 4 shown as 0, 1, 2), without a warning; so did a reader of a
    run still open (on local storage too) until its next refresh, and, on local storage, until the new run
    published one more record or ended (the worker record's version: local storage told none)."""
    url, options = trial_at
    policy = ShardPolicy(max_steps=1)  # a record per step
    old = Writer(url, storage_options=options, shard_policy=policy)
    n = {"ended, fewer records": 2}.get(first_run, 3 if "as many" in first_run else 4)
    run_steps(old, n, value=lambda _, step: float(step))
    if first_run.startswith("open"):
        old.flush()  # published; the process goes on (a cell interrupted, its hook never closed)
    else:
        old.close()
    trial = tensortap.create_trial(url, **options)
    before = _steps_of(trial)
    steps = [0, 2, 4] if "other steps" in first_run else [0, 1, 2]
    new = Writer(url, storage_options=options, shard_policy=policy, if_exists="overwrite")
    for step in steps:
        with new.stepping(step=step):
            new.save("a", 100.0 + step, ["custom"])
    new_open = first_run.endswith("the new run open")
    if new_open:
        new.flush()  # published, no end marker: only the worker record tells the runs apart
    else:
        new.close()
    trial.refresh()
    assert before == {s: float(s) for s in range(len(before))}
    assert _steps_of(trial) == {s: 100.0 + s for s in steps}
    assert trial.steps() == steps and trial.end_reasons() == ({} if new_open else {"worker_0": "closed"})
    warned = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    retired = [w for w in warned if "still wrote worker_0 there: it is turned off" in w]  # the writer's
    assert len(retired) == (1 if first_run.startswith("open") else 0), warned  # `old` is of this process
    rest = [w for w in warned if w not in retired]
    assert len(rest) == 1 and "worker_0 was overwritten by a new run" in rest[0], warned
    assert trial.problems() == {}
    new.close()
    if first_run.startswith("open"):
        old.close()


@pytest.mark.parametrize(
    ("steps", "timeout", "error"),
    [
        ([-1], None, "steps: expected integers >= 0, got -1"),
        ([5.0], None, "steps: expected integers >= 0, got 5.0"),
        (["5"], None, "steps: expected integers >= 0, got '5'"),
        (5, None, "steps: expected a sequence of steps, got 5"),
        ([5], float("nan"), "timeout: expected a number of seconds >= 0 or None, got nan"),
        ([5], -1.0, "timeout: expected a number of seconds >= 0 or None, got -1.0"),
    ],
)
def test_wait_for_steps_refuses_what_it_does_not_understand(
    tmp_path: Path, steps: Any, timeout: float | None, error: str
) -> None:
    """``[-1]`` returned at once as if waited for, ``timeout=nan`` waited for ever, ``["5"]`` and ``5`` raised
    Python's own TypeErrors, ``[5.0]`` was taken though ``value(5.0)`` refuses it (hunt 30 L2)."""
    write_trial(tmp_path, 2)
    trial = tensortap.create_trial(tmp_path)
    with pytest.raises((TypeError, ValueError), match=re.escape(error)):
        trial.wait_for_steps(steps, timeout=timeout)


def test_an_index_record_listed_before_its_shard_waits_for_it(
    trial_at: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 49 F1: an index record listed before its shard can be read (a store that shows objects in any
    order, a live trial copied with `aws s3 sync` or rsync) made the reader take the shard for damaged and drop
    it for good: the steps it had listed as complete left `steps()` and never came back once the shard was
    there, with a warning that named the object's key alone. Its steps, and the later ones, now wait for the
    shard while the worker runs; once the worker has ended, a shard that never came is dropped with one
    warning naming it, its record and its steps, and no step listed before leaves the trial."""
    import fsspec

    url, options = trial_at
    fs, root = fsspec.core.url_to_fs(url, **options)
    aside = f"{root}-aside.h5"
    w = Writer(url, storage_options=options, shard_policy=ShardPolicy(max_steps=1))  # a shard per step
    run_steps(w, 4, value=lambda _, step: float(step))
    w.flush()
    fs.mv(f"{root}/shards/worker_0/0000000001.h5", aside)  # the record of step 1 is there, its shard not yet
    trial = tensortap.create_trial(url, refresh_interval=3600, **options)  # reads only when told to refresh
    assert trial.steps() == [0] and trial.has_passed_step(2) is StepState.NOT_YET_AVAILABLE
    with pytest.raises(StepNotYetAvailable):
        trial.tensor("a").value(1)
    assert trial.problems() == {}
    fs.mv(aside, f"{root}/shards/worker_0/0000000001.h5")  # the shard arrives
    trial.refresh()
    assert _steps_of(trial) == {s: float(s) for s in range(4)} and trial.steps() == [0, 1, 2, 3]
    run_steps(w, 2, value=lambda _, step: float(step))
    w.flush()
    fs.mv(f"{root}/shards/worker_0/0000000004.h5", aside)  # a shard that never comes
    trial.refresh()
    assert trial.steps() == [0, 1, 2, 3]
    with caplog.at_level("WARNING", logger="tensortap"):
        w.close()
        trial.refresh()  # the worker has ended: the shard is missing
        assert trial.steps() == [0, 1, 2, 3, 5] and _steps_of(trial) == {s: float(s) for s in (0, 1, 2, 3, 5)}
        with pytest.raises(ShardUnreadable, match="not found"):
            trial.tensor("a").value(4)
    warned = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    assert warned == [
        "tensortap: skipping shards/worker_0/0000000004.h5: not found, though its index record "
        "index/worker_0/0000000004.json lists it, holding step 4"
    ], warned


def test_wait_for_steps_after_the_run_was_resumed_looks_again(tmp_path: Path) -> None:
    """Review of hunt 49 F4: ``wait_for_steps`` returns at once for steps it knows passed, without asking the
    storage; a trial read as ended counts every step as passed, so a step past its end raised ``NoMoreData``
    from that view though the run had been resumed since (``Writer(run_id=...)``, as the Transformers and
    Lightning callbacks go on with a run). A step past the end known is looked for again."""
    first = Writer(tmp_path)
    run_steps(first, 3, value=lambda _, s: float(s))
    first.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.training_ended and trial.steps() == [0, 1, 2]
    resumed = Writer(tmp_path, run_id=first.run_id)
    run_steps(resumed, 3, value=lambda _, s: float(s))
    resumed.flush()
    trial.wait_for_steps([4], timeout=30)
    assert 4 in trial.steps()
    resumed.close()
    with pytest.raises(NoMoreData):
        trial.wait_for_steps([9], timeout=30)


def test_a_shard_folder_that_cannot_be_listed_says_what_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of hunt 49 F1: the shard folder of a running worker is listed to hold records whose shards have not
    shown yet; one that could not be listed (root runs these tests: the error is injected) was reported with the
    index folders' words, "what it holds is not read", though every step of it was read."""
    writer = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    run_steps(writer, 2, value=lambda _, s: float(s))
    writer.flush()
    trial = tensortap.create_trial(tmp_path, refresh_interval=3600)
    listed = LocalStorage.list

    def refused(self: LocalStorage, folder: str) -> list[str]:
        if folder.startswith("shards/"):
            raise PermissionError(13, "Permission denied", folder)
        return listed(self, folder)

    monkeypatch.setattr(LocalStorage, "list", refused)
    run_steps(writer, SHARDS_ASKED_FOR + 1, value=lambda _, s: float(s))  # so many new shards: the folder is listed
    writer.flush()
    trial.refresh()
    assert trial.steps() == list(range(SHARDS_ASKED_FOR + 3))
    [(folder, why)] = trial.problems().items()
    assert folder == "shards/worker_0" and why.endswith("its index records are read without waiting for their shards")
    writer.close()


def test_a_live_reader_polling_its_workers_lists_no_shard_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """review 57b F4: every refresh that read new records listed the whole shard folder of each worker that
    published them (to hold a record whose shard has not shown yet): one more listing per worker per poll of a
    live run, of a folder that only grows (a request per 1,000 shards on S3). A poll now asks for the new
    records' shards alone; a worker's folder is listed where its records are first read, or many come at once
    (``test_an_index_record_listed_before_its_shard_waits_for_it`` holds records both ways)."""
    writers = [Writer(tmp_path, rank=r, world_size=2, shard_policy=ShardPolicy(max_steps=1)) for r in range(2)]
    for w in writers:
        run_steps(w, 20, value=lambda _, s: float(s))
        w.flush()
    trial = tensortap.create_trial(tmp_path, refresh_interval=3600)
    assert trial.steps() == list(range(20))
    listed: list[str] = []
    entries = LocalStorage.entries

    def counted(self: LocalStorage, folder: str) -> tuple[list[str], list[str]]:
        listed.append(folder)
        return entries(self, folder)

    monkeypatch.setattr(LocalStorage, "entries", counted)
    for poll in range(3):
        for w in writers:
            run_steps(w, 1, value=lambda _, s: float(s))
            w.flush()
        trial.refresh()
        assert trial.steps() == list(range(21 + poll))
    assert listed and not [folder for folder in listed if folder.startswith("shards/")], listed
    assert _steps_of(trial) == {s: float(s) for s in range(23)}
    for w in writers:
        w.close()


def test_a_shard_missing_from_an_ended_trial_leaves_its_steps_out_from_the_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hunt 49 F1 (offline part): in a trial whose workers have all ended, a shard an index record names that
    the storage does not have was found only when a value of it was read: until then ``steps()`` and
    ``tensor_names()`` listed its steps, which then left them. Its worker's shard folder is listed once, as
    its records are first read: the steps are left out from the open, with the one warning."""
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1)) as w:
        run_steps(w, 6, value=lambda _, s: float(s))
    (tmp_path / "shards/worker_0/0000000004.h5").unlink()
    with caplog.at_level("WARNING", logger="tensortap"):
        trial = tensortap.create_trial(tmp_path)
        assert trial.training_ended and trial.steps() == [0, 1, 2, 3, 5]
        assert trial.tensor("a").steps() == [0, 1, 2, 3, 5]
    warned = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    assert warned == [
        "tensortap: skipping shards/worker_0/0000000004.h5: not found, though its index record "
        "index/worker_0/0000000004.json lists it, holding step 4"
    ], warned
    with pytest.raises(ShardUnreadable, match="not found"):
        trial.tensor("a").value(4)
    assert _steps_of(trial) == {s: float(s) for s in (0, 1, 2, 3, 5)}


def test_the_steps_of_a_record_held_for_its_shard_are_counted_incomplete(tmp_path: Path) -> None:
    """review 57b F6: ``repr(trial)`` counted the steps after a record held for its shard as incomplete, not
    the held record's own steps (``1 steps (+2 incomplete)`` for steps 0-3 with the shard of step 1 not there
    yet), though they are saved and not complete."""
    w = Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1))
    run_steps(w, 4, value=lambda _, s: float(s))
    w.flush()
    shard = tmp_path / "shards/worker_0/0000000001.h5"
    aside = tmp_path.parent / "aside.h5"
    shard.rename(aside)
    trial = tensortap.create_trial(tmp_path, refresh_interval=3600)
    assert trial.steps() == [0] and ": 1 steps (+3 incomplete) (train 1)," in repr(trial)
    aside.rename(shard)
    trial.refresh()
    assert trial.steps() == [0, 1, 2, 3] and ": 4 steps (train 4)," in repr(trial)
    w.close()
