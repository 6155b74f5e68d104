"""Storage endpoints that misbehave, on 127.0.0.1: one that never answers, and a faulty proxy to a real S3 server."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}


@contextmanager
def silent_endpoint() -> Iterator[str]:
    """Yield the URL of a TCP endpoint that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


class FaultyProxy:
    """An HTTP proxy in front of ``target`` (the moto S3 server) that fails or stalls requests on demand.

    Attributes
    ----------
    url
        Where clients connect.
    failures
        How many of the next PUT requests are answered ``500 InternalError`` instead of forwarded.
    failing_paths
        When not empty, every request whose path has it is answered :attr:`failing_answer`.
    failing_answer
        The HTTP status, S3 error code and message of those answers (``500 InternalError`` by default).
    failed_paths
        Each request answered so: its method and path, in order.
    stalled
        While set, new requests are accepted and never answered (until :meth:`close`).
    stalled_paths
        When not empty, new requests whose path has it are stalled likewise.
    held
        Each request stalled: its method and path, in order.
    met
        The most GET requests :meth:`meet` held at once.
    seen
        Each request forwarded: its method and path, in order.
    """

    def __init__(self, target: str) -> None:
        self.target = urlsplit(target)
        self.failures = 0
        self.failed = 0
        self.stalled = threading.Event()
        self.stalled_paths = ""
        self.failing_paths = ""
        self.failing_answer = (500, "InternalError", "injected")
        self.failed_paths: list[tuple[str, str]] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._meeting: tuple[str, int, float] | None = None
        self._held = self.met = 0
        self.seen: list[tuple[str, str]] = []
        self.held: list[tuple[str, str]] = []
        self._meet = threading.Condition()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.stalled.is_set() or (proxy.stalled_paths and proxy.stalled_paths in self.path):
                    with proxy._lock:
                        proxy.held.append((self.command, self.path))
                    proxy._released.wait()
                    self.close_connection = True
                    return
                if self.command == "GET" and proxy._meeting is not None and proxy._meeting[0] in self.path:
                    proxy._hold(*proxy._meeting[1:])
                failing = proxy.failing_paths and proxy.failing_paths in self.path
                if failing or (self.command == "PUT" and proxy._take_failure()):
                    status, code, message = proxy.failing_answer if failing else (500, "InternalError", "injected")
                    if failing:
                        with proxy._lock:
                            proxy.failed_paths.append((self.command, self.path))
                    error = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                with proxy._lock:
                    proxy.seen.append((self.command, self.path))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
                try:
                    conn.request(self.command, self.path, body, headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def meet(self, marker: str, count: int, timeout: float = 10.0) -> None:
        """Hold each GET request whose path has ``marker`` until ``count`` of them are held at once (then
        let them all go, and the next ones at once), or for ``timeout`` seconds at most; :attr:`met` starts
        again from 0."""
        with self._meet:
            self._meeting, self.met = (marker, count, timeout), 0

    def _hold(self, count: int, timeout: float) -> None:
        with self._meet:
            self._held += 1
            self.met = max(self.met, self._held)
            self._meet.notify_all()
            self._meet.wait_for(lambda: self.met >= count, timeout)
            self._held -= 1

    def _take_failure(self) -> bool:
        with self._lock:
            if self.failures <= 0:
                return False
            self.failures -= 1
            self.failed += 1
            return True

    def release(self) -> None:
        """Cut the requests held by a stall (their connections close: the client sends them again)."""
        self._released.set()

    def close(self) -> None:
        """Answer stalled requests (by closing them) and stop serving."""
        self.release()
        self.server.shutdown()
        self.server.server_close()
