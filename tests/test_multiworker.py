"""SPEC sections 2, 4, 8, 9: several writer processes, one lagging; complete and incomplete steps; one run per trial."""

from __future__ import annotations

import collections
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.cli import cli, strict_json
from helpers.trials import run_steps
from helpers.writer_proc import value_for

import tensortap
from tensortap import Mode, StepNotYetAvailable, StepState, TensorUnavailableForStep, TrialExistsError, UnknownName
from tensortap.backends import LocalStorage
from tensortap.capture import ShardPolicy, Writer
from tensortap.capture.writer import claim_worker
from tensortap.trial.check import find_problems
from tensortap.trial.trial import REFRESH_SECONDS
from tensortap.trial.views import awaited_note

WORKERS = ["worker_0", "worker_1", "worker_2"]


def test_three_workers_one_lagging(tmp_path: Path, writer_proc) -> None:
    procs = [writer_proc(tmp_path, "--rank", str(rank)) for rank in range(3)]
    for p in procs:
        p.send("steps", n=3, names=["a"])  # steps 0..2 on every rank, in parallel
    for p in procs:
        p.expect("ok steps")
    for p in procs[:2]:
        p.send("steps", n=2, names=["a", "fast"])  # ranks 0, 1 go on to steps 3, 4
    for p in procs[:2]:
        p.expect("ok steps")
    for p in procs:
        p.cmd("flush")

    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == WORKERS
    assert trial.steps() == [0, 1, 2]
    assert trial.steps(show_incomplete=True) == [0, 1, 2, 3, 4]
    assert trial.last_complete_step() == 2
    assert trial.has_passed_step(2) is StepState.AVAILABLE
    assert trial.has_passed_step(3) is StepState.NOT_YET_AVAILABLE
    assert not trial.training_ended

    a = trial.tensor("a")
    assert a.workers(1) == WORKERS
    assert a.workers(4) == ["worker_0", "worker_1"]
    for rank, worker in enumerate(WORKERS):
        np.testing.assert_array_equal(a.value(1, worker=worker), value_for("a", 1, rank))
        assert set(a.values(worker=worker)) == ({0, 1, 2} if rank == 2 else {0, 1, 2, 3, 4})
    np.testing.assert_array_equal(a.value(1), value_for("a", 1, 0))  # first worker in sorted order
    np.testing.assert_array_equal(a.value(4, worker="worker_1"), value_for("a", 4, 1))
    with pytest.raises(TensorUnavailableForStep, match="worker_2"):
        a.value(4, worker="worker_2")
    assert trial.tensor("fast").workers(3) == ["worker_0", "worker_1"]
    assert trial.tensor("fast").workers(1) == []
    assert trial.tensor_names(step=4) == ["a", "fast"]

    df = trial.to_pandas(names=["a"], reductions=["mean"])
    assert len(df) == 3 * 3 + 2 * 2
    assert sorted(df["worker"].unique()) == WORKERS
    row = df[(df.worker == "worker_2") & (df.step == 2)]
    assert row["value"].item() == pytest.approx(float(np.mean(value_for("a", 2, 2))))

    procs[2].cmd("close")  # the lagging worker ends: steps 3 and 4 are complete now
    time.sleep(REFRESH_SECONDS + 0.05)
    assert trial.steps() == [0, 1, 2, 3, 4]
    assert trial.has_passed_step(3) is StepState.AVAILABLE
    assert trial.has_passed_step(5) is StepState.NOT_YET_AVAILABLE  # ranks 0, 1 still run
    assert not trial.training_ended
    assert trial.end_reasons() == {"worker_2": "closed"}
    for p in procs[:2]:
        p.cmd("close")
    time.sleep(REFRESH_SECONDS + 0.05)
    assert trial.training_ended
    assert trial.end_reasons() == dict.fromkeys(WORKERS, "closed")
    for p in procs:
        assert p.wait()[0] == 0


