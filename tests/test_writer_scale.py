"""The writer at scale: its memory bound in bytes when single steps are large (session 46's scale hunt)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import tensortap
from tensortap.capture import ShardPolicy, Writer

STEP = np.arange(3 << 18, dtype=np.float32)  # 3 MiB a step: a shard of its own under the budgets below


@pytest.mark.parametrize("max_bytes", [4 << 20, 1 << 20])
def test_steps_larger_than_a_shard_keep_the_memory_bound_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_bytes: int
) -> None:
    """Each step larger than a shard's quarter of ``max_bytes`` fills a shard of its own. The writer
    counted shards in flight, not bytes: it held three such steps whatever ``max_bytes`` said (1,201 MB
    for steps of one 400 MiB tensor). Now the shards handed off and not yet published hold at most
    ``max_bytes``, or the one shard just handed off where that alone is larger; every step is still
    written whole."""
    policy = ShardPolicy(max_bytes=max_bytes, max_seconds=60, live_seconds=None)
    w = Writer(tmp_path, shard_policy=policy)
    writer = w.writer
    assert writer is not None
    publish = writer.storage.publish_file
    gate, begun = threading.Event(), threading.Event()

    def held(local: str, key: str) -> None:  # shard 0's publish waits for the gate: a slow storage
        begun.set()
        assert gate.wait(60)
        publish(local, key)

    monkeypatch.setattr(writer.storage, "publish_file", held)
    in_flight: list[int] = []

    def train() -> None:
        for step in range(4):
            with w.stepping():
                w.save("x", STEP + step)
            in_flight.append(writer.in_flight_bytes)

    training = threading.Thread(target=train)
    training.start()
    assert begun.wait(60)
    training.join(2.0)  # the steps the writer lets through while shard 0 is held (all of them before)
    gate.set()
    training.join(60)
    assert not training.is_alive()
    w.close()
    step_bytes = min(in_flight)  # one shard: one step
    assert step_bytes >= STEP.nbytes
    assert max(in_flight) <= max(max_bytes, step_bytes), in_flight
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1, 2, 3]
    assert len(list((tmp_path / "shards" / "worker_0").glob("*.h5"))) == 4
    for step in range(4):
        np.testing.assert_array_equal(trial.tensor("x").value(step), STEP + step)
