"""SPEC 7, 9 on S3: transient errors are retried, an outage shorter than ``ShardPolicy.timeout`` costs no step,
a silent endpoint never blocks training, one run per trial; a slow store is read with concurrent requests."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from helpers.s3_proxy import FaultyProxy, silent_endpoint

import tensortap
import tensortap.backends.storage as storage_module
from tensortap import ReductionConfig
from tensortap.capture import ShardPolicy, Writer
from tensortap.exceptions import StorageUnreachable
from tensortap.trial.index import READS_AT_ONCE

pytestmark = pytest.mark.s3

# one attempt per botocore call: the retries under test are tensortap's own
S3_BUCKET = "tensortap-test"  # the bucket tests/conftest.py creates
NO_CLIENT_RETRIES = {"retries": {"total_max_attempts": 1}}
OUTAGE_SECONDS = 4.0  # longer than the fixed retries of before (about 1.5 s), well within the timeout below
OUTAGE_TIMEOUT = 20.0  # ShardPolicy.timeout of the outage tests


def weight(step: int) -> np.ndarray:
    return (np.arange(4, dtype=np.float32) + 0.5) * (step + 1)


def train(writer: Writer, steps: range) -> None:
    for step in steps:
        with writer.stepping():
            writer.save("w", weight(step), collections=["weights"])


def _in_thread(fn: Any, limit: float = 120.0) -> None:
    """Run ``fn`` on a thread and check that it returned (a hang would never)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), "training was blocked by the storage"


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultyProxy]:
    p = FaultyProxy(s3_endpoint)
    yield p
    p.close()


def _through(proxy: FaultyProxy | Relay, s3_options: dict[str, Any], client_retries: bool = False) -> dict[str, Any]:
    """``s3_options`` through ``proxy``: one attempt per botocore call, or with ``client_retries`` the
    client's own timeouts and retries (what a user gets)."""
    options = {**s3_options, "client_kwargs": {"endpoint_url": proxy.url}}
    return options if client_retries else {**options, "config_kwargs": NO_CLIENT_RETRIES}