# ---------------------------------------------------------------- one run per trial (if_exists)
def _run(out: Path, n: int, scale: float, **kwargs) -> Writer:
    """A finished run of ``n`` steps whose values are ``scale * (step + 1)``; returns its writer."""
    with Writer(out, **kwargs) as w:
        run_steps(w, n, value=lambda name, step: np.full(2, scale * (step + 1), np.float32))
    return w


def _values(trial: tensortap.Trial, worker: str = "worker_0") -> dict[int, float]:
    return {s: float(v[0]) for s, v in trial.tensor("a").values(worker=worker).items()}


def test_a_second_run_into_a_trial_is_refused_with_how_to_choose(tmp_path: Path) -> None:
    _run(tmp_path, 3, 1.0)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(TrialExistsError) as info:
        Writer(tmp_path)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "worker_0" in message and str(tmp_path) in message
    assert 'if_exists="overwrite"' in message and 'if_exists="new_run"' in message and "folder" in message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing touched
    trial = tensortap.create_trial(tmp_path)
    assert _values(trial) == {0: 1.0, 1: 2.0, 2: 3.0}
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_overwrite_replaces_that_workers_data_only(tmp_path: Path) -> None:
    _run(tmp_path, 4, 1.0, rank=0, shard_policy=ShardPolicy(max_steps=1))
    _run(tmp_path, 3, 5.0, rank=1)
    old = tensortap.create_trial(tmp_path)
    old.request_stop("the first run's request")
    _run(tmp_path, 2, 10.0, rank=0, if_exists="overwrite")
    trial = tensortap.create_trial(tmp_path)
    assert _values(trial, "worker_0") == {0: 10.0, 1: 20.0}  # none of the first run's 4 steps is left
    assert len(list((tmp_path / "shards" / "worker_0").iterdir())) == 1
    assert _values(trial, "worker_1") == {0: 5.0, 1: 10.0, 2: 15.0}
    assert trial.stop_request() is None  # it stopped the run that was replaced
    assert trial.problems() == {}


def test_new_run_keeps_every_fit_and_the_first_trial_as_it_was(tmp_path: Path) -> None:
    """A KFold loop: one hook per fit, each fit in a run folder of its own."""
    _run(tmp_path, 2, 1.0)  # a trial written before, straight into the folder
    folds = [_run(tmp_path, 3, 100.0 * (k + 1), if_exists="new_run") for k in range(3)]
    assert [w.out_dir for w in folds] == [str(tmp_path / f"run-{k}") for k in range(3)]
    for k in range(3):
        trial = tensortap.create_trial(tmp_path / f"run-{k}")
        scale = 100.0 * (k + 1)
        assert _values(trial) == {0: scale, 1: 2 * scale, 2: 3 * scale}
        assert trial.end_reasons() == {"worker_0": "closed"}
    first = tensortap.create_trial(tmp_path)
    assert _values(first) == {0: 1.0, 1: 2.0}


