"""SPEC section 6 end to end on S3 (a moto server on 127.0.0.1): capture, publish, read back live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tensortap
from tensortap import StepState, TrialNotFound
from tensortap.backends.shard import ShardError, ShardReader
from tensortap.capture import ShardPolicy, Writer

pytestmark = pytest.mark.s3


def weight(step: int, size: int = 6) -> np.ndarray:
    return (np.arange(size, dtype=np.float32) + 0.5) * (step + 1)


def write_steps(writer: Writer, steps: range, size: int = 6) -> None:
    for step in steps:
        with writer.stepping():
            writer.save("dense/kernel", weight(step, size), collections=["weights"])
            writer.save("losses/loss", np.float32(1.0 / (step + 1)), collections=["losses"])


def test_values_written_to_s3_read_back_equal(s3_url: str, s3_options: dict[str, Any]) -> None:
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=2)) as writer:
        write_steps(writer, range(5))
    assert not writer.failed
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.steps() == [0, 1, 2, 3, 4]
    assert trial.tensor_names() == ["dense/kernel", "losses/loss"]
    for step in range(5):
        np.testing.assert_array_equal(trial.tensor("dense/kernel").value(step), weight(step))
        assert trial.tensor("losses/loss").value(step) == np.float32(1.0 / (step + 1))
    assert trial.training_ended
    assert trial.end_reasons() == {"worker_0": "closed"}
    assert trial.problems() == {}
    shards = trial.storage.list("shards/worker_0")
    assert shards == ["0000000000.h5", "0000000001.h5", "0000000002.h5"]


def test_a_located_tensor_is_read_by_range_requests_without_downloading_its_shard(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every value of floats and integers whose index record says where they lie (``raw_at``) is read
    from S3 by range requests: no shard is downloaded. So is the first value read alone from a shard (a
    look at one step); a second one, and a tensor read through HDF5 (booleans), download the shard into
    the cache once (a loop over steps reads the rest there); a located read of it then reads the copy."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TENSORTAP_CACHE_DIR", str(cache))
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=2)) as writer:
        for step in range(5):
            with writer.stepping():
                writer.save("dense/kernel", weight(step, 1000), collections=["weights"])
                writer.save("losses/loss", np.float32(1.0 / (step + 1)), collections=["losses"])
                writer.save("mask", np.arange(4) % 2 == step % 2)
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.tensor("losses/loss").values() == {s: np.float32(1.0 / (s + 1)) for s in range(5)}
    kernel = trial.tensor("dense/kernel")
    for step, value in kernel.values().items():
        assert value.tobytes() == weight(step, 1000).tobytes()
    assert not cache.exists() or not any(cache.iterdir())
    assert kernel.value(3).tobytes() == weight(3, 1000).tobytes()
    assert not cache.exists() or not any(cache.iterdir())
    assert kernel.value(2).tobytes() == weight(2, 1000).tobytes()
    assert len(list(cache.iterdir())) == 1  # the shard of steps 2 and 3, for the next steps a loop reads
    assert trial.tensor("losses/loss").value(3) == np.float32(1.0 / 4)  # the copy
    assert len(list(cache.iterdir())) == 1
    for step, value in trial.tensor("mask").values().items():
        np.testing.assert_array_equal(value, np.arange(4) % 2 == step % 2)
    assert len(list(cache.iterdir())) == 3
    assert kernel.value(4).tobytes() == weight(4, 1000).tobytes()  # the shard's copy, read in place


def test_trial_accepts_storage_options_as_a_mapping(s3_url: str, s3_options: dict[str, Any]) -> None:
    with Writer(s3_url, storage_options=s3_options) as writer:
        write_steps(writer, range(2))
    trial = tensortap.create_trial(s3_url, storage_options=s3_options)
    assert trial.steps() == [0, 1]


def test_live_reader_sees_new_steps_and_the_end(s3_url: str, s3_options: dict[str, Any]) -> None:
    writer = Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1))
    try:
        write_steps(writer, range(2))
        writer.flush()
        # a separate s3fs client, as a reader in another process has: its listing cache is its own
        trial = tensortap.create_trial(s3_url, refresh_interval=0, skip_instance_cache=True, **s3_options)
        assert trial.storage.fs is not writer.storage.fs
        assert trial.steps() == [0, 1]
        assert not trial.training_ended
        assert trial.has_passed_step(3) == StepState.NOT_YET_AVAILABLE
        write_steps(writer, range(2, 4))
        writer.flush()
        assert trial.steps() == [0, 1, 2, 3]
        np.testing.assert_array_equal(trial.tensor("dense/kernel").value(3), weight(3))
    finally:
        writer.close()
    assert trial.training_ended
    assert trial.end_reasons() == {"worker_0": "closed"}
    assert trial.has_passed_step(3) == StepState.AVAILABLE
    assert trial.has_passed_step(4) == StepState.UNAVAILABLE


def test_stop_request_reaches_the_writer_through_s3(s3_url: str, s3_options: dict[str, Any]) -> None:
    with Writer(s3_url, storage_options=s3_options) as writer:
        write_steps(writer, range(1))
        writer.flush()
        trial = tensortap.create_trial(s3_url, refresh_interval=0, skip_instance_cache=True, **s3_options)
        assert trial.stop_request() is None
        trial.request_stop("loss is NaN", step=0)
        deadline = time.monotonic() + 30
        while not writer.should_stop and time.monotonic() < deadline:  # a poll after the look that found it
            time.sleep(0.05)
        assert writer.stop_reason == "loss is NaN"
    assert trial.end_reasons() == {"worker_0": "stop_request"}


def test_no_partial_shard_is_ever_visible(s3_url: str, s3_options: dict[str, Any]) -> None:
    import s3fs

    size = 128 * 1024  # 512 KiB of float32 per step and shard
    steps = 8
    observer = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    root = s3_url.removeprefix("s3://")
    checked: dict[str, int] = {}
    problems: list[str] = []
    done = threading.Event()
    scans = 0

    def check_new_objects() -> None:
        observer.invalidate_cache()
        for path in observer.find(root):
            key = path[len(root) + 1 :]
            if key in checked or path.rstrip("/") == root:
                # the prefix itself: s3fs's find lists the prefix, finds nothing yet, then asks for the
                # prefix's info, which by then describes it as a folder of the objects just written
                continue
            if os.path.basename(key).startswith(".") or not key.endswith((".h5", ".json")):
                problems.append(f"unexpected object {key}")
            if key.startswith("index/"):  # an index record is written after its shard
                shard = key.replace("index/", "shards/", 1).removesuffix(".json") + ".h5"
                if not observer.exists(f"{root}/{shard}"):
                    problems.append(f"{key} is visible before {shard}")
            if key.endswith(".h5"):
                with tempfile.NamedTemporaryFile(suffix=".h5") as f:
                    f.write(observer.cat_file(path))
                    f.flush()
                    try:
                        reader = ShardReader(f.name)
                        reader.validate()
                        [(step, value)] = reader.values("dense/kernel").items()
                        reader.close()
                        np.testing.assert_array_equal(value, weight(step, size))
                    except (ShardError, AssertionError) as exc:
                        problems.append(f"{key}: {exc}")
            checked[key] = 1

    def watch() -> None:
        nonlocal scans
        while not done.is_set():
            try:
                check_new_objects()
            except Exception as exc:  # report in the test, not in a dying thread
                problems.append(repr(exc))
                return
            scans += 1

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as writer:
            write_steps(writer, range(steps), size)
    finally:
        done.set()
        watcher.join()
    check_new_objects()
    assert not problems, problems[:5]
    assert scans > 0
    assert sorted(k for k in checked if k.endswith(".h5")) == [f"shards/worker_0/{i:010d}.h5" for i in range(steps)]
    assert "end/worker_0.json" in checked


EXIT_WITHOUT_CLOSE = """
import json, sys
import numpy as np
from tensortap.capture import ShardPolicy, Writer