class Relay:
    """A TCP relay on 127.0.0.1 to ``target`` (the moto server), down until :meth:`up`: nothing listens on
    its port then, so every connection to it is refused, as by a store that is restarting."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (str(parts.hostname), int(parts.port or 80))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None

    def up(self) -> None:
        """Listen on the port and relay each connection to the target."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, args=(self._listener,), daemon=True).start()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        """Stop listening (the connections made stay until their ends close them)."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
            self._listener.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy what ``source`` receives to ``sink`` until either end closes; then close both ways."""
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        source.close()


def _fail_every_request_for(proxy: FaultyProxy, seconds: float) -> threading.Timer:
    """From now, every request through ``proxy`` is answered ``500 InternalError``, for ``seconds``; the timer
    that ends the outage (join it to know it ended)."""
    proxy.failing_paths = "/"
    timer = threading.Timer(seconds, setattr, (proxy, "failing_paths", ""))
    timer.start()
    return timer


def _keys(s3_options: dict[str, Any], url: str) -> set[str]:
    """Every object under ``url``, read straight from the server (not through a proxy), relative to it."""
    import s3fs

    found = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options).find(url)
    root = url.removeprefix("s3://") + "/"
    return {str(k).removeprefix(root) for k in found}


def _check_every_step(url: str, s3_options: dict[str, Any], steps: range, reason: str = "closed") -> None:
    """The trial at ``url`` holds each of ``steps`` with the value :func:`train` saved, and ended for ``reason``."""
    trial = tensortap.create_trial(url, **s3_options)
    assert trial.steps() == list(steps)
    values = trial.tensor("w").values()
    assert sorted(values) == list(steps)
    for step, v in values.items():
        np.testing.assert_array_equal(v, weight(step))
    assert trial.end_reasons() == {"worker_0": reason}


def test_transient_upload_errors_are_retried_and_capture_goes_on(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tensortap")
    w = Writer(s3_url, storage_options=_through(proxy, s3_options), shard_policy=ShardPolicy(max_steps=1))
    train(w, range(2))
    w.flush()
    proxy.failures = 2  # the next two uploads fail with 500 InternalError
    train(w, range(2, 5))
    w.close()
    assert proxy.failed == 2
    assert not w.failed
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # one warning as the retries start, one as they end: not one per attempt
    assert len(retries) == 2 and all("0000000002.h5" in m for m in retries), retries
    assert "injected" in retries[0] and "retrying" in retries[0] and "answered at attempt 3" in retries[1]
    _check_every_step(s3_url, s3_options, range(5))


def test_an_outage_while_the_hook_starts_is_waited_out(
    s3_endpoint: str, s3_options: dict[str, Any], s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that refuses connections for a few seconds while a worker claims its name (a restart) turned
    capture off for the whole run: its reads were not retried at all, its writes for 1.5 s. They are retried
    for most of ``ShardPolicy.timeout`` now; the hook starts once the store is back."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    relay = Relay(s3_endpoint)
    restart = threading.Timer(OUTAGE_SECONDS, relay.up)
    restart.start()
    try:
        start = time.monotonic()
        w = Writer(
            s3_url, storage_options=_through(relay, s3_options), shard_policy=ShardPolicy(timeout=OUTAGE_TIMEOUT)
        )
        took = time.monotonic() - start
        assert not w.failed
        train(w, range(3))
        w.close()
    finally:
        restart.join()
        relay.close()
    assert OUTAGE_SECONDS * 0.9 < took < OUTAGE_TIMEOUT
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and "cannot connect" in warnings[0] and "answered at attempt" in warnings[1], warnings
    _check_every_step(s3_url, s3_options, range(3))


def test_an_outage_mid_run_shorter_than_the_timeout_loses_no_step(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request failed for a few seconds while a shard was published: that publish failed after 1.5 s of
    retries and capture turned off for the rest of the run. It is retried until the store answers again:
    every step is kept; training waits meanwhile only where it waits for the storage (backpressure)."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    policy = ShardPolicy(max_steps=1, timeout=OUTAGE_TIMEOUT)
    w = Writer(s3_url, storage_options=_through(proxy, s3_options), shard_policy=policy)
    train(w, range(2))
    w.flush()
    outage = _fail_every_request_for(proxy, OUTAGE_SECONDS)
    start = time.monotonic()
    train(w, range(2, 8))  # more shards than are let in flight: training waits for the first
    took = time.monotonic() - start
    w.close()
    outage.join()
    assert not w.failed
    assert took < OUTAGE_TIMEOUT
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "0000000002.h5 failed" in warnings[0] and "injected" in warnings[0]
    assert "0000000002.h5: the storage answered at attempt" in warnings[1]
    _check_every_step(s3_url, s3_options, range(8))


@pytest.mark.parametrize("when", ["at start", "mid-run"])
def test_a_storage_given_up_for_gets_nothing_more_once_it_answers(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """A store that holds requests longer than ``ShardPolicy.timeout``: training waits no longer than that,
    capture turns off with one error, and when the store answers again, nothing more reaches it. Before, the
    call left behind went on once the store answered: the set-up wrote the worker record after capture had
    turned off, the publish the shard's index record and the end marker (they would land in whatever run
    claimed the worker since). A request in flight is not recalled: its shard may land, which no index
    record names."""
    caplog.set_level(logging.ERROR, logger="tensortap")
    timeout = 2.0 if when == "at start" else 3.0
    policy = ShardPolicy(max_steps=1, timeout=timeout)
    options = _through(proxy, s3_options)
    if when == "at start":
        proxy.stalled.set()
        start = time.monotonic()
        w = Writer(s3_url, storage_options=options, shard_policy=policy)
        waited = time.monotonic() - start
        train(w, range(3))
        w.close()
    else:
        w = Writer(s3_url, storage_options=options, shard_policy=policy)
        train(w, range(2))
        w.flush()
        proxy.stalled.set()
        train(w, range(2, 4))
        start = time.monotonic()
        w.close()
        waited = time.monotonic() - start
    assert w.failed
    assert waited < timeout + 1.0  # the training thread waited for one bound, no more
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"within {timeout:g} s" in errors[0], errors
    given_up = _keys(s3_options, s3_url)
    assert len(proxy.held) == 1  # the one request of the call left behind
    proxy.seen.clear()
    proxy.stalled.clear()
    proxy.release()  # the request held is cut: the client sends it again, and it gets through
    deadline = time.monotonic() + 30
    while proxy.held[0] not in proxy.seen and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # what the call left behind would write next comes within milliseconds
    writes = [(m, p) for m, p in proxy.seen if m in ("PUT", "POST", "DELETE") and (m, p) not in proxy.held]
    assert writes == []  # the request in flight got through (the client sent it again), nothing after it
    late = _keys(s3_options, s3_url) - given_up
    assert late <= {"shards/worker_0/0000000002.h5"}, late  # no worker record, index record or end marker
    if when == "mid-run":
        trial = tensortap.create_trial(s3_url, **s3_options)
        assert trial.steps() == [0, 1] and trial.end_reasons() == {}


def test_errors_that_outlast_the_retries_end_capture_with_an_end_marker(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Shards refused for longer than ``ShardPolicy.timeout``: the retries stop at the bound, capture turns off
    with one error (the storage's, before the training thread's wait runs out), the end marker goes in."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    timeout = 4.0  # the retries stop at 3.6 s: 0.4 s before the training thread's wait would
    w = Writer(
        s3_url, storage_options=_through(proxy, s3_options), shard_policy=ShardPolicy(max_steps=1, timeout=timeout)
    )
    train(w, range(2))
    w.flush()
    proxy.failing_paths = "/shards/"  # every upload of a shard, for good
    train(w, range(2, 4))
    start = time.monotonic()
    w.flush()
    waited = time.monotonic() - start
    assert w.failed
    train(w, range(4, 6))  # training goes on
    w.close()
    assert waited < timeout + 1.0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "capture is disabled" in errors[0] and "the storage failed a request" in errors[0]
    gave_up = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 1 and "0000000002.h5" in gave_up[0]
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.steps() == [0, 1]
    assert trial.end_reasons() == {"worker_0": "error"}  # live readers and rules --follow end


def test_a_silent_endpoint_does_not_block_the_writer_at_start(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("s3fs")
    caplog.set_level(logging.ERROR, logger="tensortap")
    with silent_endpoint() as url:
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": url}}
        writers: list[Writer] = []

        def start_and_train() -> None:
            w = Writer(
                f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", storage_options=options, shard_policy=ShardPolicy(timeout=1)
            )
            writers.append(w)
            train(w, range(3))
            w.close()

        _in_thread(start_and_train)
    assert writers[0].failed
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "did not answer within 1 s" in errors[0]


def test_a_silent_endpoint_fails_the_opening_of_a_trial_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An endpoint that accepts connections and never answers held ``create_trial`` (and ``tensortap ls``)
    for more than 400 s (s3fs's timeouts and retries); the opening gives up after ``ANSWER_SECONDS``
    with an error naming the trial: exit 2 on the command line."""
    pytest.importorskip("s3fs")
    from tensortap.cli import main

    monkeypatch.setattr(storage_module, "ANSWER_SECONDS", 2.0)
    url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    with silent_endpoint() as endpoint:
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}}
        outcomes: list[Any] = []

        def open_it() -> None:
            with pytest.raises(TimeoutError, match=f"{url}: the storage did not answer within 2 s"):
                tensortap.create_trial(url, **options)
            outcomes.append(main(["ls", url, "--storage-options", json.dumps(options)]))

        _in_thread(open_it, limit=60)
    assert outcomes == [2]
    assert "did not answer within 2 s" in capsys.readouterr().err


