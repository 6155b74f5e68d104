"""SPEC sections 2, 4, 8: several writer processes, one lagging; complete and incomplete steps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from helpers.writer_proc import value_for

import tensortap
from tensortap import StepState, TensorUnavailableForStep
from tensortap.trial.trial import REFRESH_SECONDS

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
