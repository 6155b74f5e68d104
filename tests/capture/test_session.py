"""The capture session and the stop channel, driven through the NumPy core (no framework)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tensortap
from tensortap import Mode
from tensortap.capture import Writer
from tensortap.capture.session import Session, flatten
from tensortap.capture.stop import StopChannel, agree, agreed


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray)


A, B, C = (np.full(2, float(i)) for i in range(3))


@dataclasses.dataclass
class Pair:
    a: Any
    b: Any


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (A, ["o"]),
        ((A,), ["o"]),
        ([A, None], ["o"]),
        ({"x": (A,)}, ["o"]),
        ((A, B), ["o/0", "o/1"]),
        ([A, None, B], ["o/0", "o/2"]),
        ({"h": A, "c": B}, ["o/h", "o/c"]),
        ({"h": A, "c": (B,)}, ["o/h", "o/c"]),
        ((A, (B, C)), ["o/0", "o/1/0", "o/1/1"]),
        ({"a": {"b": A, "c": [B, C]}}, ["o/a/b", "o/a/c/0", "o/a/c/1"]),
        ((None, 3, "text"), []),
        ((Pair(A, B), C), ["o/0/a", "o/0/b", "o/1"]),  # a dataclass: by its fields
        ([Pair(A, None)], ["o"]),
    ],
)
def test_the_one_naming_rule(value: Any, names: list[str]) -> None:
    assert [n for n, _ in flatten("o", value, _is_array)] == names


def test_flatten_keeps_the_tensors() -> None:
    out = flatten("o", {"h": A, "c": (B, C)}, _is_array)
    assert [v is w for (_, v), w in zip(out, (A, B, C), strict=True)] == [True] * 3


def _session(tmp_path: Path, **kwargs: Any) -> tuple[Writer, Session]:
    writer = Writer(tmp_path)
    return writer, Session(writer, _is_array, snapshot=np.copy, **kwargs)


def test_deferred_close_and_last_value_wins(tmp_path: Path) -> None:
    writer, s = _session(tmp_path)
    seen: list[int] = []
    s.at_finish(lambda: s.offer("weights/w", np.float64(10 * writer.step), ("weights",)))
    s.at_finish(lambda: seen.append(writer.step))
    for step in range(3):
        s.open(Mode.TRAIN)
        s.offer("losses/loss", np.float64(step), ("losses",))
        s.offer("losses/loss", np.float64(step + 0.5), ("losses",))  # the last value wins
        s.end()
        assert s.pending and s.is_open
        s.offer("metrics/late", np.float64(step), ("metrics",))  # still the same step until the next opens
    s.finish()
    writer.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    assert seen == [0, 1, 2]
    assert [float(trial.tensor("losses/loss").value(i)) for i in range(3)] == [0.5, 1.5, 2.5]
    assert [float(trial.tensor("weights/w").value(i)) for i in range(3)] == [0.0, 10.0, 20.0]
    assert [float(trial.tensor("metrics/late").value(i)) for i in range(3)] == [0.0, 1.0, 2.0]


def test_a_session_step_whose_number_does_not_go_up_saves_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    """A loop of one's own numbers its steps (a Keras ``cb.stepping(step=int(opt.iterations))``, whose optimizer
    skipped a batch: the number repeats). That step is opened and runs, but saves nothing: no values, no calls,
    no step-end values (the weights), and none of them are in the next step, which is numbered as given (hunt 25,
    M1: the ValueError ended the training)."""
    writer, s = _session(tmp_path)
    s.at_finish(lambda: s.offer("weights/w", np.float64(10 * writer.step), ("weights",)))
    saved = []
    for i, step in enumerate((0, 1, 1, 2)):
        saved.append(s.open(Mode.TRAIN, step))
        s.offer("losses/loss", np.float64(i), ("losses",))
        s.offer_call("outputs/x", np.full(2, float(i)), ("outputs",))
        s.end()
    s.finish()
    writer.close()
    assert saved == [True, True, False, True]
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2]
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2]
    assert sorted(trial.tensor_names()) == ["losses/loss", "outputs/x", "weights/w"]  # no outputs/x:1 in step 2
    assert [float(trial.tensor("losses/loss").value(i)) for i in range(3)] == [0.0, 1.0, 3.0]
    assert [trial.tensor("outputs/x").value(i).tolist() for i in range(3)] == [[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]]
    assert [float(trial.tensor("weights/w").value(i)) for i in range(3)] == [0.0, 10.0, 20.0]


def test_last_value_wins_for_reductions_too(tmp_path: Path) -> None:
    writer = Writer(tmp_path, reduction_config=tensortap.ReductionConfig(reductions=["max"]))
    with writer.stepping():
        writer.save("t", np.array([1.0, 2.0]))
        writer.save("t", np.array([7.0, 3.0]))
    writer.close()
    t = tensortap.create_trial(tmp_path).tensor("t")
    assert t.reduction_value(0, "max") == 7.0


def test_repeated_calls_are_numbered_and_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer, s = _session(tmp_path, max_calls=3)
    s.open(Mode.TRAIN)
    once = np.array([5.0])
    s.offer_call("outputs/once", once, ("outputs",))
    once[0] = -1.0  # changed in place after the call: the snapshot keeps what the call returned
    for i in range(6):
        s.offer_call("outputs/cell", (np.array([float(i)]), np.array([10.0 + i])), ("outputs",))
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        s.finish()
        s.open(Mode.TRAIN)
        for i in range(5):
            s.offer_call("outputs/cell", np.array([float(i)]), ("outputs",))
        s.finish()
    writer.close()
    trial = tensortap.create_trial(tmp_path)
    names = set(trial.tensor_names())
    assert {"outputs/once", "outputs/cell:0/0", "outputs/cell:2/1", "outputs/cell:5/0", "outputs/cell:4"} <= names
    assert not names & {"outputs/cell:3/0", "outputs/cell:4/0", "outputs/cell:3"}
    assert float(trial.tensor("outputs/once").value(0)[0]) == 5.0
    assert float(trial.tensor("outputs/cell:5/1").value(0)[0]) == 15.0
    assert float(trial.tensor("outputs/cell:4").value(1)[0]) == 4.0
    assert len([r for r in caplog.records if "outputs/cell" in r.getMessage()]) <= 1


def test_calls_forgotten_between_two_marks_are_not_saved_and_the_rest_numbered_again(tmp_path: Path) -> None:
    writer, s = _session(tmp_path, max_calls=3)
    s.open(Mode.TRAIN)
    start = s.mark()
    s.offer_call("outputs/fc", np.array([0.0]), ("outputs",))  # a forward no backward used
    s.offer_call("losses/ce", np.array([9.0]), ("losses",))
    stop = s.mark()
    for i in (1.0, 2.0, 3.0):  # the batch trained on calls fc three times (the last beyond max_calls)
        s.offer_call("outputs/fc", np.array([i]), ("outputs",))
    s.offer_call("losses/ce", np.array([8.0]), ("losses",))
    s.forget(start, stop)
    s.finish()
    writer.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["losses/ce", "outputs/fc:0", "outputs/fc:1", "outputs/fc:2"]
    assert [float(trial.tensor(f"outputs/fc:{k}").value(0)[0]) for k in (0, 1, 2)] == [1.0, 2.0, 3.0]
    assert float(trial.tensor("losses/ce").value(0)[0]) == 8.0


def test_calls_forgotten_beyond_max_calls_leave_the_last_call_kept_numbered_as_it_was_in_its_forward(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forgotten forward called fc more than max_calls times (an RNN cell per time step, a batch then
    skipped): its calls filled the held slots, so the kept forward's first calls were never held. The last
    call kept was named by every call of the step less the held ones forgotten (``fc:4``, not ``fc:3``),
    and nothing said that the kept forward's calls 0-2 are not saved."""
    writer, s = _session(tmp_path, max_calls=3)
    s.open(Mode.TRAIN)
    start = s.mark()
    for i in range(4):  # forgotten: calls 0-2 held, call 3 the last beyond max_calls
        s.offer_call("outputs/fc", np.array([-1.0 - i]), ("outputs",))
    stop = s.mark()
    for i in range(4):  # kept: its calls 0-3, none held (the slots are full); its call 3 the last
        s.offer_call("outputs/fc", np.array([float(i)]), ("outputs",))
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        s.forget(start, stop)
    s.finish()
    writer.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["outputs/fc:3"]
    assert float(trial.tensor("outputs/fc:3").value(0)[0]) == 3.0
    assert "outputs/fc: calls 0, 1, 2 of the step were not held" in caplog.text


