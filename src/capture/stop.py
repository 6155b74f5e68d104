"""The stop channel: how a rule (or a person) asks a training to stop, and how ranks agree.

A stop request is one small JSON file in the trial (``control/stop.json``,
written by :meth:`tensortap.Trial.request_stop` or an in-process rule).
Training processes poll it, at most once per ``poll_seconds``, through one
:class:`StopChannel`. Under data parallelism every rank must leave at the
same step (one rank alone would leave the others waiting in their next
collective), so ranks :func:`agree` with one all-reduce that each adapter
supplies from its framework (``torch.distributed``, a Keras backend's
collective, ...); no framework is imported here.

Interface::

    channel = StopChannel(storage, resumed=False)             # resumed: the request left is ignored
    channel.request("loss exploded", rule="ExplodingTensor")   # write + see it at once
    channel.poll(poll_seconds=1.0) -> bool                     # rate-limited look
    channel.reason -> str | None
    log_stop(channel.reason, "fit")                           # the line an adapter logs when it stops
    agree(channel.poll(), all_reduce_max) -> bool              # any rank asked => all stop
    agreed(step, every=10, channel, poll_seconds, all_reduce_max=...) -> bool  # agree every 10 steps
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..backends import layout

logger = logging.getLogger("tensortap")

STOP_POLL_SECONDS = 1.0

AllReduceMax = Callable[[int], int]
"""Takes this rank's flag (0 or 1), returns the maximum over every rank (blocking collective)."""


class _JsonStorage(Protocol):
    is_local: bool
    url: str

    def write_json(self, key: str, obj: Any) -> None: ...

    def read_json(self, key: str) -> Any: ...

    def exists(self, key: str) -> bool: ...


class StopChannel:
    """Writes and reads the stop request of one trial.

    Parameters
    ----------
    storage
        The trial's storage (anything with ``write_json``, ``read_json``, ``exists``, ``is_local`` and ``url``).
    resumed
        Whether the run was resumed (a hook given ``run_id=``): the request in the trial now, if any, was
        left by the run before and does not stop this one; it is ignored, with one warning naming it. A
        request written since (another one: each holds the time it was written) stops it.
    """

    def __init__(self, storage: _JsonStorage, resumed: bool = False) -> None:
        self.storage = storage
        self._left = self._read() if resumed else None  # the request the run before left
        self._warned_left = False
        self._checked = float("-inf")
        self._request: dict[str, Any] | None = None
        self._looking: threading.Thread | None = None  # remote storage: the look in progress

    def request(self, reason: str, **details: Any) -> None:
        """Write a stop request into the trial; :meth:`poll` is true from now on in this process.

        Where the trial does not take it (an error of its storage, or no answer), this process stops all
        the same, with a warning: other processes that read the trial do not see it.
        """
        request = {"reason": reason, "time": time.time(), **details}
        self._request = request
        try:
            self.storage.write_json(layout.STOP_REQUEST, request)
        except OSError as exc:  # TimeoutError too
            logger.warning(
                "tensortap: the stop request (%s) could not be written into %s: %s; this training stops, "
                "other processes reading the trial do not see the request",
                reason,
                self.storage.url,
                exc,
            )

    def poll(self, poll_seconds: float = STOP_POLL_SECONDS) -> bool:
        """Whether a stop was requested; looks into the trial at most once per ``poll_seconds``.

        On remote storage the look (a round trip or two) runs on a daemon thread, one at a time, and
        what it finds is answered by the polls after it: the training thread that polls never waits
        for the store (64 ms a poll, once a second, with 50 ms a request; up to
        :data:`~tensortap.backends.storage.ANSWER_SECONDS` where it does not answer). An unreadable or
        half-written request is retried at the next look.
        """
        if self._request is None and time.monotonic() - self._checked >= poll_seconds:
            if self.storage.is_local:
                self._checked = time.monotonic()
                self._look()
            elif self._looking is None or not self._looking.is_alive():
                self._checked = time.monotonic()
                self._looking = threading.Thread(target=self._look, name="tensortap-stop-poll", daemon=True)
                self._looking.start()
        return self._request is not None

    def _read(self) -> dict[str, Any] | None:
        """The stop request in the trial, or None (none, or unreadable: retried at the next look)."""
        try:
            if self.storage.exists(layout.STOP_REQUEST):
                found = self.storage.read_json(layout.STOP_REQUEST)
                return found if isinstance(found, dict) else {"reason": str(found)}
        except (OSError, ValueError):
            pass
        return None

    def _look(self) -> None:
        """Read the stop request, if there is one and it is not the one the run before left."""
        request = self._read()
        if request is None or request != self._left:
            self._request = request
        elif not self._warned_left:
            self._warned_left = True
            logger.warning(
                "tensortap: the stop request in %s (%s) is ignored: it was left by the run before, there when this "
                "training resumed the run; a request written from now on stops it",
                self.storage.url,
                request.get("reason", ""),
            )

    @property
    def requested(self) -> bool:
        """Whether a request was seen (no look into the trial)."""
        return self._request is not None

    @property
    def reason(self) -> str | None:
        """The reason of the request seen, or None."""
        return None if self._request is None else str(self._request.get("reason", ""))


def log_stop(reason: str | None, what: str) -> None:
    """Log that a stop request ends ``what`` (``"fit"``, ``"training"``); ``reason`` None: seen by another rank."""
    logger.info("tensortap: stop requested (%s); stopping %s", reason or "on another process", what)


def agree(flag: bool, all_reduce_max: AllReduceMax | None) -> bool:
    """True on every rank when ``flag`` is true on any rank.

    Parameters
    ----------
    flag
        This rank's answer.
    all_reduce_max
        The framework's all-reduce (maximum of one integer over every rank), or None
        when the process is alone.
    """
    if all_reduce_max is None:
        return flag
    return bool(all_reduce_max(1 if flag else 0))


def agreed(
    step: int, every: int, channel: StopChannel, poll_seconds: float, all_reduce_max: AllReduceMax | None
) -> bool:
    """Whether to stop after ``step``; every rank gets the same answer at the same step.

    Alone, ``channel.poll(poll_seconds)`` decides at every step. With several ranks they
    :func:`agree` every ``every`` steps only (an all-reduce per step would cost too much);
    a rank that stops on a request another rank saw first looks into the trial at once,
    so that the request (its reason, the end reason ``stop_request``) is its own too.
    """
    if all_reduce_max is None:
        return channel.poll(poll_seconds)
    if step % max(int(every), 1):
        return False
    if not agree(channel.poll(poll_seconds), all_reduce_max):
        return False
    channel.poll(0)  # nothing to do where this rank saw it already
    return True
