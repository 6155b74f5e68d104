"""The trial index: a segment of step arrays per tensor and shard, read as ``{step: {worker: Location}}``."""

from __future__ import annotations

import gc
import json
import shutil
import tracemalloc
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
from helpers.trials import logged_warnings
from hypothesis import given, settings
from hypothesis import strategies as st

import tensortap
from tensortap.capture import ShardPolicy, Writer
from tensortap.config import Collection, ReductionConfig, SaveConfig
from tensortap.trial.index import Location, RecordError, Segment, TensorInfo, parse_index_record, steps_meet
from tensortap.trial.rules import ExplodingTensor


def value(name: str, step: int, rank: int) -> np.ndarray:
    """A small tensor that differs per name, step and rank."""
    return np.array([-1.0, 2.0, 0.5]) * (step + 1) + 10 * rank + len(name)


def write(out: Path, steps: int, rank: int = 0, max_steps: int = 3, **kwargs: Any) -> None:
    """A closed trial of ``steps`` steps of ``a`` from worker ``rank``, ``max_steps`` steps per shard."""
    with Writer(out, rank=rank, shard_policy=ShardPolicy(max_steps=max_steps), **kwargs) as w:
        for _ in range(steps):
            with w.stepping():
                w.save("a", value("a", w.step, rank))


def records(out: Path, worker: str = "worker_0") -> list[Path]:
    return sorted((out / "index" / worker).glob("*.json"))