def test_a_run_resumed_with_new_run_goes_on_in_its_run_folder_after_later_runs(tmp_path: Path) -> None:
    """hunt 47 F2: a writer given ``run_id`` and ``if_exists="new_run"`` looked for the run in the last run folder
    only: once another run had written ``run-1``, run-0's training further went to a new ``run-2`` under the same
    run id, without a word. Every run folder is looked in (the last first); a run id none holds is a new run."""
    first = _run(tmp_path, 2, 1.0, if_exists="new_run")
    _run(tmp_path, 2, 7.0, if_exists="new_run")
    with Writer(tmp_path, if_exists="new_run", run_id=first.run_id) as w:
        assert w.out_dir == str(tmp_path / "run-0") and w.run_id == first.run_id
        for step in range(2, 4):
            with w.stepping(step=step):
                w.save("a", np.full(2, step + 1, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-0", "run-1"]
    trial = tensortap.create_trial(tmp_path / "run-0")
    assert _values(trial) == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0} and trial.problems() == {}
    assert _values(tensortap.create_trial(tmp_path / "run-1")) == {0: 7.0, 1: 14.0}
    with Writer(tmp_path, if_exists="new_run", run_id="a-run-of-none") as w:
        assert w.out_dir == str(tmp_path / "run-2")


def test_ranks_of_one_run_share_its_run_folder(tmp_path: Path) -> None:
    """The check is per worker name: rank 1, starting after rank 0, joins rank 0's run."""
    for run in range(2):
        writers = [Writer(tmp_path, rank=rank, if_exists="new_run") for rank in range(3)]
        assert {w.out_dir for w in writers} == {str(tmp_path / f"run-{run}")}
        for rank, w in enumerate(writers):
            run_steps(w, 2, value=lambda name, step, rank=rank: np.full(2, rank, np.float32))
            w.close()
        trial = tensortap.create_trial(tmp_path / f"run-{run}")
        assert trial.workers() == WORKERS
        assert trial.training_ended
    with Writer(tmp_path, rank=1) as w:  # the parent folder: rank 1 is free there, no run folder involved
        assert w.out_dir == str(tmp_path)


@pytest.mark.parametrize("if_exists", ["error", "new_run"])
def test_two_writers_starting_at_the_same_instant_with_one_worker_name(tmp_path: Path, if_exists: str) -> None:
    """The claim of a worker name is atomic on local storage: exactly one wins, never both."""

    def start(out: Path, barrier: threading.Barrier, results: list[Writer | BaseException]) -> None:
        barrier.wait()
        try:
            results.append(Writer(out, if_exists=if_exists))
        except TrialExistsError as exc:
            results.append(exc)

    for r in range(8):
        out = tmp_path / str(r)
        barrier = threading.Barrier(2)
        results: list[Writer | BaseException] = []
        threads = [threading.Thread(target=start, args=(out, barrier, results)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writers = [w for w in results if isinstance(w, Writer)]
        for w in writers:
            w.close()
        if if_exists == "error":
            assert len(writers) == 1 and len(results) == 2
        else:
            assert sorted(w.out_dir for w in writers) == [str(out / "run-0"), str(out / "run-1")]


def test_records_of_a_second_writer_of_one_worker_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the claim cannot be exclusive (object stores), the run id in every record tells the reader."""
    _run(tmp_path / "a", 2, 1.0)
    _run(tmp_path / "b", 2, 7.0)
    # what a second process writing worker_0 into "a" at the same time leaves there
    shutil.copy(tmp_path / "b/shards/worker_0/0000000000.h5", tmp_path / "a/shards/worker_0/0000000001.h5")
    record = json.loads((tmp_path / "b/index/worker_0/0000000000.json").read_text())
    record |= {"seq": 1, "shard": "shards/worker_0/0000000001.h5"}
    (tmp_path / "a/index/worker_0/0000000001.json").write_text(json.dumps(record))
    trial = tensortap.create_trial(tmp_path / "a")
    assert [r.name for r in caplog.records if "two processes wrote the worker worker_0" in r.getMessage()] == [
        "tensortap"
    ]
    assert _values(trial) == {0: 1.0, 1: 2.0}  # the records of the run the worker record names
    assert list(trial.problems()) == ["index/worker_0/0000000001.json"]
    assert find_problems(str(tmp_path / "a")) == [
        "index/worker_0/0000000001.json: written by another process than the one the worker record names: "
        "two processes wrote the worker worker_0"
    ]


def test_a_run_continued_in_another_process_numbers_its_steps_on_from_those_recorded(tmp_path: Path) -> None:
    """A training restarted into the same trial (``run_id``, a new process, nothing numbered by hand) began
    at step 0 again: every reader refused the continued run's records (steps listed by earlier ones)."""

    def train(writer: Writer) -> None:
        for mode in ("train", "train", "eval"):
            with writer.stepping(mode=mode):
                writer.save("a", np.full(2, writer.step, np.float32))

    with Writer(tmp_path) as first:
        train(first)
    with Writer(tmp_path, run_id=first.run_id) as second:
        train(second)
    trial = tensortap.create_trial(tmp_path)
    assert trial.problems() == {}
    assert trial.steps() == list(range(6)) and _values(trial) == {s: float(s) for s in range(6)}
    assert trial.steps(mode=Mode.TRAIN) == [0, 1, 2, 3] and trial.steps(mode=Mode.EVAL) == [0, 1]


class _ListingCounted(LocalStorage):
    """A local trial that counts the listings of each folder."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listed: collections.Counter[str] = collections.Counter()

    def list(self, prefix: str) -> list[str]:
        self.listed[prefix] += 1
        return super().list(prefix)


def test_a_resumed_run_lists_its_own_index_folder_twice_at_most(tmp_path: Path) -> None:
    """Perf nit A2: a writer continuing a run (``run_id``) listed its own index folder three times: to
    see whether its records were orphaned, for its next shard number, and for the steps of the run; one listing
    now gives the last two. The orphan check still lists first: on an object store, a listing's refusal names
    its cause (``InvalidAccessKeyId``), a HEAD's (``exists``) cannot."""
    _run(tmp_path, 3, 1.0)
    record = json.loads((tmp_path / "workers" / "worker_0.json").read_text())  # the same run's id
    storage = _ListingCounted(tmp_path)
    claimed, seq, (last, _) = claim_worker(storage, "worker_0", record, "error", resume=True, answered=lambda: None)
    assert claimed is storage and seq == 1 and last == 2  # its next shard and the run's last step
    assert storage.listed["index/worker_0"] == 2


def test_a_hook_continues_the_run_whose_id_it_is_given(tmp_path: Path) -> None:
    """Training further (XGBoost's ``xgb_model=``) is the same run: data kept, steps and shards go on."""
    first = _run(tmp_path, 3, 1.0)
    with pytest.raises(TrialExistsError):
        Writer(tmp_path, run_id="not-that-run")
    with Writer(tmp_path, run_id=first.run_id) as w:
        assert w.run_id == first.run_id
        for step in range(3, 5):
            with w.stepping(step=step):
                w.save("a", np.full(2, step + 1, np.float32))
    trial = tensortap.create_trial(tmp_path)
    assert _values(trial) == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0}
    assert sorted(p.name for p in (tmp_path / "shards" / "worker_0").iterdir()) == ["0000000000.h5", "0000000001.h5"]
    assert trial.end_reasons() == {"worker_0": "closed"}
    assert trial.problems() == {}


def test_a_rank_that_has_not_written_yet_holds_the_run_open(tmp_path: Path) -> None:
    """Rank 1 trains and ends before rank 0 starts (slow data loading on rank 0). Readers knew only the
    workers that had written their record: the run read as ended, rank 1's steps as complete, and
    ``wait_for_steps`` returned. The worker record names the world size, and readers wait for every rank."""
    with Writer(tmp_path, rank=1, world_size=2) as first:
        run_steps(first, 3)
    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == ["worker_0", "worker_1"]
    assert not trial.training_ended
    assert trial.steps() == [] and trial.last_complete_step() is None
    assert trial.steps(show_incomplete=True) == [0, 1, 2]
    assert trial.has_passed_step(0) is StepState.NOT_YET_AVAILABLE
    with pytest.raises(tensortap.StepNotYetAvailable):
        trial.wait_for_steps([0], timeout=0)  # the timeout still ends the wait for a rank that never comes
    with Writer(tmp_path, rank=0, world_size=2) as late:
        trial.refresh()
        assert trial._index.awaited == [] and trial.steps() == []  # started: running, at no step yet
        run_steps(late, 2)
    trial.refresh()
    assert trial.training_ended
    assert trial.steps() == [0, 1, 2] and trial.last_complete_step() == 2
    trial.wait_for_steps([0, 1, 2])


def test_the_world_size_a_hook_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``world_size=`` given; nothing where none is given, also under a launcher (its ``WORLD_SIZE``) or a
    process group: a script that makes its hook on rank 0 only would leave readers waiting for the other
    ranks for ever. Nothing with ``include_workers="one"``. A rank not below it is an error naming both."""

    def recorded(out: Path, **kwargs: Any) -> int | None:
        Writer(out, **kwargs).close()
        rank = kwargs.get("rank", 0)
        return json.loads((out / "workers" / f"worker_{rank}.json").read_text()).get("world_size")

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert recorded(tmp_path / "single") is None
    assert recorded(tmp_path / "given", rank=1, world_size=3) == 3
    assert recorded(tmp_path / "one", world_size=3, include_workers="one") is None
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        Writer(tmp_path / "bad", rank=2, world_size=2)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=f"world_size: expected an integer >= 1.*got {bad!r}"):
            Writer(tmp_path / "bad", world_size=bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="world_size"):
        Writer(tmp_path / "bad", rank=1, include_workers="one", world_size=0)  # checked where not recorded too


def test_a_trial_whose_records_name_no_world_size_reads_as_before(tmp_path: Path) -> None:
    """Records of an older writer, or of a hook that does not know the world size, have no ``world_size``:
    readers count the workers they see, as they always did."""
    with Writer(tmp_path, rank=1) as w:
        run_steps(w, 2)
    assert "world_size" not in json.loads((tmp_path / "workers" / "worker_1.json").read_text())
    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == ["worker_1"]
    assert trial.training_ended and trial.steps() == [0, 1]
    assert find_problems(str(tmp_path)) == []


def test_worker_records_that_disagree_on_the_world_size_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning naming the workers and what each says; readers expect the largest; ``check`` reports it."""
    for rank, size in ((0, 2), (1, 3)):
        with Writer(tmp_path, rank=rank, world_size=size) as w:
            run_steps(w, 1)
    trial = tensortap.create_trial(tmp_path)
    trial.refresh()
    why = (
        "the worker records disagree on the world size (worker_0 says 2, worker_1 says 3); readers expect the "
        "largest, 3"
    )
    assert [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()] == [
        f"tensortap: {trial.path}: {why}"
    ]
    assert trial.workers() == WORKERS and not trial.training_ended and trial.steps() == []
    assert find_problems(str(tmp_path))[0] == f"workers: {why}"


@pytest.mark.parametrize("size", [0, -2, "2", 1.0, None, 2**20 + 1])
def test_a_worker_record_with_a_world_size_not_as_the_format_says_is_refused(tmp_path: Path, size: object) -> None:
    """A stranger's record cannot make readers list billions of workers (nor anything else but a count)."""
    with Writer(tmp_path, rank=0) as w:
        run_steps(w, 1)
    record = tmp_path / "workers" / "worker_0.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "world_size": size}))
    trial = tensortap.create_trial(tmp_path)
    assert trial.workers() == ["worker_0"] and trial.training_ended
    why = "unreadable record (not a valid worker record: 'world_size' is not an integer from 1 to 1048576)"
    assert trial.problems() == {"workers/worker_0.json": why}
    assert find_problems(str(tmp_path)) == [f"workers/worker_0.json: {why}"]


def test_check_and_ls_name_a_rank_that_never_wrote_anything(tmp_path: Path) -> None:
    """A rank that failed before it started capturing: the rest of the run ended, readers wait for it (the
    run never reads as ended), so ``check`` reports it (exit 1) and ``ls`` names it."""
    with Writer(tmp_path, rank=1, world_size=3) as w:
        run_steps(w, 2)
    checked = cli("check", str(tmp_path))
    assert checked.returncode == 1, checked.stderr
    missing = (
        "missing: the worker records name a world size of 3, and {} has written nothing (a rank that failed before "
        "it started capturing, or one still starting); readers wait for it"
    )
    lines = checked.stdout.splitlines()
    assert lines[:2] == [f"workers/{w}.json: {missing.format(w)}" for w in ("worker_0", "worker_2")]
    assert "Traceback" not in checked.stderr
    listed = cli("ls", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    status = "running (or stopped without an end marker): worker_0, worker_2 have written nothing yet"
    assert f"workers  worker_0, worker_1, worker_2  [{status}]" in listed.stdout
    assert strict_json(cli("ls", "--json", str(tmp_path)).stdout)["training_ended"] is False


def test_check_and_ls_name_ten_missing_ranks_and_count_the_rest(tmp_path: Path) -> None:
    """A run of 14 ranks of which one wrote: ``check`` names ten of the 13 missing and counts the 3 others in one
    more problem; the status ``ls`` prints names as many and counts the rest."""
    with Writer(tmp_path, rank=1, world_size=14) as w:
        run_steps(w, 1)
    missing = [f"worker_{rank}" for rank in range(14) if rank != 1]
    problems = find_problems(str(tmp_path))
    assert [p.partition(": ")[0] for p in problems[:-1]] == [f"workers/{w}.json" for w in missing[:10]]
    assert problems[-1] == "workers: 3 more workers of the world size 14 have written nothing"
    trial = tensortap.create_trial(tmp_path)
    assert awaited_note(trial) == f"{', '.join(missing[:10])} and 3 more have written nothing yet"


def test_a_live_read_of_a_step_one_worker_has_not_written_yet_is_not_another_workers_value(tmp_path: Path) -> None:
    """Two ranks, worker_1 ahead of worker_0: a tensor read live at a step worker_0 has not written yet gave
    worker_1's value, which ``value(step)`` no longer gave once worker_0 wrote it (the first worker's, SPEC
    section 4); ``steps()`` and ``values()`` listed steps ``trial.steps()`` held back. Now a tensor's steps
    and values are those of complete steps, and ``value`` of a step still to complete raises
    StepNotYetAvailable (``worker=`` reads a worker's own values whenever they are there)."""

    def value(name: str, step: int, rank: int = 0) -> np.ndarray:
        return np.full(2, 10.0 * step + rank, dtype=np.float32)

    with Writer(tmp_path, rank=0, world_size=2) as w0, Writer(tmp_path, rank=1, world_size=2) as w1:
        run_steps(w0, 2, value=value)
        run_steps(w1, 4, value=lambda n, s: value(n, s, 1))
        w0.flush()
        w1.flush()
        trial = tensortap.create_trial(tmp_path, refresh_interval=0)
        tensor = trial.tensor("a")
        assert trial.steps() == [0, 1] and tensor.steps() == [0, 1]
        assert list(tensor.values()) == [0, 1] and list(tensor.histogram_values(bins=4)) == [0, 1]
        # and the readers of rows (hunt 33 M1): the step's reductions, the DataFrame, the summary line
        assert tensor.reduction_values("mean") == {0: 0.0, 1: 10.0} and list(tensor.to_series("max").index) == [0, 1]
        assert sorted(set(trial.to_pandas(reductions="mean")["step"])) == [0, 1, 2, 3]  # each row its worker's
        assert "2 steps (+2 incomplete) (train 2)" in repr(trial) and "2 worker(s)" in repr(trial)
        assert list(tensor.reduction_values("mean", worker="worker_1")) == [0, 1, 2, 3]
        assert tensor.value(1).tolist() == [10.0, 10.0]
        with pytest.raises(StepNotYetAvailable):
            tensor.value(2)
        assert tensor.value(2, worker="worker_1").tolist() == [21.0, 21.0]
        run_steps(w0, 2, value=value)
    trial.refresh()
    assert tensor.steps() == [0, 1, 2, 3] and tensor.value(2).tolist() == [20.0, 20.0]
    assert [v.tolist()[0] for v in tensor.values().values()] == [0.0, 10.0, 20.0, 30.0]


def _reader_of_two_workers(tmp_path: Path, reader: str) -> Callable[[Any], Any]:
    """``reader`` of tensor ``a`` (one step by each of two workers, written in ``tmp_path``), given ``worker=``."""
    with Writer(tmp_path, rank=0, world_size=2) as w0, Writer(tmp_path, rank=1, world_size=2) as w1:
        run_steps(w0, 1)
        run_steps(w1, 1)
    tensor = tensortap.create_trial(tmp_path).tensor("a")
    readers: dict[str, Callable[[Any], Any]] = {
        "values": lambda w: tensor.values(worker=w),
        "histogram_values": lambda w: tensor.histogram_values(worker=w),
        "reduction_values": lambda w: tensor.reduction_values("mean", worker=w),
        "to_series": lambda w: tensor.to_series("mean", worker=w),
        "steps": lambda w: tensor.steps(worker=w),
        "value": lambda w: tensor.value(0, worker=w),
    }
    return readers[reader]


@pytest.mark.parametrize("reader", ["values", "histogram_values", "reduction_values", "to_series", "value"])
def test_an_unknown_worker_is_refused_naming_the_workers(reader: str, tmp_path: Path) -> None:
    """``values(worker="worker_9")`` and the other readers of every step gave ``{}`` (an empty Series), as for a
    worker that saved nothing of the tensor, while ``value(0, worker="worker_9")`` raised (hunt 33 M2). Since
    hunt 52 F6, ``value`` also names the unknown worker with the closest names (it said "did not save it")."""
    call = _reader_of_two_workers(tmp_path, reader)
    assert len(call("worker_1")) > 0
    with pytest.raises(UnknownName, match=r"no worker 'worker_9' in .*\(valid: worker_0, worker_1\)"):
        call("worker_9")


@pytest.mark.parametrize("reader", ["values", "steps", "reduction_values", "value"])
def test_a_worker_given_as_a_rank_is_refused_saying_it_takes_a_name(reader: str, tmp_path: Path) -> None:
    """review 58b R58b-3: ``value(0, worker=1)`` (a rank, not the name ``"worker_1"``) raised an ``UnknownName``
    whose message failed to be made (``TypeError`` in difflib: printing it showed ``<exception str() failed>``).
    A worker that is no str is a ``TypeError`` naming what ``worker=`` takes; an ``UnknownName`` of a name that
    is no str has a message too."""
    call = _reader_of_two_workers(tmp_path, reader)
    with pytest.raises(TypeError, match=r"worker= takes a worker's name, a str such as 'worker_1'.* not 1 \(int\)"):
        call(1)
    assert str(UnknownName("worker", 1, ["worker_0"])) == "no worker 1 (valid: worker_0)"  # type: ignore[arg-type]


def test_ranks_resumed_together_number_on_from_the_same_step(tmp_path: Path) -> None:
    """hunt 40 F1: the ranks of a DDP run killed mid-training had each published a different number of steps
    (each loses its own unpublished tail); resumed with their ``run_id``, each numbered on from its own last
    step, so one training step had a different number on each rank (the trial merged different steps into one,
    ``check`` said ok; the ranks' stop agreements fell on different iterations). Every rank now numbers on from
    the last step of the run, over all its workers: a rank that published fewer steps leaves a gap."""
    ids = []
    for rank, n in ((0, 4), (1, 2)):
        with Writer(tmp_path, rank=rank, world_size=2) as w:
            run_steps(w, n, mode="train")
            run_steps(w, rank + 1, mode="eval")
        ids.append(w.run_id)
    numbered: dict[int, list[tuple[int, str, int]]] = {0: [], 1: []}
    resumed = [Writer(tmp_path, rank=rank, world_size=2, run_id=ids[rank]) for rank in (0, 1)]  # torchrun's restart
    for rank, w in enumerate(resumed):
        for mode in ("train", "eval"):
            with w.stepping(mode=mode):
                w.save("a", np.full(2, w.step, np.float32))
                numbered[rank].append((w.step, mode, w.mode_step))
        w.close()
    # worker_0 recorded steps 0-4 (4 training steps, then 1 eval), worker_1 0-3 (2 training, then 2 eval)
    assert numbered[0] == numbered[1] == [(5, "train", 4), (6, "eval", 2)]
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == list(range(7))
    assert sorted(_values(trial, "worker_1")) == [0, 1, 2, 3, 5, 6]  # step 4 was worker_0's alone: a gap
    assert trial.problems() == {}