url, options, local = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
Writer(local)  # a writer made before the S3 client's own exit hooks exist
policy = ShardPolicy(max_steps=1000, max_seconds=60, live_seconds=None)  # nothing published before the exit
writer = Writer(url, storage_options=options, shard_policy=policy)
for step in range(3):
    with writer.stepping():
        writer.save("dense/kernel", np.full(4, step, dtype=np.float32), collections=["weights"])
# no close(): the exit handler publishes the buffered steps and the end marker
"""


def test_exit_without_close_publishes_to_s3_and_leaves_no_local_files(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    # A host name with no DNS cache makes every new connection resolve through a thread pool,
    # as with real S3 after some idle time: publishing at exit must happen before pools shut down.
    options = {
        **s3_options,
        "client_kwargs": {
            "endpoint_url": s3_options["client_kwargs"]["endpoint_url"].replace("127.0.0.1", "localhost")
        },
        "config_kwargs": {"connector_args": {"use_dns_cache": False}},
    }
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    args = [s3_url, json.dumps(options), str(tmp_path / "local")]
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITHOUT_CLOSE, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.steps() == [0, 1, 2]
    np.testing.assert_array_equal(trial.tensor("dense/kernel").value(2), np.full(4, 2, dtype=np.float32))
    assert trial.end_reasons() == {"worker_0": "exit"}
    assert list(tmp.iterdir()) == []  # the staging directory was removed


def test_a_missing_bucket_is_an_error_not_created(s3_options: dict[str, Any]) -> None:
    import s3fs

    url = "s3://tensortap-no-such-bucket/run"
    with pytest.raises(RuntimeError, match="cannot write the trial at s3://tensortap-no-such-bucket/run"):
        Writer(url, storage_options=s3_options, strict=True)
    assert not s3fs.S3FileSystem(skip_instance_cache=True, **s3_options).exists("tensortap-no-such-bucket")


def test_cli_reads_an_s3_trial_with_storage_options(
    s3_url: str, s3_options: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from tensortap.cli import main

    with Writer(s3_url, storage_options=s3_options) as w:
        write_steps(w, range(3))
    options = json.dumps(s3_options)
    assert main(["ls", s3_url, "--storage-options", options, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == [0, 1, 2]
    show = ["show", s3_url, "dense/kernel", "--step", "2", "--full", "--json", "--storage-options", options]
    assert main(show) == 0
    (entry,) = json.loads(capsys.readouterr().out)["steps"]
    assert entry["step"] == 2 and entry["value"] == weight(2).tolist()
    assert main(["ls", f"{s3_url}-misspelt", "--storage-options", options]) == 2
    assert f"no tensortap trial at {s3_url}-misspelt: nothing exists there" in capsys.readouterr().err
    assert main(["check", s3_url, "--storage-options", options]) == 0
    assert main(["rules", s3_url, "--rule", "exploding_tensor", "--storage-options", options]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["ls", s3_url, "--storage-options", "[1, 2]"])
    assert exc.value.code == 2
    assert "expected a JSON object" in capsys.readouterr().err


def test_a_path_that_is_an_object_is_a_file_not_a_trial_and_is_not_waited_for(
    s3_url: str, s3_options: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 52 F4: a trial path naming an object (``.../workers/worker_0.json``) was taken for a folder without
    marker files: ``ls`` said so, and ``rules --follow`` waited for ever for it to become a trial (a local file
    raises at once). It is now "a file, not a trial folder" at once, as a local file; an object beside a trial
    at the prefix of its name (both may be on S3) leaves that trial readable."""
    import s3fs

    from tensortap.cli import main

    with Writer(s3_url, storage_options=s3_options) as w:
        write_steps(w, range(2))
    options = ["--storage-options", json.dumps(s3_options)]
    record = f"{s3_url}/workers/worker_0.json"
    assert main(["ls", record, *options]) == 2
    assert f"no tensortap trial at {record}: it is a file, not a trial folder" in capsys.readouterr().err
    # the idle timeout only bounds the test should the wait come back
    follow = ["rules", record, "--rule", "exploding_tensor", "--follow", "--idle-timeout", "20", *options]
    assert main([*follow, "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "not_found" and "it is a file" in error["message"]
    with pytest.raises(TrialNotFound, match="it is a file"):
        tensortap.create_trial(record, wait=True, **s3_options)
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_options).pipe(s3_url, b"an object named as the trial")
    assert tensortap.create_trial(s3_url, **s3_options).steps() == [0, 1]


def test_outputs_to_s3_take_the_storage_options_and_say_a_storage_failure_first(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 52 F3 and F2: an output to S3 (``export -o``, ``report -o``, ``plot -o``, ``export tensorboard``'s
    LOGDIR) was opened without ``--storage-options``: botocore's NoCredentialsError, an "unexpected error" (kind
    ``unexpected``), once the whole trial was read. The options now go to the output as to the trial (a local
    trial takes none); a storage that cannot be reached is the readers' one-line storage error (kind
    ``storage``), said before the trial is opened. A second TensorBoard export into the S3 LOGDIR is refused."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboardX")
    import s3fs

    from tensortap.cli import main

    local = str(tmp_path / "local")
    with Writer(local) as w:
        write_steps(w, range(3))
    with Writer(s3_url, storage_options=s3_options) as w:
        write_steps(w, range(3))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    options = ["--storage-options", json.dumps(s3_options)]
    out = f"{s3_url}-out"
    for trial in (local, s3_url):
        assert main(["export", trial, "-o", f"{out}/t.csv", *options]) == 0
        assert fs.cat(f"{out}/t.csv").startswith(b"worker,")
        assert main(["report", trial, "-o", f"{out}/r.html", *options]) == 0
        assert fs.cat(f"{out}/r.html").startswith(b"<!")
        assert main(["plot", trial, "losses/loss", "-o", f"{out}/p.png", *options]) == 0
        assert fs.cat(f"{out}/p.png").startswith(b"\x89PNG")
        assert main(["export", "tensorboard", trial, f"{out}/tb-{trial == local}", *options]) == 0
    capsys.readouterr()
    assert main(["export", "tensorboard", local, f"{out}/tb-True", *options, "--json"]) == 2
    assert "holds event files already" in json.loads(capsys.readouterr().out)["error"]["message"]
    refused = {
        **s3_options,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"total_max_attempts": 1}},
    }
    missing = str(tmp_path / "no-trial")  # the output is checked first: its error, not this one's
    for command in (
        ["export", missing, "-o", f"{out}/u.csv"],
        ["report", missing, "-o", f"{out}/u.html"],
        ["plot", missing, "losses/loss", "-o", f"{out}/u.png"],
        ["export", "tensorboard", local, f"{out}/tb-u"],
    ):
        assert main([*command, "--storage-options", json.dumps(refused), "--json"]) == 2, command
        error = json.loads(capsys.readouterr().out)["error"]
        assert error["kind"] == "storage" and "cannot connect to http://127.0.0.1:9" in error["message"], command


