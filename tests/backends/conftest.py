"""Fixtures for the storage tests: a real S3 API served by moto on 127.0.0.1."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

S3_BUCKET = "tensortap-test"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server in a thread of this process (skips when moto or s3fs is missing)."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """storage_options for s3fs that reach the moto server, with a bucket created."""
    import s3fs

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(S3_BUCKET)
    return options


@pytest.fixture
def s3_url(s3_options: dict[str, Any]) -> str:
    """A fresh, empty prefix in the test bucket."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