def test_raw_steps_and_reduction_only_steps_across_shards(tmp_path: Path) -> None:
    cfgs = {
        "gradients": Collection("gradients", reduction_config=ReductionConfig(reductions=["max"])),
        "weights": Collection("weights", save_config=SaveConfig(save_interval=2)),  # raw at even steps
    }
    policy = ShardPolicy(max_steps=3)
    kept = ["gradients", "weights"]
    with Writer(tmp_path, collection_configs=cfgs, include_collections=kept, shard_policy=policy) as w:
        for s in range(7):
            with w.stepping():
                w.save("t", value("t", s, 0), ["gradients", "weights"])
    assert len(records(tmp_path)) == 3  # steps 0-2, 3-5, 6
    trial = tensortap.create_trial(tmp_path)
    info = trial._index.tensors["t"]
    assert [seg.steps.tolist() for seg in info.segments] == [[0, 1, 2], [3, 4, 5], [6]]
    locs = info.locations
    assert len(locs) == 7 and list(locs) == list(range(7))
    assert 3 in locs and 7 not in locs and -1 not in locs and "3" not in locs and 2**70 not in locs
    shards = [f"shards/worker_0/{n:010d}.h5" for n in range(3)]
    for step, workers in locs.items():
        assert workers == {"worker_0": Location(shards[step // 3], step % 2 == 0, ("max",), False)}
        assert locs[step] == workers and locs.get(step) == workers
    assert locs.get(7) is None
    with pytest.raises(KeyError):
        locs[7]
    t = trial.tensor("t")
    assert [t.has_raw(s) for s in range(7)] == [s % 2 == 0 for s in range(7)]
    assert {s: v.tolist() for s, v in t.values().items()} == {s: value("t", s, 0).tolist() for s in (0, 2, 4, 6)}
    assert t.reduction_values("max") == {s: float(value("t", s, 0).max()) for s in range(7)}
    assert t.reduction_values("min") == {s: float(value("t", s, 0).min()) for s in (0, 2, 4, 6)}


def test_two_workers_at_the_same_steps(tmp_path: Path) -> None:
    write(tmp_path, 5, rank=0)
    write(tmp_path, 4, rank=1, max_steps=2)
    trial = tensortap.create_trial(tmp_path)
    locs = trial._index.tensors["a"].locations
    assert list(locs) == [0, 1, 2, 3, 4]
    assert locs[3] == {
        "worker_0": Location("shards/worker_0/0000000001.h5", True, ()),
        "worker_1": Location("shards/worker_1/0000000001.h5", True, ()),
    }
    assert list(locs[4]) == ["worker_0"]
    a = trial.tensor("a")
    assert a.workers(2) == ["worker_0", "worker_1"] and a.workers(4) == ["worker_0"]
    for rank in (0, 1):
        got = a.values(worker=f"worker_{rank}")
        assert {s: v.tolist() for s, v in got.items()} == {s: value("a", s, rank).tolist() for s in range(5 - rank)}
    np.testing.assert_array_equal(a.value(2), value("a", 2, 0))  # the first worker in sorted order
    assert trial.steps() == [0, 1, 2, 3, 4]


def test_an_unreadable_shard_takes_exactly_its_own_steps(tmp_path: Path) -> None:
    write(tmp_path, 6, rank=0)  # worker_0: shards of steps 0-2, 3-5
    write(tmp_path, 8, rank=1)  # worker_1: 0-2, 3-5, 6-7
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(8))
    broken = ["shards/worker_1/0000000000.h5", "shards/worker_1/0000000002.h5"]
    for key in broken:
        (tmp_path / key).write_bytes(b"not a shard")
    a = trial.tensor("a")
    with logged_warnings() as warned:
        got = a.values(worker="worker_1")
    assert sorted(got) == [3, 4, 5]
    assert len(warned) == 2 and all(any(k in w for w in warned) for k in broken), warned
    assert trial.steps() == list(range(6))  # 6 and 7 were in the dropped shard only
    assert trial.mode_step(6) is None and trial.wall_times().keys() == set(range(6))
    assert a.steps() == list(range(6))
    both = ["worker_0", "worker_1"]
    assert [a.workers(s) for s in (0, 2, 3, 5)] == [["worker_0"], ["worker_0"], both, both]
    assert trial._index.tensors["a"].locations[3]["worker_1"].shard == "shards/worker_1/0000000001.h5"
    assert set(trial.problems()) == set(broken)


def test_a_record_arriving_later_is_merged(tmp_path: Path) -> None:
    out, later = tmp_path / "trial", tmp_path / "later"
    write(out, 8)  # records of steps 0-2, 3-5, 6-7
    later.mkdir()
    for path in records(out)[1:]:
        shutil.move(path, later / path.name)
    (out / "end" / "worker_0.json").unlink()  # a live run: its last step holds completeness back
    trial = tensortap.create_trial(out)
    a = trial.tensor("a")
    assert trial.steps() == [0, 1, 2] and a.steps() == [0, 1, 2] and len(trial._index.tensors["a"].locations) == 3
    for name in sorted(p.name for p in later.iterdir()):
        shutil.move(later / name, out / "index" / "worker_0" / name)
        trial.refresh()
    assert trial.steps() == list(range(8))
    assert a.steps() == list(range(8)) and len(trial._index.tensors["a"].locations) == 8
    assert [seg.steps.tolist() for seg in trial._index.tensors["a"].segments] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    np.testing.assert_array_equal(a.value(7), value("a", 7, 0))
    assert trial.tensor_names(step=7) == ["a"]


def test_steps_listed_out_of_order_keep_their_modes_and_times(tmp_path: Path) -> None:
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=10)) as w:
        for mode in ("TRAIN", "TRAIN", "EVAL", "TRAIN"):
            with w.stepping(mode=mode):
                w.save("a", value("a", w.step, 0))
    (path,) = records(tmp_path)
    record = json.loads(path.read_text())
    times = dict(zip([s[0] for s in record["steps"]], record["wall_times"], strict=True))
    record["steps"].reverse()
    record["wall_times"].reverse()
    path.write_text(json.dumps(record))
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    assert trial.steps("TRAIN") == [0, 1, 2] and trial.steps("EVAL") == [0]
    assert trial.global_step(2, "TRAIN") == 3 and trial.global_step(0, "EVAL") == 2
    assert trial.wall_times() == times


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda r: r["steps"][0].__setitem__(0, True), "'steps'"),  # a boolean is no step
        (lambda r: r["steps"][0].__setitem__(2, 1.0), "'steps'"),
        (lambda r: r["steps"][0].__setitem__(0, 2**70), "'steps'"),  # beyond int64
        (lambda r: r["steps"][0].__setitem__(1, 9), "'steps'"),  # no such mode
        (lambda r: r["steps"][0].append(0), "'steps'"),
        (lambda r: r["steps"].append([1, 1, 5]), "repeats a step"),
        (lambda r: r["wall_times"].__setitem__(0, False), "'wall_times'"),
        (lambda r: r["wall_times"].__setitem__(0, 10**400), "'wall_times'"),
        (lambda r: r["wall_times"].pop(), "'wall_times'"),
        (lambda r: r["wall_times"].__setitem__(0, float("nan")), "'wall_times'"),
        (lambda r: r["wall_times"].__setitem__(0, float("-inf")), "'wall_times'"),
    ],
)
def test_a_record_that_breaks_the_schema_is_refused(tmp_path: Path, change: Any, why: str) -> None:
    """The record is skipped with one warning naming it. hunt 36 (Low): a wall time NaN or Infinity (Python's JSON
    reads them) passed, and ``plot --x time`` drew them silently."""
    write(tmp_path, 3)
    (path,) = records(tmp_path)
    record = json.loads(path.read_text())
    assert parse_index_record(record, "worker_0").record is record
    change(record)
    with pytest.raises(RecordError, match=why):
        parse_index_record(record, "worker_0")
    path.write_text(json.dumps(record))
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [] and trial.tensor_names() == []
    assert len(warned) == 1 and path.name in warned[0]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda e: e.__setitem__("raw_steps", [0, 9]), "raw_steps"),  # 9 is not a step of the record
        (lambda e: e.__setitem__("reduction_steps", [True]), "reduction_steps"),
        (lambda e: e.__setitem__("histogram_steps", "all"), "histogram_steps"),
    ],
)
def test_a_tensor_entry_that_breaks_the_schema_is_refused_alone(tmp_path: Path, change: Any, why: str) -> None:
    write(tmp_path, 3)
    (path,) = records(tmp_path)
    record = json.loads(path.read_text())
    change(record["tensors"]["a"])
    parsed = parse_index_record(record, "worker_0")
    assert parsed.tensors == {} and why in parsed.refused["a"]
    path.write_text(json.dumps(record))
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2] and trial.tensor_names() == []
    assert len(warned) == 1 and path.name in warned[0] and "refused tensor 'a'" in warned[0]