def test_a_reader_whose_store_stops_answering_fails_in_bounded_time_and_keeps_its_shards(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 9, a reader never hangs: once the endpoint stops answering (s3fs's own timeouts and retries held a
    listing of it for 416 s), a refresh and value reads each fail with a TimeoutError naming
    the trial after ``ANSWER_SECONDS``; no shard is taken for unreadable: the same trial reads on once the
    endpoint answers again."""
    with Writer(s3_url, storage_options=s3_options) as w:
        train(w, range(3))
    options = _through(proxy, s3_options, client_retries=True)
    trial = tensortap.create_trial(s3_url, refresh_interval=3600, **options)  # reads only when told to refresh
    assert trial.steps() == [0, 1, 2]
    answer = storage_module.ANSWER_SECONDS
    # 1 s for the reads of the stalled endpoint alone: the opening (its whole first contact within the bound)
    # and the reads once it answers again took more than 1 s on a loaded machine once
    monkeypatch.setattr(storage_module, "ANSWER_SECONDS", 1.0)
    proxy.stalled.set()
    failures: list[str] = []

    def read() -> None:
        with pytest.raises(TimeoutError) as refreshed:
            trial.refresh()
        with pytest.raises(TimeoutError) as read:
            trial.tensor("w").value(1)
        with pytest.raises(TimeoutError) as read_all:
            trial.tensor("w").values()
        failures.extend(str(e.value) for e in (refreshed, read, read_all))

    _in_thread(read, limit=30)
    assert len(failures) == 3
    assert all(f.startswith(f"{s3_url}: the storage did not answer within 1 s") for f in failures), failures
    proxy.stalled.clear()
    monkeypatch.setattr(storage_module, "ANSWER_SECONDS", answer)
    np.testing.assert_array_equal(trial.tensor("w").value(1), weight(1))
    assert trial.steps() == [0, 1, 2]


def test_wait_for_steps_on_a_store_that_stops_answering_keeps_to_its_timeout(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """hunt 49 F4: once the endpoint stopped answering, `wait_for_steps(..., timeout=3)` took 60 s (a refresh
    bounded by ``ANSWER_SECONDS`` alone, made before anything else) and raised TimeoutError, also for a step
    it knew was complete. A step known to have passed now returns without asking the storage; a wait for
    another one asks it no longer than the timeout and raises StepNotYetAvailable, as trial.md says."""
    w = Writer(s3_url, storage_options=s3_options)
    train(w, range(3))
    w.flush()  # the training goes on
    trial = tensortap.create_trial(s3_url, **_through(proxy, s3_options, client_retries=True))
    assert trial.steps() == [0, 1, 2] and not trial.training_ended
    proxy.stalled.set()
    outcomes: list[type[BaseException] | None] = []

    def wait() -> None:
        trial.wait_for_steps([1], timeout=1)
        for _ in range(2):  # the second: after a refresh cut short
            with pytest.raises(tensortap.StepNotYetAvailable) as waited:
                trial.wait_for_steps([1, 100], timeout=1)
            outcomes.append(type(waited.value.__cause__) if waited.value.__cause__ else None)

    _in_thread(wait, limit=30)  # ANSWER_SECONDS is 60 s
    assert outcomes == [TimeoutError, TimeoutError]
    proxy.stalled.clear()
    w.close()


def test_check_of_a_store_that_does_not_answer_for_its_shards_is_an_input_error(
    proxy: FaultyProxy,
    s3_options: dict[str, Any],
    s3_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``tensortap check`` where the shards' requests get no answer: exit 2 naming the storage after
    ``ANSWER_SECONDS``, not exit 1 with the shards reported unreadable (nothing is known of them)."""
    from tensortap.cli import main

    monkeypatch.setattr(storage_module, "ANSWER_SECONDS", 1.0)
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(3))
    proxy.stalled_paths = "/shards/"
    options = _through(proxy, s3_options, client_retries=True)
    codes: list[int] = []
    _in_thread(lambda: codes.append(main(["check", s3_url, "--storage-options", json.dumps(options)])), limit=60)
    assert codes == [2]
    err = capsys.readouterr().err
    assert f"{s3_url}: the storage did not answer within 1 s" in err and "unreadable" not in err, err


def test_a_shard_whose_reads_the_storage_fails_is_kept_and_read_once_it_answers(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """An HTTP 500 to a shard's requests (past the client's retries) made the trial drop the shard for good: its
    values were gone from that trial, even once the storage answered again, and ``value()`` said the worker
    "did not save it" (session 50's hunt 23, F1). The read raises StorageUnreachable naming the storage; the
    shard is kept, and read once the storage answers."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(3))
    trial = tensortap.create_trial(s3_url, refresh_interval=3600, **_through(proxy, s3_options))
    assert trial.steps() == [0, 1, 2]
    proxy.failing_paths = "/shards/"
    for read in (lambda: trial.tensor("w").value(1), lambda: trial.tensor("w").values()):
        with pytest.raises(StorageUnreachable, match=f"^{s3_url}: the storage failed a request"):
            read()
    proxy.failing_paths = ""
    trial.refresh()
    np.testing.assert_array_equal(trial.tensor("w").value(1), weight(1))
    assert sorted(trial.tensor("w").values()) == [0, 1, 2] and trial.steps() == [0, 1, 2]


def test_check_of_a_store_that_fails_the_requests_of_its_shards_is_an_input_error(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tensortap check`` where the storage answers a shard's requests with HTTP 500: exit 2 naming the storage,
    not exit 1 with sound shards reported unreadable (session 50's hunt 23, F4)."""
    from tensortap.cli import main

    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(3))
    proxy.failing_paths = "/shards/"
    options = json.dumps(_through(proxy, s3_options))
    assert main(["check", s3_url, "--storage-options", options]) == 2
    err = capsys.readouterr().err
    assert f"{s3_url}: the storage failed a request" in err and "unreadable" not in err, err
    proxy.failing_paths = ""
    assert main(["check", s3_url, "--storage-options", options]) == 0


