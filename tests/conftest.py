"""Shared fixtures: trial directories, writer processes driven over stdin, and a real S3 API served by moto
on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HELPERS = Path(__file__).parent / "helpers"
S3_BUCKET = "tensortap-test"

# The tests compare captured values with NumPy's arithmetic: on a GPU, JAX's matrix products run in
# TensorFloat-32 unless asked for float32 (set before JAX is imported; children inherit it).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # pytest started by a shell's background job without job control (`cmd &` in a script) ignores
    # SIGINT, and so would every process the tests start; the tests send SIGINT as to a training in
    # the foreground, whose Python raises KeyboardInterrupt: give the processes they start that
    signal.signal(signal.SIGINT, signal.default_int_handler)


class WriterProc:
    """A ``tests/helpers/writer_proc.py`` process; :meth:`cmd` sends one command and waits for its answer."""

    def __init__(self, out_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPERS / "writer_proc.py"), str(out_dir), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        # stderr is drained all the time: a child whose stderr pipe is full blocks, and never exits
        self.errors: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        self.expect("ready", timeout=120.0)  # importing torch takes long on a loaded machine

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line)
        self.lines.put("")  # end of output

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.suppress(ValueError, OSError):  # closed at teardown
            for line in self.proc.stderr:
                self.errors.append(line)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """Wait for the next stdout line and check that it starts with ``prefix``."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line.startswith(prefix):
            self.proc.kill()
            self.proc.wait(timeout=10)
            self._stderr_reader.join(timeout=10)
            err = "".join(self.errors)
            raise AssertionError(f"writer answered {line!r}, expected {prefix!r}; stderr:\n{err}")
        return line

    def send(self, op: str, **kw: Any) -> None:
        """Send a command without waiting."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def cmd(self, op: str, **kw: Any) -> str:
        """Send a command and wait until the writer has done it."""
        self.send(op, **kw)
        return self.expect(f"ok {op}")

    def signal(self, sig: int) -> int:
        """Send ``sig`` and return the exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def wait(self) -> tuple[int, str]:
        """Close stdin, wait for the exit; return the status and stderr."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        status = self.proc.wait(timeout=30)
        self._stderr_reader.join(timeout=10)
        return status, "".join(self.errors)


@pytest.fixture
def writer_proc() -> Iterator[Any]:
    """Factory of :class:`WriterProc`; every process still running at teardown is killed."""
    procs: list[WriterProc] = []

    def start(out_dir: Path, *args: str) -> WriterProc:
        w = WriterProc(out_dir, *args)
        procs.append(w)
        return w

    yield start
    for w in procs:
        if w.proc.poll() is None:
            os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait(timeout=10)
        for stream in (w.proc.stdin, w.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(autouse=True, scope="session")
def shard_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Object-storage shards are cached in a folder of the test session, never in the user's cache."""
    folder = tmp_path_factory.mktemp("shard-cache")
    old = os.environ.get("TENSORTAP_CACHE_DIR")
    os.environ["TENSORTAP_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        del os.environ["TENSORTAP_CACHE_DIR"]
    else:
        os.environ["TENSORTAP_CACHE_DIR"] = old


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
