"""Running a function on a shard in a child process with a time limit.

A corrupt HDF5 structure can make HDF5 loop forever (ignoring Ctrl-C), so
reading a file nobody vouches for in full (``tensortap check``), or reading
the parts of a format-1 shard that HDF5 does not checksum, happens in a
child process that is killed when it takes too long. The child is a plain
``python -c`` subprocess, not :mod:`multiprocessing`, so that a user's script
is never imported again in it. It imports only what the task names.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from typing import Any

START_SECONDS = 120.0
"""Time allowed for a child to start (import NumPy and h5py) on a loaded machine."""
IN_CHILD = False
"""True in a child process, whose time limit already bounds what it reads."""


class ChildFailed(Exception):
    """The child did not answer: it took longer than its time limit, or it died."""


def serve(task: str, idle: float | None, keep_on_signals: bool = False) -> None:
    """The child process: for each JSON line ``[arguments...]`` on stdin, the JSON result of ``task(*arguments)``.

    ``task`` is ``"module:function"``. Writes ``"ready"`` once the task is imported. Exits when
    stdin closes, or after ``idle`` seconds without a request. ``keep_on_signals``: ignore SIGINT and
    SIGTERM (see :class:`ShardChild`).
    """
    global IN_CHILD
    IN_CHILD = True
    if keep_on_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    module, name = task.split(":")
    function = getattr(importlib.import_module(module), name)
    sys.stdout.write('"ready"\n')
    sys.stdout.flush()
    while idle is None or select.select([sys.stdin], [], [], idle)[0]:
        line = sys.stdin.readline()
        if not line:
            return
        sys.stdout.write(json.dumps(function(*json.loads(line))) + "\n")
        sys.stdout.flush()


class ShardChild:
    """A child process that runs ``task`` on one shard at a time, replaced when one takes too long.

    Parameters
    ----------
    task
        ``"module:function"``: a function of JSON arguments with a JSON result.
    timeout
        Seconds one call may take; past it, the child is killed and :class:`ChildFailed` raised.
    idle
        Seconds after which an unused child exits by itself (None: it lives until :meth:`close`).
    keep_on_signals
        The child runs in a session of its own and ignores SIGINT and SIGTERM: a terminal's Ctrl-C, a
        notebook's "interrupt" or a job's end sends them to every process of the group, while its
        parent may catch them and go on (before, one that came while the child was still importing
        ended it); it still ends when its parent closes it or exits. Only for a task that cannot loop
        forever (not reading an untrusted file), since nothing but its parent would then end it.
    """

    def __init__(self, task: str, timeout: float, idle: float | None = None, keep_on_signals: bool = False) -> None:
        self.task = task
        self.timeout = timeout
        self.idle = idle
        self.keep_on_signals = keep_on_signals
        self._proc: subprocess.Popen[str] | None = None
        self._answers: queue.Queue[str] = queue.Queue()
        self._ended = False  # by end(): no child starts again
        self._starting = threading.Lock()  # a child started is seen by end(), in any thread

    @property
    def alive(self) -> bool:
        """Whether the child runs now."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc is not None and self.alive else None

    def start(self) -> None:
        """Start the child now, if it does not run; :class:`ChildFailed` if it does not start."""
        if not self.alive:
            self.close()
            self._start()

    def _start(self) -> None:
        with self._starting:
            if self._ended:
                raise ChildFailed("ended: no process reads it any more")
            proc = subprocess.Popen(
                [sys.executable, "-c", _child_code(self.task, self.idle, self.keep_on_signals)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # HDF5's diagnostics of a corrupt file: the answer says what is wrong
                text=True,
                start_new_session=self.keep_on_signals,  # out of the group a Ctrl-C reaches, from its first instant
            )
            answers: queue.Queue[str] = queue.Queue()
            threading.Thread(target=_pump, args=(proc, answers), daemon=True).start()
            self._proc, self._answers = proc, answers
        try:
            ready = answers.get(timeout=START_SECONDS)
        except queue.Empty:
            self.close()
            raise ChildFailed(f"the process that reads it did not start within {START_SECONDS:g} s") from None
        if not ready:
            status = proc.wait()
            self.close()
            raise ChildFailed(f"the process that reads it ended as it started (exit status {status})")

    def ask(self, *arguments: Any) -> Any:
        """``task(*arguments)``, computed in the child; :class:`ChildFailed` if it hangs or dies."""
        for attempt in range(2):
            self.start()
            proc = self._proc
            assert proc is not None and proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(arguments) + "\n")
                proc.stdin.flush()
                answer = self._answers.get(timeout=self.timeout)
            except queue.Empty:
                self.close()
                raise ChildFailed(
                    f"reading it did not finish within {self.timeout:g} s (corrupt HDF5 structure)"
                ) from None
            except OSError:
                answer = ""
            if answer:
                return json.loads(answer)
            idle_exit = proc.wait() == 0  # it exited on its own, being idle, as the request arrived
            self.close()
            if not idle_exit or attempt:
                break
        raise ChildFailed("reading it killed the process that read it")

    def end(self) -> None:
        """End the child for good, from any thread: a call of :meth:`ask` that waits for it in another
        thread raises :class:`ChildFailed` at once, and no call starts a child again."""
        with self._starting:
            self._ended = True
            self.close()

    def close(self) -> None:
        """End the child, if one runs."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._proc = None


def _child_code(task: str, idle: float | None, keep_on_signals: bool) -> str:
    """The ``python -c`` code of a child running ``task``.

    The child keeps its own path (the standard library, then the site packages) and adds after it
    the folders this process has and it lacks: the one tensortap was imported from, a script's
    folder, ones added at run time; the working directory not at all. On the command line or in
    ``PYTHONPATH`` they would come before the standard library, where a user's module named like
    a standard one (a ``types.py`` beside the training script) would stop the child as it starts.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ours = [package_root, *(p for p in sys.path if isinstance(p, str) and p)]
    return (
        f"import sys; sys.path[:] = [p for p in sys.path if p]; "
        f"sys.path += [p for p in {ours!r} if p not in sys.path]; "
        f"from tensortap.backends.isolated import serve; serve({task!r}, {idle!r}, {keep_on_signals!r})"
    )


def _pump(proc: subprocess.Popen[str], answers: queue.Queue[str]) -> None:
    """Move the child's answer lines into ``answers``; an empty string once it has ended."""
    assert proc.stdout is not None
    with contextlib.suppress(ValueError, OSError):  # closed by close()
        for line in proc.stdout:
            answers.put(line)
    answers.put("")