def test_a_training_never_waits_for_the_stop_request_of_a_remote_trial(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training polls the trial's stop request once a second (``Hook.should_stop``); on remote storage
    the look runs on another thread: while the endpoint does not answer each poll returns at once (each
    waited for the store before: 2 s here, ``ANSWER_SECONDS``), and a request written meanwhile is seen
    by a poll once the endpoint answers again."""
    from tensortap.backends.registry import get_storage
    from tensortap.capture.stop import StopChannel

    monkeypatch.setattr(storage_module, "ANSWER_SECONDS", 2.0)
    channel = StopChannel(get_storage(s3_url, **_through(proxy, s3_options, client_retries=True)))
    proxy.stalled.set()
    start = time.monotonic()
    assert not any(channel.poll(0.0) for _ in range(5))
    assert time.monotonic() - start < 1.5  # one look of the five would have taken 2 s
    StopChannel(get_storage(s3_url, **s3_options)).request("enough")
    proxy.stalled.clear()
    deadline = time.monotonic() + 30
    while not channel.poll(0.0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert channel.reason == "enough"


def test_ctrl_c_ends_a_check_that_waits_for_a_download(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, tmp_path: Path
) -> None:
    """``tensortap check`` of a remote trial interrupted while a shard's download gets no answer exits 130 at
    once: no thread waits for the download (it waited until the storage's bound, 60 s).

    The check is given an hour as that bound (``ANSWER_SECONDS``; botocore's own timeouts and retries end
    a held request after several minutes), so waiting for the download can never pass for an exit at once
    on a slow machine, and the bounds of this test are far from anything it waits for: before, a check that
    waited for the download exited after 60 s, and this test allowed 20 s for the exit, and 60 s to reach a
    shard, on a machine the full suite loads."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(3))
    proxy.stalled_paths = "/shards/"
    options = _through(proxy, s3_options, client_retries=True)
    env = {**os.environ, "TENSORTAP_CACHE_DIR": str(tmp_path / "cache")}
    check = (
        "import sys, tensortap.backends.storage as s, tensortap.cli as c; s.ANSWER_SECONDS = 3600.0; sys.exit(c.main())"
    )
    command = [sys.executable, "-c", check, "check", s3_url, "--storage-options", json.dumps(options)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not proxy.held and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.held, f"check never asked for a shard: {proc.poll()=}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().endswith("tensortap check: interrupted") and "Traceback" not in err


def test_a_store_that_stops_answering_mid_run_does_not_block_training(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="tensortap")
    policy = ShardPolicy(max_steps=1, timeout=5)
    w = Writer(s3_url, storage_options=_through(proxy, s3_options), shard_policy=policy)
    train(w, range(2))
    w.flush()
    proxy.stalled.set()

    def go_on() -> None:
        train(w, range(2, 12))  # more shards than the publishing queue holds
        w.close()

    _in_thread(go_on)
    assert w.failed
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "5 s" in errors[0]
    trial = tensortap.create_trial(s3_url, **s3_options)  # straight to the server, not through the proxy
    assert trial.steps() == [0, 1]


def test_a_trial_is_opened_with_its_index_records_read_at_once(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """One index record per shard: read one after the other, opening a trial of many shards on a store
    tens of milliseconds away would take that many round trips. The proxy holds each request for an
    index record until all six are held at once (one after the other, each would wait 10 s, then fail)."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(6))
    proxy.meet("/index/", 6)
    trial = tensortap.create_trial(s3_url, **_through(proxy, s3_options))
    assert trial.steps() == list(range(6))
    assert proxy.met == 6
    for step in range(6):
        np.testing.assert_array_equal(trial.tensor("w").value(step), weight(step))


def test_a_record_is_read_with_one_request(proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str) -> None:
    """s3fs asks the size of an object it reads whole (a HEAD before the GET, to split large downloads):
    records are read from byte 0 instead, one request each. Opening a trial of six shards lists and reads
    its records without a HEAD; reading the stop request (what a training polls) is one GET after the
    check that it exists."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(6))
    trial = tensortap.create_trial(s3_url, **_through(proxy, s3_options))
    assert trial.steps() == list(range(6))
    assert [m for m, _ in proxy.seen if m != "GET"] == []
    assert len([p for _, p in proxy.seen if "/index/" in p and "list-type" not in p]) == 6
    trial.request_stop("test")
    proxy.seen.clear()
    request = trial.stop_request()
    assert request is not None and request["reason"] == "test"
    assert [m for m, p in proxy.seen if p.endswith("/control/stop.json")] == ["HEAD", "GET"]  # exists, read


def test_a_refresh_lists_the_folders_of_each_round_at_once(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """A refresh lists the workers' records, the end markers and the index folders, then each worker's
    index folder: one after the other, 3 + W round trips each time a reader looks for new data. The proxy
    holds each listing until three are held at once (one after the other, each would wait 10 s)."""
    for rank in range(3):
        with Writer(s3_url, storage_options=s3_options, rank=rank, include_workers="all") as w:
            train(w, range(2))
    trial = tensortap.create_trial(s3_url, **_through(proxy, s3_options))
    assert trial.workers() == ["worker_0", "worker_1", "worker_2"]
    proxy.meet("list-type=2", 3)
    trial.refresh()
    assert proxy.met == 3
    assert trial.steps() == [0, 1]
    assert trial.tensor("w").workers(1) == ["worker_0", "worker_1", "worker_2"]


def test_a_frame_of_many_tensors_looks_for_new_data_once(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, tmp_path: Path
) -> None:
    """``to_pandas`` reads many tensors from one view of the trial (as ``export_tensorboard`` and the report
    do): each tensor looked for new data first (two rounds of listings on remote storage, every
    ``refresh_interval``), which on a distant bucket cost about as much as reading it, and asked the
    metadata of each of its shards (a ``HEAD``), which it now asks once per shard; ``trial.frozen()`` gives a
    user's own reads the same view."""
    pytest.importorskip("pandas")
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=2)) as w:
        for step in range(4):
            with w.stepping():
                for i in range(5):
                    w.save(f"layer{i}/w", weight(step) * i, collections=["weights"])
    trial = tensortap.create_trial(s3_url, refresh_interval=0, **_through(proxy, s3_options))
    proxy.seen.clear()
    trial.refresh()
    one_refresh = sum("list-type=2" in p for _, p in proxy.seen)
    assert one_refresh == 4  # workers/, end/, index/, then index/worker_0/
    proxy.seen.clear()
    frame = trial.to_pandas(reductions=["mean"])
    assert sorted(set(frame["name"])) == [f"layer{i}/w" for i in range(5)] and len(frame) == 20
    assert sum("list-type=2" in p for _, p in proxy.seen) == one_refresh
    assert sum(m == "HEAD" and "/shards/" in p for m, p in proxy.seen) == 2  # each shard's size, once
    proxy.seen.clear()
    trial.tensor("layer1/w").values()
    trial.tensor("layer2/w").values()
    assert sum("list-type=2" in p for _, p in proxy.seen) >= one_refresh  # outside, as often as asked
    assert sum(m == "HEAD" and "/shards/" in p for m, p in proxy.seen) == 4
    proxy.seen.clear()
    with trial.frozen() as same:  # a user's reads of many tensors: as to_pandas reads them
        assert same is trial
        got = [trial.tensor(f"layer{i}/w").values() for i in (1, 2)]
    assert sum("list-type=2" in p for _, p in proxy.seen) == one_refresh
    assert sum(m == "HEAD" and "/shards/" in p for m, p in proxy.seen) == 2
    np.testing.assert_array_equal(got[1][3], weight(3) * 2)


def test_a_tensor_is_read_from_several_shards_at_once(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values whose index records say where they lie are read by range requests, from several shards at
    once: by ``values()``, all ten at once (the proxy holds each until ten are held: s3fs's connection pool
    has ten), and by reductions computed from them, eight at once (the shards whose values are held
    together)."""
    monkeypatch.setenv("TENSORTAP_CACHE_DIR", str(tmp_path / "cache"))
    steps = range(10)
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        for step in steps:
            with w.stepping():
                w.save("w", weight(step), collections=["weights"])
                w.save("b", -weight(step), collections=["biases"])
    trial = tensortap.create_trial(s3_url, **_through(proxy, s3_options))
    assert trial.steps() == list(steps)
    proxy.meet("/shards/", 10)
    for name, sign in (("w", 1), ("b", -1)):
        values = trial.tensor(name).values()
        assert list(values) == list(steps)
        for step, value in values.items():
            np.testing.assert_array_equal(value, sign * weight(step))
    assert proxy.met == 10
    proxy.meet("/shards/", READS_AT_ONCE)  # reductions computed from the values: read the same way
    means = trial.tensor("w").reduction_values("mean")
    assert means == {step: pytest.approx(float(np.mean(weight(step)))) for step in steps}
    assert proxy.met == READS_AT_ONCE
    assert not any((tmp_path / "cache").glob("*"))  # no shard downloaded


def test_shards_read_through_hdf5_are_downloaded_several_at_once(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved reductions are read from the shard itself: the shards are downloaded into the cache several
    at once (the proxy holds each download until all six are held), then read one after the other."""
    monkeypatch.setenv("TENSORTAP_CACHE_DIR", str(tmp_path / "cache"))
    options = {"reduction_config": ReductionConfig(reductions=["mean"]), "shard_policy": ShardPolicy(max_steps=1)}
    with Writer(s3_url, storage_options=s3_options, **options) as w:
        train(w, range(6))
    trial = tensortap.create_trial(s3_url, **_through(proxy, s3_options))
    assert trial.steps() == list(range(6))
    proxy.meet("/shards/", 6)
    means = trial.tensor("w").reduction_values("mean")
    assert means == {step: pytest.approx(float(np.mean(weight(step)))) for step in range(6)}
    assert proxy.met == 6
    assert len(list((tmp_path / "cache").iterdir())) == 6


@pytest.mark.parametrize("room", [None, 2.5])
def test_check_downloads_the_next_shards_while_it_reads_one(
    proxy: FaultyProxy,
    s3_options: dict[str, Any],
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    room: float | None,
) -> None:
    """``check`` reads remote shards one at a time and downloads the next ones meanwhile: eight ahead, or as
    many as the shard cache holds beside the one read (``room`` shards: one ahead). The proxy holds each
    download until that many are held at once (one after the other, each would wait 10 s, then fail). A
    corrupt shard is still found, and only it."""
    import s3fs

    from tensortap.trial.check import find_problems

    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(6))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    shards = sorted(fs.ls(f"{s3_url}/shards/worker_0", detail=True), key=lambda e: str(e["name"]))
    monkeypatch.setenv("TENSORTAP_CACHE_DIR", str(tmp_path / "cache"))
    if room is not None:
        monkeypatch.setenv("TENSORTAP_CACHE_BYTES", str(int(room * max(int(e["size"]) for e in shards))))
    at_once = 6 if room is None else 2
    proxy.meet("/shards/", at_once)
    assert find_problems(s3_url, _through(proxy, s3_options), show_progress=False) == []
    assert proxy.met == at_once
    fs.pipe_file(str(shards[3]["name"]), b"\x89HDF\r\n\x1a\n" + bytes(int(shards[3]["size"]) - 8))
    (problem,) = find_problems(s3_url, _through(proxy, s3_options), show_progress=False)
    assert problem.startswith(f"shards/worker_0/{str(shards[3]['name']).rsplit('/', 1)[1]}: unreadable shard")


def test_check_downloads_a_shard_again_whose_copy_went_before_it_was_read(
    s3_options: dict[str, Any], s3_url: str, tmp_path: Path
) -> None:
    """A copy downloaded ahead may be evicted from the shard cache (by the downloads after it) before its
    child opens it: the shard is then downloaded again, not reported unreadable."""
    from tensortap.backends.isolated import ShardChild
    from tensortap.backends.registry import get_storage
    from tensortap.trial.check import _inspect

    with Writer(s3_url, storage_options=s3_options) as w:
        train(w, range(2))
    storage = get_storage(s3_url, **s3_options)
    (shard,) = [f"shards/worker_0/{name}" for name in storage.list("shards/worker_0")]
    child = ShardChild("tensortap.trial.check:inspect_shard", 60.0)
    try:
        assert _inspect(storage, {}, child, shard, str(tmp_path / "evicted.h5")) is None
        (tmp_path / "bad.h5").write_bytes(b"not a shard")
        assert "unreadable shard" in str(_inspect(storage, {}, child, shard, str(tmp_path / "bad.h5")))
    finally:
        child.end()


def test_new_run_on_s3_keeps_every_fit(s3_options: dict[str, Any], s3_url: str) -> None:
    """One run per trial holds on object storage too: each fit in ``<prefix>/run-<n>``."""
    for fit in range(2):
        with Writer(s3_url, storage_options=s3_options, if_exists="new_run") as w:
            assert w.out_dir == f"{s3_url}/run-{fit}"
            train(w, range(fit, fit + 2))
    for fit in range(2):
        trial = tensortap.create_trial(f"{s3_url}/run-{fit}", **s3_options)
        assert trial.steps() == [0, 1]
        np.testing.assert_array_equal(trial.tensor("w").value(1), weight(fit + 1))
        assert trial.end_reasons() == {"worker_0": "closed"}


SLOW_DOWN = (503, "SlowDown", "Please reduce your request rate.")


@pytest.mark.parametrize("answer", [SLOW_DOWN, (500, "InternalError", "We encountered an internal error.")])
def test_index_records_whose_reads_the_storage_fails_are_read_by_the_next_refresh(
    proxy: FaultyProxy,
    s3_options: dict[str, Any],
    s3_url: str,
    caplog: pytest.LogCaptureFixture,
    answer: tuple[int, str, str],
) -> None:
    """hunt 35 F1: index records whose GETs the storage answered 503 SlowDown (or 500, past the client's retries)
    were taken for damaged records (``cat_ranges`` returns each file's error, which never became
    StorageUnreachable): a live reader warned "unreadable record" and never read them again (steps 2-4 lost for
    good), and each was read a second time whole first (a second call of the storage's bound: one refresh took
    80 s). The refresh raises StorageUnreachable after one request per record; the next one reads them."""
    caplog.set_level(logging.WARNING, logger="tensortap")
    w = Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1))
    train(w, range(2))
    w.flush()
    trial = tensortap.create_trial(s3_url, refresh_interval=3600, **_through(proxy, s3_options))
    assert trial.steps() == [0, 1]
    train(w, range(2, 5))
    w.close()
    proxy.failing_paths, proxy.failing_answer = "/index/", answer
    with pytest.raises(StorageUnreachable, match=f"^{s3_url}: the storage failed a request"):
        trial.refresh()
    assert len({p for _, p in proxy.failed_paths}) == 3
    if answer != SLOW_DOWN:  # which s3fs retries itself
        assert len(proxy.failed_paths) == 3  # one request each: none read again whole
    proxy.failing_paths = ""
    trial.refresh()
    assert trial.steps() == [0, 1, 2, 3, 4] and trial.end_reasons() == {"worker_0": "closed"}
    assert sorted(trial.tensor("w").values()) == [0, 1, 2, 3, 4]
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]


