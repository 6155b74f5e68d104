"""SPEC section 9 (untrusted trials): fuzzing shard bytes and index records.

Seeded (derandomized) and bounded, so it runs in CI in a few seconds
(``TENSORTAP_FUZZ_EXAMPLES`` runs a longer campaign). Fails on
any raw exception (anything but a tensortap error), any hang past a time
limit, and any value returned that differs from what was written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.fuzz_reader import serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensortap
from tensortap.backends.shard import ShardBuffer, prepare_shard
from tensortap.exceptions import TensortapError
from tensortap.modes import Mode

SHARD = "shards/worker_0/0000000000.h5"
RECORD = "index/worker_0/0000000000.json"
HANG_SECONDS = 20.0
FUZZ = settings(
    max_examples=int(os.environ.get("TENSORTAP_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def original_values(step: int) -> dict[str, np.ndarray]:
    return {
        "dense/kernel": (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) * (step + 1),
        "ragged": np.arange(step + 1, dtype=np.int64) * 7,
        "flag": np.array(step % 2 == 0),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trial of one shard with fixed, ragged and bool values and saved reductions, as a writer publishes it."""
    out = tmp_path_factory.mktemp("fuzz") / "trial"
    (out / "shards" / "worker_0").mkdir(parents=True)
    (out / "index" / "worker_0").mkdir(parents=True)
    (out / "end").mkdir()
    buf = ShardBuffer()
    for step in range(4):
        for name, value in original_values(step).items():
            buf.stage(step, name, ["fuzz"], value, {"l2": l2(value)}, None)
        buf.commit(step, int(Mode.TRAIN), step)
    record = prepare_shard(str(out / SHARD), "worker_0", 0, buf, SHARD).write()
    (out / RECORD).write_text(json.dumps(record))
    (out / "end" / "worker_0.json").write_text(json.dumps({"worker": "worker_0", "reason": "closed", "last_step": 3}))
    return out


def l2(value: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(value.astype(np.float64)))))


def written(name: str, step: int) -> np.ndarray:
    return original_values(step if step >= 0 else -1 - step)[name]


def same(got: np.ndarray, want: np.ndarray) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@pytest.fixture(scope="module")
def reader_process() -> Iterator[Any]:
    """A child process that reads trials; replaced when one reading hangs."""
    ctx = multiprocessing.get_context("spawn")
    state: dict[str, Any] = {}

    def start() -> None:
        parent, child = ctx.Pipe()
        state["proc"] = ctx.Process(target=serve, args=(child,), daemon=True)
        state["proc"].start()
        state["conn"] = parent

    def ask(*job: object) -> dict[str, Any]:
        if "proc" not in state:
            start()
        state["conn"].send(job)
        if not state["conn"].poll(HANG_SECONDS):
            state.pop("proc").kill()
            raise AssertionError(f"reading hung for more than {HANG_SECONDS} s")
        return state["conn"].recv()  # type: ignore[no-any-return]

    yield ask
    if "proc" in state:
        state["proc"].kill()


mutation = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6),
    ),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("zero"), st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 512))),
)


def mutate(data: bytes, how: tuple[str, Any]) -> bytes:
    kind, arg = how
    out = bytearray(data)
    if kind == "flip":
        for where, bits in arg:
            out[int(where * len(out))] ^= bits
    elif kind == "truncate":
        del out[int(arg * len(out)) :]
    else:
        start = int(arg[0] * len(out))
        out[start : start + arg[1]] = bytes(len(out[start : start + arg[1]]))
    return bytes(out)


def test_fuzzed_shards_never_give_a_raw_error_a_hang_or_a_wrong_value(
    pristine: Path, reader_process: Any, tmp_path: Path
) -> None:
    trial = tmp_path / "trial"
    shutil.copytree(pristine, trial)
    data = (pristine / SHARD).read_bytes()
    size = len(data)
    checked_ok_but_changed = []

    @FUZZ
    @given(how=mutation)
    def run(how: tuple[str, Any]) -> None:
        corrupt = mutate(data, how)
        (trial / SHARD).write_bytes(corrupt)
        got = reader_process(str(trial), str(trial / SHARD), size)
        assert "raw" not in got, got.get("raw")
        for (name, step), value in got["values"].items():
            assert same(value, written(name, step)), f"{how}: wrong value of {name} at {step}"
        for (name, step), value in got["reductions"].items():
            assert value == l2(written(name, step)), f"{how}: wrong l2 of {name} at {step}"
        if got["check_ok"] and corrupt != data:
            checked_ok_but_changed.append(how)  # allowed only where the bytes changed are unused

    run()
    assert len(checked_ok_but_changed) < FUZZ.max_examples // 2


NEST = "<nested deeper than any parser's recursion limit>"


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
        max_leaves=12,
    )


def paths(record: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``record``."""
    out = [prefix]
    if isinstance(record, dict):
        for k, v in record.items():
            out += paths(v, (*prefix, k))
    elif isinstance(record, list):
        for i, v in enumerate(record):
            out += paths(v, (*prefix, i))
    return out


def edit(record: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    if not path:
        return {"replace": value, "delete": {}, "nest": NEST}[action]
    parent = record
    for part in path[:-1]:
        parent = parent[part]
    if action == "delete":
        del parent[path[-1]]
    elif action == "nest":
        parent[path[-1]] = NEST
    else:
        parent[path[-1]] = value
    return record


def test_fuzzed_records_never_give_a_raw_error_or_a_wrong_value(pristine: Path, tmp_path: Path) -> None:
    trial_dir = tmp_path / "trial"
    shutil.copytree(pristine, trial_dir)
    original = json.loads((pristine / RECORD).read_text())
    all_paths = paths(original)

    @FUZZ
    @given(
        edits=st.lists(
            st.tuples(st.sampled_from(all_paths), st.sampled_from(["replace", "delete", "nest"]), json_values()),
            min_size=1,
            max_size=3,
        ),
        worker=json_values(),
        end=st.one_of(json_values(), st.fixed_dictionaries({"last_step": json_values(), "mode_steps": json_values()})),
    )
    def run(edits: list[tuple[tuple[Any, ...], str, Any]], worker: Any, end: Any) -> None:
        (trial_dir / "workers").mkdir(exist_ok=True)
        (trial_dir / "workers" / "worker_0.json").write_text(json.dumps(worker))
        (trial_dir / "end" / "worker_0.json").write_text(json.dumps(end))
        record: Any = json.loads(json.dumps(original))
        for path, action, value in edits:
            try:
                record = edit(record, path, action, value)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit removed that path
        text = json.dumps(record).replace(json.dumps(NEST), "[" * 100_000 + "]" * 100_000)
        (trial_dir / RECORD).write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = tensortap.create_trial(trial_dir)
            trial.collections(), trial.end_reasons(), trial.steps(), trial.training_ended
            for name in trial.tensor_names():
                t = trial.tensor(name)
                for step in t.steps():
                    try:
                        got = t.value(step)
                    except TensortapError:
                        continue
                    assert same(got, written(name, step)), f"{edits}: wrong value of {name} at {step}"
            trial.close()

    run()