def test_calls_after_a_mark_apart_have_held_places_of_their_own(tmp_path: Path) -> None:
    """As above, with ``mark(apart=True)`` between the forwards (the first one's fate still open): the kept
    forward's calls are held although the forgotten one filled max_calls places, and saved as the step's."""
    writer, s = _session(tmp_path, max_calls=3)
    s.open(Mode.TRAIN)
    start = s.mark()
    for i in range(4):
        s.offer_call("outputs/fc", np.array([-1.0 - i]), ("outputs",))
    stop = s.mark(apart=True)
    for i in range(5):
        s.offer_call("outputs/fc", np.array([float(i)]), ("outputs",))
    assert s.forget(start, stop)
    s.finish()
    writer.close()
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["outputs/fc:0", "outputs/fc:1", "outputs/fc:2", "outputs/fc:4"]
    assert [float(trial.tensor(f"outputs/fc:{k}").value(0)[0]) for k in (0, 1, 2, 4)] == [0.0, 1.0, 2.0, 4.0]


def test_may_save_and_saving_count_regex_collections(tmp_path: Path) -> None:
    hook = tensortap.capture.Hook(
        tmp_path,
        include_collections=["losses"],
        include_regex=["fc1"],
        save_config=tensortap.SaveConfig(save_interval=2),
    )
    s = Session(hook, _is_array)
    assert s.may_save("outputs")  # the regex may match an output
    assert not s.saving("outputs")  # no step open
    s.open(Mode.TRAIN)
    assert s.saving("outputs") and s.saving("losses")
    s.open(Mode.TRAIN)
    assert not s.saving("losses")
    s.finish()
    hook.close()
    only = tensortap.capture.Hook(tmp_path / "b", include_collections=["losses"])
    assert not Session(only, _is_array).may_save("outputs", "inputs")
    only.close()