# Each step's mode, and at which global steps each tensor is saved: in every mode, in one only, at one
# step of the first or last shard, as reductions only or as a histogram only (shards of 4 steps span the modes).
MODES = "TRAIN TRAIN TRAIN EVAL EVAL TRAIN TRAIN PREDICT TRAIN TRAIN EVAL TRAIN TRAIN".split()
PLAN = {
    "every": ("weights", list(range(len(MODES)))),
    "train_only": ("weights", [s for s, m in enumerate(MODES) if m == "TRAIN"]),
    "eval_reduced": ("reduced", [s for s, m in enumerate(MODES) if m == "EVAL"]),
    "predict_hist": ("hist", [7]),
    "last_train": ("weights", [12]),
    "sparse_reduced": ("reduced", [1, 3, 9]),
    "losses/loss": ("losses", [0]),
}


def mode_steps_of(steps: list[int], mode: str) -> list[int]:
    """The mode steps of the global ``steps`` that are of ``mode`` (counted in MODES)."""
    return [MODES[:s].count(mode) for s in steps if MODES[s] == mode]


def test_names_and_steps_by_mode(tmp_path: Path) -> None:
    cfgs = {
        "reduced": Collection("reduced", reduction_config=ReductionConfig(reductions=["max"])),
        "hist": Collection("hist", reduction_config=ReductionConfig(histogram=4)),
    }
    rule = ExplodingTensor(collection_names="losses")  # for its in-memory trial
    with Writer(
        tmp_path,
        collection_configs=cfgs,
        include_collections=["weights", "reduced", "hist", "losses"],
        shard_policy=ShardPolicy(max_steps=4),
        rules=[rule],
    ) as w:
        for step, mode in enumerate(MODES):
            with w.stepping(mode=mode):
                for name, (collection, steps) in PLAN.items():
                    if step in steps:
                        w.save(name, np.float32(step + 0.5), [collection])
    trial = tensortap.create_trial(tmp_path)
    reduced, hist = trial.tensor("eval_reduced"), trial.tensor("predict_hist")
    assert not reduced.has_raw(0, "EVAL") and reduced.available_reductions(0, "EVAL") == ["max"]
    assert not hist.has_raw(0, "PREDICT") and hist.available_reductions(0, "PREDICT") == []
    assert hist.histogram_value(0, "PREDICT").counts.sum() == 1
    assert len(trial._index.tensors["every"].segments) == 4
    memory = rule.base_trial
    for mode in ("TRAIN", "EVAL", "PREDICT", "GLOBAL"):
        expected = sorted(n for n, (_, steps) in PLAN.items() if any(MODES[s] == mode for s in steps))
        assert trial.tensor_names(mode=mode) == expected, mode
        assert memory.tensor_names(mode=mode) == expected, mode
        for name, (_, steps) in PLAN.items():
            assert trial.tensor(name).steps(mode=mode) == mode_steps_of(steps, mode), (name, mode)
        in_mode = [g for g, m in enumerate(MODES) if m == mode]
        for ms, g in enumerate([*in_mode, None]):  # every mode step of the mode, and one past them
            at = sorted(n for n, (_, steps) in PLAN.items() if g in steps)
            assert trial.tensor_names(mode=mode, step=ms) == at and memory.tensor_names(mode=mode, step=ms) == at
    assert trial.tensor_names(mode="EVAL", regex="reduced$") == ["eval_reduced", "sparse_reduced"]
    assert trial.tensor_names(step=12) == ["every", "last_train", "train_only"] and rule.fired_steps == []
    assert trial.tensor("sparse_reduced").steps() == [1, 3, 9]
    ax = trial.tensor("predict_hist").plot_histograms()  # no TRAIN step: the mode it has
    assert ax.get_xlabel() == "predict step"