def test_plot_compares_a_local_run_with_an_s3_run(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 35 F5: ``plot LOCAL S3 NAME --storage-options ...`` applied the options to the local run too and
    exited 2 ("storage_options: only used with URLs"); ``plot S3 LOCAL NAME`` took the local trial for a tensor
    name ("no tensor named '/tmp/...'"), the error telling it swallowed. The options now go to the URLs among the
    runs; an error telling whether an argument is a run is said (a store that cannot be reached), and with no URL
    among the runs the options are refused as before."""
    pytest.importorskip("matplotlib")
    from tensortap.cli import main

    local = str(tmp_path / "local")
    for url, options in ((s3_url, s3_options), (local, None)):
        with Writer(url, storage_options=options) as w:
            write_steps(w, range(3))
    options = ["--storage-options", json.dumps(s3_options), "--json"]
    for runs in ([local, s3_url], [s3_url, local]):
        assert main(["plot", *runs, "losses/loss", "-o", str(tmp_path / "p.png"), *options]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["runs"] == runs and answer["tensors"] == ["losses/loss"]
    refused = {
        **s3_options,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"total_max_attempts": 1}},
    }
    unreachable = ["--storage-options", json.dumps(refused)]
    assert main(["plot", local, s3_url, "losses/loss", "-o", str(tmp_path / "q.png"), *unreachable]) == 2
    assert "cannot connect to http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["plot", local, local, "losses/loss", "-o", str(tmp_path / "r.png"), *options]) == 2
    refusal = f"only used with URLs such as s3://, got ['client_kwargs', 'key', 'secret'] for the local path {local!r}"
    assert refusal in capsys.readouterr().err