def test_a_tensor_that_cannot_be_captured_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = Writer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for step in range(3):
            with writer.stepping():
                writer.save("text", np.array(["a", "b"]))
                writer.save("ragged", np.array([[1.0], [1.0, 2.0]], dtype=object))
                writer.save("loss", np.float64(step))
    writer.close()
    assert not writer.failed
    trial = tensortap.create_trial(tmp_path)
    assert trial.tensor_names() == ["loss"]
    assert trial.steps() == [0, 1, 2]
    warned = [r.getMessage() for r in caplog.records]
    assert sum("text" in m for m in warned) == 1
    assert sum("ragged" in m for m in warned) == 1


def test_stop_channel_writes_polls_and_reads(tmp_path: Path) -> None:
    writer = Writer(tmp_path)
    other = StopChannel(writer.storage)
    assert not other.poll(0.0)
    tensortap.create_trial(tmp_path).request_stop("enough")
    assert not other.poll(3600.0)  # rate-limited: looked a moment ago
    assert other.poll(0.0) and other.reason == "enough"
    writer.request_stop("mine", rule="R")
    assert writer.should_stop and writer.stop_reason == "mine"
    writer.close()


def test_a_resumed_run_ignores_a_stop_request_left_by_the_run_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request written after a run ended (or the one that stopped it) stopped the run's continuation (XGBoost's
    ``xgb_model=``) at its first poll, without a word (hunt 31 M5). It is stale for the resumed run: ignored, with
    one warning naming it; a request written while the resumed run runs stops it."""
    with Writer(tmp_path) as first, first.stepping():
        first.save("loss", np.float64(0.0))
    tensortap.create_trial(tmp_path).request_stop("left over", rule="R")
    caplog.set_level(logging.WARNING, logger="tensortap")
    resumed = Writer(tmp_path, run_id=first.run_id)
    assert not resumed.stop_channel.poll(0.0) and not resumed.stop_channel.poll(0.0)
    warned = [r.getMessage() for r in caplog.records if "stop request" in r.getMessage()]
    assert len(warned) == 1 and "left over" in warned[0] and "left by the run before" in warned[0], warned
    # written now on a machine whose clock is behind: another request, which stops it (no clock is compared)
    (tmp_path / "control" / "stop.json").write_text(json.dumps({"reason": "now", "time": 0.0}))
    assert resumed.stop_channel.poll(0.0) and resumed.stop_reason == "now"
    resumed.close()
    assert tensortap.create_trial(tmp_path).end_reasons() == {"worker_0": "stop_request"}
    # a run that is not resumed sees a request in its folder, as before
    fresh = Writer(tmp_path / "fresh")
    tensortap.create_trial(tmp_path / "fresh").request_stop("enough")
    assert fresh.stop_channel.poll(0.0)
    fresh.close()


def test_agreement_over_an_all_reduce(tmp_path: Path) -> None:
    assert agree(True, None) and not agree(False, None)
    ranks = [False, True, False]

    def all_reduce_max(flag: int) -> int:
        return max(int(r) for r in ranks) | flag

    asked, quiet = Writer(tmp_path / "asked"), Writer(tmp_path / "quiet")
    asked.request_stop("enough")
    assert agree(False, all_reduce_max)
    assert not agreed(3, 5, asked.stop_channel, 0.0, all_reduce_max)  # not an agreement step
    assert agreed(3, 5, asked.stop_channel, 0.0, None)  # alone: every step
    # another rank saw a request this one had not looked for yet (rate-limited): it reads it at once
    late = StopChannel(quiet.storage)
    assert not late.poll(0.0)
    tensortap.create_trial(tmp_path / "quiet").request_stop("seen by rank 1")
    assert agreed(5, 5, late, 3600.0, all_reduce_max)
    assert late.requested and late.reason == "seen by rank 1"
    asked.close()
    quiet.close()