step_sets = st.sets(st.integers(-(2**40), 2**40) | st.integers(0, 60), max_size=40).map(
    lambda s: np.array(sorted(s), dtype=np.int64)
)


@given(segments=st.lists(step_sets.filter(len), max_size=4), query=step_sets)
def test_steps_of_a_tensor_against_an_array_of_steps(segments: list[np.ndarray], query: np.ndarray) -> None:
    """``any_in``/``saved_of``/``in`` of a tensor's segments (overlapping or one after another) as ``np.isin`` says."""
    info = TensorInfo("t")
    for i, steps in enumerate(segments):
        yes = np.ones(len(steps), dtype=bool)
        info.add(Segment(f"s{i}", f"w{i % 2}", steps, yes, ~yes, ~yes, ()))
    saved = np.unique(np.concatenate([*segments, np.zeros(0, dtype=np.int64)]))
    np.testing.assert_array_equal(info.saved_steps(), saved)
    assert info.locations.any_in(query) == bool(np.isin(query, saved).any())
    np.testing.assert_array_equal(info.locations.saved_of(query), np.isin(query, saved))
    assert all((int(s) in info.locations) == (s in saved) for s in query)
    for s in [*query.tolist(), *saved.tolist()]:  # a lookup: every worker's shard, the later record winning
        want = {seg.worker: seg.shard for seg in info.segments if s in seg.steps.tolist()}
        got = {w: loc.shard for w, loc in info.locations[s].items()} if want else None
        assert got == (want or None)
        if not want:
            with pytest.raises(KeyError):
                info.locations[s]
    for steps in segments:
        assert steps_meet(steps, query) == bool(np.isin(steps, query).any()) == steps_meet(query, steps)
    ends = sorted({*query.tolist(), *(s for seg in segments for s in (seg[0], seg[-1], seg[0] - 1, seg[-1] + 1))})
    for a, b in zip(ends, [*ends[1:], *ends[:1]], strict=True):  # each step, and the span to the next
        for first, last in ((a, None), (a, b)):
            upto = first if last is None else last
            span = [s for s in info.segments if s.steps[0] <= upto and s.steps[-1] >= first]
            assert info.segments_spanning(first, last) == span, (first, last)


# Values an entry of an index record may hold, as the format says, and a few of each key that it does not
GOOD: dict[str, Any] = {
    "id": st.integers(0, 2**63 - 1),
    "collections": st.lists(st.sampled_from(["weights", "gradients", "é"]), max_size=2),
    "reductions": st.lists(st.sampled_from(["max", "l2_norm"]), max_size=2),
    "orig_dtype": st.sampled_from(["bfloat16", "float16"]),
    "raw_steps": st.sampled_from(["*", [], [0], [0, 2], [2, 0, 2]]),
    "reduction_steps": st.sampled_from(["*", [], [1]]),
    "histogram_steps": st.sampled_from([[], [1, 2]]),
}
BAD: dict[str, list[Any]] = {
    "id": [-1, 2**63, True, 1.0, None, "1"],
    "collections": ["weights", [1], [None], [["w"]]],
    "reductions": ["max", [2]],
    "dtype": [3, None],
    "orig_dtype": [1.5, None],
    "shape": ["3", [-1], [2**63], [True], [1.0], None],
    "raw_steps": ["all", [9], [True], [0.0], 3, None, [-1]],
    "reduction_steps": [[3], "*x"],
    "histogram_steps": [[0, 5], {}],
    "raw_at": [
        "x",
        [],
        {},
        {"data": -1},
        {"crc32": 2**63},
        {"check": 2**32},
        {"check": True},
        {"data": 1.0},
        *({"dtype": code} for code in ["|b1", "<c8", "<U1", "f4", "<x4", "<f44", "=f4", 4, None, ["<f4"]]),
    ],
}


RAW_AT_FIELDS = {  # and values just beyond
    "data": st.sampled_from([0, 99, 2**63 - 1, 2**63]),
    "crc32": st.sampled_from([0, 5, 2**40, -1]),
    "check": st.sampled_from([0, 7, 2**32 - 1, 2**32]),
}