def test_commands_on_a_trial_whose_index_records_the_storage_fails_exit_2_naming_it(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 35 F1: with index records answered 503 SlowDown, ``ls`` exited 0 showing a run that ended with no
    step, ``check`` exited 1 reporting every sound record as damaged, ``show`` said the tensor did not exist.
    Each exits 2 naming the storage (``--json`` kind ``storage``)."""
    from tensortap.cli import main

    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(3))
    proxy.failing_paths, proxy.failing_answer = "/index/", SLOW_DOWN
    options = json.dumps(_through(proxy, s3_options))
    assert main(["ls", s3_url, "--json", "--storage-options", options]) == 2
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert error["kind"] == "storage" and error["message"].startswith(f"{s3_url}: the storage failed a request")
    for command in (["check", s3_url], ["show", s3_url, "w"]):
        assert main([*command, "--storage-options", options]) == 2
        err = capsys.readouterr().err
        assert f"{s3_url}: the storage failed a request" in err and "unreadable" not in err, err
    proxy.failing_paths = ""
    assert main(["check", s3_url, "--storage-options", options]) == 0


@pytest.mark.parametrize(
    "answer",
    [
        (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
        (
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your key.",
        ),
        (403, "AccessDenied", "Access Denied"),
        (400, "ExpiredToken", "The provided token has expired."),
    ],
)
def test_credentials_the_storage_refuses_are_a_storage_error_naming_the_trial_and_the_endpoint(
    proxy: FaultyProxy,
    s3_options: dict[str, Any],
    s3_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    answer: tuple[int, str, str],
) -> None:
    """hunt 35 F2: credentials the storage rejected gave s3fs's bare ``PermissionError("Access Denied")``: readers
    said ``tensortap ls: Access Denied`` (``--json`` kind ``input``), naming neither the trial nor the endpoint, and
    the hook logged an 85-line chained traceback. They are StorageUnreachable naming both (kind ``storage``), and
    the hook's error is one line."""
    from tensortap.cli import main

    with Writer(s3_url, storage_options=s3_options) as w:
        train(w, range(1))
    proxy.failing_paths, proxy.failing_answer = "/", answer
    options = _through(proxy, s3_options)
    denied = f"{s3_url}: access denied by {proxy.url} ({answer[1]}: {answer[2]})"
    with pytest.raises(StorageUnreachable) as opened:
        tensortap.create_trial(s3_url, **options)
    assert str(opened.value).startswith(denied) and "credentials" in str(opened.value)
    assert main(["ls", s3_url, "--json", "--storage-options", json.dumps(options)]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "storage" and error["message"].startswith(denied)
    caplog.set_level(logging.WARNING, logger="tensortap")
    other = f"{s3_url}/other"
    w = Writer(other, storage_options=options)
    train(w, range(2))
    w.close()
    assert w.failed
    (error_record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]  # not retried: no warning
    assert f"{other}: access denied by {proxy.url} ({answer[1]}" in error_record.getMessage()
    assert error_record.exc_info is None  # no traceback


@pytest.mark.parametrize("who", ["list only", "anonymous"])
def test_credentials_that_may_list_but_not_read_are_a_storage_error(
    proxy: FaultyProxy,
    s3_endpoint: str,
    s3_options: dict[str, Any],
    s3_url: str,
    capsys: pytest.CaptureFixture[str],
    who: str,
) -> None:
    """hunt 35 F3: credentials that may list the trial's objects but not read them (s3:ListBucket without
    s3:GetObject; ``anon=True`` where moto lets anyone list) made every record "unreadable": an ended trial read
    as a run still running with no step (``ls`` exit 0), ``check`` reported every sound file damaged (exit 1), and
    ``rules --follow`` followed for ever. Each is a storage error naming the trial (exit 2, kind ``storage``)."""
    from tensortap.cli import main

    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(3))
    if who == "list only":
        proxy.failing_paths = f"/{s3_url.removeprefix('s3://')}/"  # the objects' requests, not the listings'
        proxy.failing_answer = (403, "AccessDenied", "Access Denied")
        options = _through(proxy, s3_options)
    else:
        options = {"anon": True, "client_kwargs": {"endpoint_url": s3_endpoint}}
    with pytest.raises(StorageUnreachable, match=f"^{s3_url}: access denied by "):
        tensortap.create_trial(s3_url, **options)
    flag = ["--storage-options", json.dumps(options)]
    assert main(["ls", s3_url, "--json", *flag]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["kind"] == "storage"
    codes: list[int] = []
    for command in (["check", s3_url], ["rules", s3_url, "--rule", "loss_not_decreasing", "--follow"]):
        _in_thread(lambda command=command: codes.append(main([*command, *flag])), limit=60)
        err = capsys.readouterr().err
        assert f"{s3_url}: access denied by" in err and "unreadable" not in err and "trying again" not in err, err
    assert codes == [2, 2]


def _train_loss(writer: Writer, steps: range) -> None:
    for step in steps:
        with writer.stepping():
            writer.save("losses/loss", np.float32(10.0 / (step + 1)), collections=["losses"])


class _Follower(threading.Thread):
    """``tensortap rules URL --rule RULE --follow --json`` on a thread; :attr:`codes` gets its exit status."""

    def __init__(self, url: str, options: dict[str, Any], rule: str = "loss_not_decreasing") -> None:
        super().__init__(daemon=True)
        self.command = ["rules", url, "--rule", rule, "--follow", "--json"]
        self.command += ["--storage-options", json.dumps(options)]
        self.codes: list[int] = []

    def run(self) -> None:
        from tensortap.cli import main

        self.codes.append(main(self.command))


def _follow(proxy: FaultyProxy, url: str, s3_options: dict[str, Any], rule: str = "loss_not_decreasing") -> _Follower:
    """A :class:`_Follower` of ``url`` through ``proxy`` judging by ``rule``, started, once it read a shard: its
    rules judge the training's steps (it opened the trial and built its rules, which a storage that fails ends at
    once)."""
    follower = _Follower(url, _through(proxy, s3_options), rule)
    follower.start()
    deadline = time.monotonic() + 60
    while not any("/shards/worker_0/" in p for _, p in proxy.seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    return follower


def test_rules_follow_rides_out_a_storage_that_fails_for_a_while(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 35 F4: ``rules --follow`` (the watcher that may stop the training) exited 2 at the first failed
    request of a store restart the training rode out, and judged nothing after. It warns once, looks again every
    poll, and once the storage answers judges every step to the training's end."""
    w = Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1))
    _train_loss(w, range(3))
    w.flush()
    follower = _follow(proxy, s3_url, s3_options, "loss_not_decreasing:num_steps=3")  # 8 steps judged
    proxy.failing_paths = "/"
    deadline = time.monotonic() + 60
    while not proxy.failed_paths and time.monotonic() < deadline:
        time.sleep(0.05)  # until it met the failing storage
    _train_loss(w, range(3, 8))
    w.close()
    while len(proxy.failed_paths) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # it looked again, and again
    proxy.failing_paths = ""
    follower.join(60)
    assert follower.codes == [0]
    out, err = capsys.readouterr()
    (rule,) = json.loads(out)["rules"]
    assert rule["evaluated_steps"] == 8 and rule["last_step"] == 7
    assert err.count("trying again every") == 1 and err.count("the storage answers again") == 1, err


def test_a_stop_request_the_storage_fails_to_take_is_written_once_it_answers(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """review 55: a rule that fired while the storage failed the write of its stop request (``rules --follow
    --stop-training``, riding out the outage) was reported as fired, but its action and its report were lost
    for good: the step counted as judged. The action is done again once the storage answers."""
    w = Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1))
    for _ in range(2):  # a loss that does not decrease: loss_not_decreasing fires at step 1, once
        with w.stepping():
            w.save("losses/loss", np.float32(1.0), collections=["losses"])
    w.flush()
    proxy.failing_paths = "/control/"
    follower = _Follower(s3_url, _through(proxy, s3_options))
    follower.command[3] = "loss_not_decreasing:num_steps=1"
    follower.command.append("--stop-training")
    follower.start()
    deadline = time.monotonic() + 60
    while not any("/control/" in p for _, p in proxy.failed_paths) and time.monotonic() < deadline:
        time.sleep(0.05)  # the rule fired: its stop request met the failing storage
    proxy.failing_paths = ""
    deadline = time.monotonic() + 60
    while (request := tensortap.create_trial(s3_url, **s3_options).stop_request()) is None:
        assert time.monotonic() < deadline, "the stop request was never written"
        time.sleep(0.1)
    w.close()
    follower.join(60)
    assert follower.codes == [1]
    assert request["rule"] == "LossNotDecreasing"
    out, err = capsys.readouterr()
    (rule,) = json.loads(out)["rules"]
    assert rule["fired_steps"] == [1], out
    assert err.count("trying again every") == 1, err


def test_rules_follow_gives_up_on_a_storage_that_keeps_failing(
    proxy: FaultyProxy,
    s3_options: dict[str, Any],
    s3_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hunt 35 F4: past ``FOLLOW_OUTAGE_SECONDS`` of failures, ``rules --follow`` exits 2 with the storage's
    error (kind ``storage``), after one warning."""
    import tensortap.cli_rules as cli_rules

    monkeypatch.setattr(cli_rules, "FOLLOW_OUTAGE_SECONDS", 1.0)
    w = Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1))
    _train_loss(w, range(3))
    w.flush()
    follower = _follow(proxy, s3_url, s3_options)
    proxy.failing_paths = "/"
    follower.join(60)
    w.close()
    assert follower.codes == [2]
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["kind"] == "storage"
    assert err.count("trying again every 0.2 s for up to 1 s") == 1, err


def test_an_overwrite_deletes_the_old_run_in_batches_and_its_end_marker_first(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """hunt 35 F6: ``if_exists="overwrite"`` deleted the old run one request a file (1,100 shards at 30 ms a
    request: 2,201 DELETEs, past the 60 s set-up bound: capture off, the new run saved nothing, the old run left
    reading as "closed" with no steps). Its index records and its shards now go in one ``DeleteObjects`` each
    (1,000 keys a request), after its end marker alone, checked gone by one listing each."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(30))
    with Writer(s3_url, storage_options=_through(proxy, s3_options), if_exists="overwrite") as w:
        train(w, range(2))
    assert not w.failed
    deletes = [(m, p) for m, p in proxy.seen if m == "DELETE" or (m == "POST" and "delete" in p)]
    assert len(deletes) == 3, deletes  # before: 61
    assert deletes[0][0] == "DELETE" and deletes[0][1].split("?")[0].endswith("/end/worker_0.json")
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.steps() == [0, 1]
    assert trial.end_reasons() == {"worker_0": "closed"}
    assert trial.storage.list("shards/worker_0") == ["0000000000.h5"]
    assert trial.problems() == {}


def test_an_overwrite_given_up_half_way_leaves_a_run_that_did_not_end(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """hunt 35 F6: an overwrite that capture gave up half-way left the old run without its index records but
    with its end marker: it read as a run that ended normally with no steps. The end marker goes first now: the
    store holds the batch delete of the index records, and the old run reads as one that did not end."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as w:
        train(w, range(5))
    proxy.stalled_paths = "?delete"
    options = _through(proxy, s3_options)
    w = Writer(s3_url, storage_options=options, if_exists="overwrite", shard_policy=ShardPolicy(timeout=2))
    assert w.failed
    w.close()
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.steps() == list(range(5))
    assert trial.end_reasons() == {} and not trial.training_ended


def test_a_resumed_run_reads_its_index_records_at_once(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """hunt 35 F7: a hook given the ``run_id`` of a run read each of its index records in turn (1,100 shards at
    30 ms a request: past the 60 s bound, capture off). They are read several at once: the proxy holds each
    request for a record until eight are held together (one after the other, each waits 0.5 s alone)."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as first:
        train(first, range(20))
    proxy.meet("/index/", 8, timeout=0.5)
    with Writer(s3_url, storage_options=_through(proxy, s3_options), run_id=first.run_id) as w:
        train(w, range(20, 22))
    assert not w.failed and proxy.met == 8  # before: 1
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.steps() == list(range(22))
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_a_resume_that_fails_leaves_the_run_as_it_was(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str
) -> None:
    """hunt 35 F7: resuming a run removed its end marker before reading its index records: when the storage
    did not answer those reads, capture turned off and the run that had ended normally read as one that did not
    end. The end marker and the worker record are changed only once the records are read."""
    with Writer(s3_url, storage_options=s3_options, shard_policy=ShardPolicy(max_steps=1)) as first:
        train(first, range(3))
    proxy.stalled_paths = "/index/"
    options = _through(proxy, s3_options)
    w = Writer(s3_url, storage_options=options, run_id=first.run_id, shard_policy=ShardPolicy(timeout=2))
    assert w.failed
    w.close()
    trial = tensortap.create_trial(s3_url, **s3_options)
    assert trial.steps() == [0, 1, 2]
    assert trial.end_reasons() == {"worker_0": "closed"}


def test_an_s3_output_is_asked_for_once_by_the_command_line(
    proxy: FaultyProxy, s3_options: dict[str, Any], s3_url: str, tmp_path: Path
) -> None:
    """re-read 58 (of session 57's diff) A3: ``export``, ``plot`` and ``report -o s3://...`` checked the output
    before reading the trial, then ``export_table``/``save_plot``/``write_report`` checked it again: its storage
    was asked twice whether it was there (a HEAD and a listing each). Asked once; the Python API still checks."""
    from tensortap.cli import main
    from tensortap.trial.export import export_table

    with Writer(tmp_path / "run") as w:
        train(w, range(2))
    options = _through(proxy, s3_options)
    for command, name in (("export", "t.csv"), ("report", "r.html"), ("plot", "p.png")):
        url = f"{s3_url}/{name}"
        extra = ["w"] if command == "plot" else []
        assert main([command, str(tmp_path / "run"), *extra, "-o", url, "--storage-options", json.dumps(options)]) == 0
        assert proxy.seen.count(("HEAD", f"/{url.removeprefix('s3://')}")) == 1, command  # before: 2
    url = f"{s3_url}/api.csv"
    export_table(tensortap.create_trial(tmp_path / "run"), url, storage_options=options)
    assert proxy.seen.count(("HEAD", f"/{url.removeprefix('s3://')}")) == 1


def test_an_s3_output_the_storage_fails_to_take_is_an_error_naming_it(
    proxy: FaultyProxy,
    s3_endpoint: str,
    s3_options: dict[str, Any],
    s3_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """re-read 58 (of session 57's diff) A5a: an S3 output whose upload failed gave the client's error as it was:
    ``tensortap export: [Errno 121] injected`` (a request answered 500), naming no output, and one whose endpoint
    went away mid-write botocore's EndpointConnectionError, not an OSError (``unexpected error: ...``). The
    upload is the storage's (retried, bounded in time): a StorageUnreachable naming the output's folder (a
    warning names the object), exit 2."""
    from tensortap.cli import main
    from tensortap.trial.export import written_whole

    with Writer(tmp_path / "run") as w:
        train(w, range(2))
    url = f"{s3_url}/t.csv"
    proxy.failures = 100  # every PUT answered 500; the check of the output (HEAD, a listing) passes
    options = json.dumps(_through(proxy, s3_options))
    assert main(["export", str(tmp_path / "run"), "-o", url, "--storage-options", options]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"tensortap export: {s3_url}: the storage failed a request") and "Traceback" not in err
    assert f"uploading {url.removeprefix('s3://')} failed" in err[0]  # retried, naming the object
    relay = Relay(s3_endpoint)
    relay.up()
    with pytest.raises(StorageUnreachable, match=f"^{s3_url}: cannot connect to {relay.url}"):
        with written_whole(url, _through(relay, s3_options)) as file:
            file.write(b"a,b\n")
            relay.close()  # the endpoint goes away before the upload
    assert not _keys(s3_options, s3_url)
