"""Remote storage that cannot be used (no connection, no credentials, not an S3 service) is said to be so,
with the endpoint named, and never reported as a missing trial."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import tensortap
from tensortap.capture import ShardPolicy, Writer
from tensortap.cli import main

pytestmark = pytest.mark.s3

# StorageUnreachable is a ConnectionError (and a TensortapError): the tests catch that, which the client's
# own errors (botocore's EndpointConnectionError, NoCredentialsError) were not
# one quick attempt per request: the tests wait for no retry
FAST = {"config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"total_max_attempts": 1}}}


def closed_port() -> int:
    """A local port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def answering_404() -> Iterator[str]:
    """An HTTP server that answers every request with 404 and an empty body (a wrong endpoint, a proxy)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _404(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _404

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def json_error(options: dict[str, Any], url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``tensortap ls URL --json``'s error object (exit 2), and the same message on stderr."""
    assert main(["ls", url, "--json", "--storage-options", json.dumps(options)]) == 2
    out, err = capsys.readouterr()
    error: dict[str, Any] = json.loads(out)["error"]
    assert error["message"] in err and error["kind"] == "storage"
    assert "no tensortap trial" not in err
    return error


def test_a_refused_connection_says_it_cannot_connect_to_the_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    """It printed "unexpected error: EndpointConnectionError(...)" after 14 s of retries."""
    pytest.importorskip("s3fs")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    url = f"s3://tensortap-test/{uuid.uuid4().hex}"
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}, **FAST}
    with pytest.raises(ConnectionError, match=f"{url}: cannot connect to {endpoint}"):
        tensortap.create_trial(url, **options)
    assert f"cannot connect to {endpoint}" in json_error(options, url, capsys)["message"]


def test_a_capture_that_cannot_connect_says_so_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Training goes on without capture; the one error names the endpoint. It came with a 40-line chained
    traceback (ConnectionRefusedError, ClientConnectorError, EndpointConnectionError) for this expected
    condition."""
    pytest.importorskip("s3fs")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}, **FAST}
    caplog.set_level(logging.ERROR, logger="tensortap")
    # refused at once: the bound only has to outlast a busy host's setup (2 s did not, in a CI run)
    writer = Writer(
        f"s3://tensortap-test/{uuid.uuid4().hex}", storage_options=options, shard_policy=ShardPolicy(timeout=20)
    )
    writer.close()
    assert writer.failed
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"cannot connect to {endpoint}" in error.getMessage() and "capture is disabled" in error.getMessage()
    assert error.exc_info is None


def test_no_credentials_says_so(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "unexpected error: NoCredentialsError(...)"."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    url = f"s3://tensortap-test/{uuid.uuid4().hex}"
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, **FAST}
    with pytest.raises(ConnectionError, match=f"no credentials to sign requests to {s3_endpoint}"):
        tensortap.create_trial(url, **options)
    assert "give key and secret" in json_error(options, url, capsys)["message"]


def test_an_endpoint_that_is_not_the_storage_is_not_a_missing_trial(
    s3_options: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """An endpoint answering 404 with no S3 error (here a plain HTTP server; in the audit a proxy in front of
    an unreachable address) was reported as "no tensortap trial ... nothing exists there". A missing bucket
    of a real S3 service is still a missing trial."""
    pytest.importorskip("s3fs")
    url = f"s3://tensortap-test/{uuid.uuid4().hex}"
    with answering_404() as endpoint:
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}, **FAST}
        with pytest.raises(ConnectionError, match="answered a listing with HTTP 404 and no S3 error"):
            tensortap.create_trial(url, **options)
        assert endpoint in json_error(options, url, capsys)["message"]
    for missing in (url, f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"):
        with pytest.raises(tensortap.TrialNotFound, match="nothing exists there"):
            tensortap.create_trial(missing, **s3_options)