@st.composite
def entries(draw: st.DrawFn) -> Any:
    """An entry as the format says, or with one key wrong or left out, or none at all."""
    entry = {key: draw(values) for key, values in GOOD.items() if key in ("id", "raw_steps") or draw(st.booleans())}
    wrong = draw(st.sampled_from([None] * 4 + ["left out", "no form", "no raw step", *BAD]))
    if draw(st.booleans()) or wrong in ("no form", "no raw step", "raw_at"):
        entry["dtype"] = draw(st.sampled_from(["float32", "int8"]))
        entry["shape"] = draw(st.lists(st.integers(0, 4), max_size=3))
        if draw(st.booleans()) or wrong in ("no form", "no raw step", "raw_at"):
            entry["raw_steps"] = draw(st.sampled_from(["*", [1]]))
            located = {k: draw(v) for k, v in RAW_AT_FIELDS.items()}
            entry["raw_at"] = {**located, "dtype": draw(st.sampled_from(["<f4", ">i8", "|u1", "<f2", "|i1"]))}
    if wrong == "left out":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif wrong == "no form":  # a raw_at needs the dtype and shape of the values
        del entry["dtype"], entry["shape"]
    elif wrong == "no raw step":  # nor is there a raw_at of no values
        entry["raw_steps"], entry["reduction_steps"] = [], "*"
    elif wrong is not None:
        bad = draw(st.sampled_from(BAD[wrong]))
        entry[wrong] = {**entry[wrong], **bad} if isinstance(bad, dict) and wrong == "raw_at" else bad
    return draw(st.sampled_from([entry] * 50 + [[], "x", None]))


def parsed_tensors(entries: list[Any]) -> dict[str, Any] | str:
    """What :func:`parse_index_record` makes of a record of ``entries`` (tensors ``t0``, ``t1``, ...): its
    step lists, forms and raw_at locations of each tensor, or why it refused the record."""
    record = {
        "format": "tensortap-index",
        "format_version": 2,
        "worker": "worker_0",
        "seq": 0,
        "bytes": 10,
        "shard": "shards/worker_0/0000000000.h5",
        "steps": [[0, 1, 0], [1, 1, 1], [2, 1, 2]],
        "tensors": {f"t{i}": entry for i, entry in enumerate(entries)},
    }
    try:
        parsed = parse_index_record(record, "worker_0")
    except RecordError as exc:
        return str(exc)
    return {
        name: ([a.tolist() for a in specs], parsed.declared.forms[row], parsed.raw_at.get(name))
        for row, (name, specs) in enumerate(parsed.tensors.items())
    }


@settings(max_examples=400)
@given(listed=st.lists(entries(), min_size=1, max_size=3))
def test_entries_checked_all_at_once_as_one_by_one(listed: list[Any]) -> None:
    """An index record's entries are checked key by key over all of them at once, and one by one only
    to say which is wrong: both accept exactly the same entries, and read them alike."""
    at_once = parsed_tensors(listed)
    with patch("tensortap.trial.index._columns", return_value=None):
        one_by_one = parsed_tensors(listed)
    assert at_once == one_by_one


def test_the_tensors_of_a_record_share_what_the_index_holds(tmp_path: Path) -> None:
    """The index holds a segment per record for all its tensors alike, not an object per tensor and
    record: the memory a record adds does not grow by an object per tensor (it did by ~570 bytes)."""

    def write_trial(out: Path, steps: int) -> None:
        with Writer(out, shard_policy=ShardPolicy(max_steps=1)) as w:
            for step in range(steps):
                with w.stepping():
                    w.offer_many(
                        (f"layer{k}.weight", np.full(3, k + step, np.float32), ("weights",)) for k in range(100)
                    )

    def held(out: Path) -> int:
        """Bytes the opened trial holds (traced allocations, not the process's memory)."""
        gc.collect()
        tracemalloc.start()
        try:
            trial = tensortap.create_trial(out)
            trial.steps()
            gc.collect()
            return tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    write_trial(tmp_path / "short", 10)
    write_trial(tmp_path / "long", 50)
    index = tensortap.create_trial(tmp_path / "long")._index
    infos = list(index.tensors.values())
    assert all(len(info.segments) == 50 for info in infos)
    for i in range(50):  # every tensor: one segment of the record, its own row in it
        assert len({id(info.segments[i]) for info in infos}) == 1
        assert sorted(info.rows[i] for info in infos) == list(range(100))
    value = tensortap.create_trial(tmp_path / "long").tensor("layer7.weight").value(31)
    np.testing.assert_array_equal(value, np.full(3, 38, np.float32))
    per_pair = (held(tmp_path / "long") - held(tmp_path / "short")) / (40 * 100)
    assert per_pair < 150, per_pair
