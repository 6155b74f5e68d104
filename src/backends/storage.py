"""Storage backends: where shard files and small JSON records live.

A backend stores whole files under string keys relative to the trial root
(``"shards/worker_0/0000000001.h5"``). Writes are atomic: a reader sees a
file whole or not at all. Names starting with ``"."`` are temporary files of
writes in progress; listings never return them. Two implementations ship:
:class:`LocalStorage` (a directory; temp file, fsync, ``os.replace``) and
:class:`FsspecStorage` (any fsspec URL; whole-object uploads to object
stores, upload-then-rename elsewhere; reads through a local cache).
``docs/storage.md`` describes the guarantees and how to write a plugin.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import stat
import sys
import tempfile
import time
import types
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from glob import has_magic  # what fsspec takes for a glob pattern
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from ..exceptions import StorageUnreachable
from .layout import check_key

Keys = list[str]  # an alias: inside Storage classes, ``list`` names the method
Records = list[Any]  # JSON records, or the error reading or parsing each (Storage.read_json_many)
Contents = list[bytes | BaseException]  # files read, or the error reading each (FsspecStorage._cat)

MAX_JSON_BYTES = 64 << 20
"""Largest JSON record a reader parses (an index record of 100,000 tensors is about 20 MB)."""
CACHE_DIR_ENV = "TENSORTAP_CACHE_DIR"
CACHE_BYTES_ENV = "TENSORTAP_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 10 << 30

VERSION_FIELDS = ("ETag", "etag", "mtime", "LastModified", "created")
"""Fields of an fsspec file's metadata (an ``ls`` entry, ``info()``) that change when it is written again,
in order of preference: the object stores' ETag, a modification or creation time."""

# fsspec protocols whose uploads appear whole or not at all: an object is
# only visible once its single PUT (or multipart upload) completes.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})


ANSWER_SECONDS = 60.0
"""How long a call to an asynchronous fsspec filesystem (the object stores: s3fs, gcsfs, adlfs) may take,
its requests and their retries included, before its requests are cancelled and it raises TimeoutError;
a call that moves bytes is given a second more for each :data:`SLOWEST_RATE` of them. Without it, s3fs's
retries of botocore's timeouts held a listing of an endpoint that accepts connections and never answers
for 416 s, and a read of a shard's metadata for 406 s."""
SLOWEST_RATE = 128 << 10
"""Bytes a second (1 Mbit/s) below which a transfer to or from an object store is taken for one that does not
answer: a shard of 256 MB is given 34 minutes (and s3fs's own timeouts end a transfer that stops before)."""

# Retries of a failed write to a remote backend (:func:`retried`): attempts in all where no caller bounds
# them, and the first pause (doubled each time, with jitter). Under a bound (:class:`Bound`: the writer's
# storage jobs, bounded by ShardPolicy.timeout) they go on until the bound, pauses at most RETRY_PAUSE_CAP.
WRITE_ATTEMPTS = 4
FIRST_RETRY_PAUSE = 0.2
RETRY_PAUSE_CAP = 2.0

# Errors that another attempt cannot cure: retrying them only delays the report.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
    TypeError,
)

_T = TypeVar("_T")
logger = logging.getLogger("tensortap")

STORAGE_FAILURES: tuple[type[BaseException], ...] = (TimeoutError, StorageUnreachable)
"""Errors that say the storage failed, not the file asked for: a reader raises them, never takes the file for a
damaged or missing one (the file may be sound; the next read asks again)."""

# Client errors (class names, of botocore and aiohttp: neither is imported here) that say the storage was
# not reached, and those that say there were no credentials to sign a request with.
CONNECTION_ERRORS = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError"}
)
CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"})
# S3 error codes (of the client error a filesystem's error was translated from) that say the storage refused the
# request's credentials or their permissions: a wrong key or signature, an expired token, no right to the object
# ("403": the code of a HEAD answered 403, which has no body)
DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "403",
    }
)


def _class_names(exc: BaseException) -> set[str]:
    """The names of the class of ``exc`` and of its bases (client errors are told apart by name: neither
    botocore nor aiohttp is imported here)."""
    return {cls.__name__ for cls in type(exc).__mro__}


def _denied(exc: BaseException) -> str | None:
    """The S3 error code (one of :data:`DENIED_CODES`) of the client error ``exc`` is, or was translated from
    (its causes), or None: the storage refused the credentials."""
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code"))
            return code if code in DENIED_CODES else None
        cause = cause.__cause__
    return None


def unreachable(exc: BaseException, url: str, endpoint: str | None) -> StorageUnreachable | None:
    """The :class:`~tensortap.exceptions.StorageUnreachable` that ``exc`` (raised by an fsspec call on
    ``url``) means, or None when it is another error.

    Parameters
    ----------
    exc
        The client's error.
    url
        The trial's URL.
    endpoint
        The endpoint given in the storage options (None: the client's default).

    Returns
    -------
    StorageUnreachable or None
        ``cannot connect to ENDPOINT``, ``no credentials`` or ``access denied`` (credentials the storage
        refused, or that may not do what was asked), with the client's error.
    """
    names = _class_names(exc)
    where = endpoint or "the storage's endpoint"
    if names & CREDENTIAL_ERRORS:
        return StorageUnreachable(
            f"{url}: no credentials to sign requests to {where}: give key and secret in --storage-options "
            f"(or the client's environment variables, e.g. AWS_ACCESS_KEY_ID) ({type(exc).__name__}: {exc})"
        )
    code = _denied(exc)
    if code is not None:
        return StorageUnreachable(
            f"{url}: access denied by {where} ({code}: {exc}): check the credentials (--storage-options, or the "
            "client's environment variables, e.g. AWS_ACCESS_KEY_ID) and their permissions on the trial"
        )
    if names & CONNECTION_ERRORS or isinstance(exc, ConnectionRefusedError | ConnectionResetError):
        return StorageUnreachable(f"{url}: cannot connect to {where} ({type(exc).__name__}: {exc})")
    return None


def not_the_storage(exc: FileNotFoundError) -> bool:
    """Whether a listing's FileNotFoundError came from an HTTP 404 that carries no S3 error code (an S3
    service answers a listing of a missing bucket with ``NoSuchBucket``): something else answered."""
    response = getattr(exc.__cause__, "response", None)
    return isinstance(response, dict) and str(response.get("Error", {}).get("Code")) == "404"


def permanent(exc: BaseException) -> bool:
    """Whether no other attempt can cure ``exc``: one of :data:`PERMANENT_ERRORS`, no credentials to sign
    requests with, or credentials the storage refused (the client's error, or the
    :class:`~tensortap.exceptions.StorageUnreachable` that says so)."""
    return (
        isinstance(exc, PERMANENT_ERRORS)
        or any(e is not None and bool(_class_names(e) & CREDENTIAL_ERRORS) for e in (exc, exc.__cause__))
        or _denied(exc) is not None
    )


class Bound:
    """How long the storage calls of a caller that waits for them at most so long (the writer, for
    ``ShardPolicy.timeout``) may retry transient errors, and whether it stopped waiting. Given to the calls
    of one thread by :func:`bounded`; :func:`retried` follows it.

    Parameters
    ----------
    seconds
        From now, how long transient errors are retried: the last attempt starts then at the latest (the
        pause before it shortened to end there).
    stopped
        Whether the caller stopped waiting: from then on no call starts (:meth:`check`), so nothing is
        written after the caller took the storage for gone (capture turned off; another run may own the
        worker by then). A request in flight is not recalled.
    """

    __slots__ = ("_stopped", "until")

    def __init__(self, seconds: float, stopped: Callable[[], bool]) -> None:
        self.until = time.monotonic() + seconds
        self._stopped = stopped

    def left(self) -> float:
        """Seconds until the bound (negative once past it)."""
        return self.until - time.monotonic()

    def check(self, what: str) -> None:
        """Raise TimeoutError, naming ``what``, if the caller stopped waiting: ``what`` must not start."""
        if self._stopped():
            raise TimeoutError(f"{what}: not started: its caller stopped waiting for the storage")


_BOUND: contextvars.ContextVar[Bound | None] = contextvars.ContextVar("tensortap_storage_bound", default=None)


@contextlib.contextmanager
def bounded(bound: Bound) -> Iterator[Bound]:
    """Within, the :func:`retried` storage calls of this thread retry transient errors until ``bound`` (rather
    than :data:`WRITE_ATTEMPTS` attempts), and none starts once its caller stopped waiting."""
    token = _BOUND.set(bound)
    try:
        yield bound
    finally:
        _BOUND.reset(token)


_ANSWER_BY: contextvars.ContextVar[float | None] = contextvars.ContextVar("tensortap_answer_by", default=None)


@contextlib.contextmanager
def answer_by(deadline: float | None) -> Iterator[None]:
    """Within, each call to an asynchronous fsspec filesystem (the object stores) made in this context is given
    no more than the time left until ``deadline`` (a ``time.monotonic()``; None: no bound), rather than
    :data:`ANSWER_SECONDS`: for a reader that waits no longer (``wait_for_steps(timeout=)``). Threads that make
    calls for it run in a copy of its context (:func:`~tensortap.trial.index.at_once`)."""
    token = _ANSWER_BY.set(deadline)
    try:
        yield
    finally:
        _ANSWER_BY.reset(token)


def retried(what: str, fn: Callable[[], _T], attempts: int = WRITE_ATTEMPTS, pause: float = FIRST_RETRY_PAUSE) -> _T:
    """Return ``fn()``, calling it again after a transient error.

    The pauses double from ``pause`` up to :data:`RETRY_PAUSE_CAP`, each times a random factor between 0.5
    and 1.5. Under a :class:`Bound` (:func:`bounded`: the writer's storage jobs) ``fn`` is called again until
    the bound (the last pause shortened to end there), and not at all once the caller stopped waiting
    (TimeoutError); elsewhere (readers, the command line) ``attempts`` times at most. Errors no attempt can
    cure (:func:`permanent`) are raised at once; the last transient error once no attempt is left.

    Logged through the ``tensortap`` logger, with ``what``: the first failure and, after a retry, the answer
    (a result, or an error no attempt can cure) or the giving up (warnings, with the attempts made and the
    time since the first failure); each failure between at debug level.
    """
    bound = _BOUND.get()
    attempt, first_failure = 0, 0.0
    while True:
        attempt += 1
        if bound is not None:
            bound.check(what)
        try:
            result = fn()
        except Exception as exc:
            if permanent(exc):  # an answer (a missing file, ...): after failures, the storage is back
                if attempt > 1:
                    _log_recovery(what, attempt, first_failure)
                raise
            if attempt == 1:
                first_failure = time.monotonic()
            wait = min(pause * 2 ** (attempt - 1), RETRY_PAUSE_CAP) * (0.5 + random.random())
            if bound is None:
                again = attempt < attempts
            else:  # the last attempt at the bound, at the latest
                left = bound.left()
                again, wait = left > 0, min(wait, left)
            error = f"{type(exc).__name__}: {exc}"
            if attempt == 1 and again:
                more = f"for up to {bound.left():.1f} s" if bound is not None else f"up to {attempts - 1} times"
                logger.warning("tensortap: %s failed (%s); retrying %s", what, error, more)
            elif again:
                logger.debug("tensortap: %s failed again at attempt %d (%s)", what, attempt, error)
            elif attempt > 1:
                logger.warning(
                    "tensortap: %s failed at attempt %d, %.1f s after its first failure; giving up (%s)",
                    what,
                    attempt,
                    time.monotonic() - first_failure,
                    error,
                )
            if not again:
                raise
            time.sleep(wait)
        else:
            if attempt > 1:
                _log_recovery(what, attempt, first_failure)
            return result


def _log_recovery(what: str, attempt: int, first_failure: float) -> None:
    """Say that ``what`` got an answer at ``attempt``, after failures since ``first_failure`` (``time.monotonic()``)."""
    logger.warning(
        "tensortap: %s: the storage answered at attempt %d, %.1f s after the first failure",
        what,
        attempt,
        time.monotonic() - first_failure,
    )


def pread_exactly(fd: int, out: memoryview, start: int) -> bool:
    """Fill ``out`` with the bytes of ``fd`` from ``start`` (``os.preadv``, which releases the GIL);
    False if the file ends first."""
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done:]], start + done)
        if not got:
            return False
        done += got
    return True


class RangedFile(Protocol):
    """A file of a trial open to read byte ranges of it (:meth:`Storage.open_ranges`): its size, then
    only the bytes asked for."""

    size: int

    def read_into(self, parts: Sequence[tuple[int, memoryview]]) -> bool:
        """Fill each ``out`` of ``parts`` with the bytes from its ``start`` (``(start, out)`` pairs, in
        ascending order of ``start``); False if the file ends first."""

    def close(self) -> None:
        """Let the file go."""


RANGE_GAP = 1 << 20
"""Bytes between two parts of a remote read that one request reads through rather than make two."""


def open_regular(path: str, follow: bool = True) -> int:
    """A descriptor of the regular file ``path``, opened without ever waiting (a FIFO put in its place
    would block an open for reading), through a link at its end only if ``follow``; :class:`NotInTrial`
    if it is not a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow else flags | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotInTrial(f"{path} is not a regular file")
    return fd


class LocalRanges:
    """An open local regular file (a descriptor from :func:`open_regular`) read by ranges
    (:class:`RangedFile`); it owns the descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    @classmethod
    def open(cls, path: str) -> LocalRanges:
        """The regular file ``path`` (:func:`open_regular`)."""
        return cls(open_regular(path))

    def read_into(self, parts: Sequence[tuple[int, memoryview]]) -> bool:
        return all(pread_exactly(self.fd, out, start) for start, out in parts)

    def close(self) -> None:
        os.close(self.fd)


def _parse_json(key: str, data: bytes) -> Any:
    """``data``, the content of ``key``, parsed; ValueError if it is not JSON, too large or too deep."""
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{key}: more than the {MAX_JSON_BYTES} bytes a JSON record may have")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{key}: JSON nested too deeply") from None


def object_version(info: dict[str, Any]) -> str | None:
    """What tells one content of a file from another written under its name since, from its fsspec metadata
    ``info``: the first of :data:`VERSION_FIELDS` it has, and its size; None when it has none of them."""
    version = next((info[k] for k in VERSION_FIELDS if k in info), None)
    return None if version is None else f"{version}\0{info.get('size')}"


class NotInTrial(OSError):
    """A file of a trial that must not be read: a link that leads outside the trial, a FIFO, a device."""


def is_hidden(key: str) -> bool:
    """Return whether any part of ``key`` starts with ``"."`` (a temporary file of a write in progress)."""
    return any(part.startswith(".") for part in key.split("/"))


class Storage(abc.ABC):
    """The interface every backend implements.

    Keys are ``/``-separated paths relative to the root, for example
    ``"index/worker_0/0000000000.json"``; ``""`` is the root itself. Every
    method raises :class:`~tensortap.backends.layout.UnsafeKey` (a
    ``ValueError``) for a key that could reach outside the root (absolute,
    ``..``, empty or hidden parts): keys may come from an untrusted trial.
    A remote store that does not answer raises TimeoutError, within a bound
    (readers pass it on and skip nothing for it; any other OSError of a
    shard's read skips that shard with a warning).

    Attributes
    ----------
    url
        The trial root as the user gave it.
    is_local
        True when keys are plain files that h5py can open in place.
    kept_bytes
        Bytes of downloaded files (:meth:`local_path`) kept at once before the least recently used
        go; None where there is no bound (local files, a private download folder).
    """

    url: str
    is_local: bool = False
    kept_bytes: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @abc.abstractmethod
    def exists(self, key: str = "") -> bool:
        """Return whether ``key`` (or the root, for ``""``) exists; never answers from a stale cache."""

    def is_file(self, key: str = "") -> bool:
        """Return whether ``key`` (or the root, for ``""``) is a file (on an object store: an object of that
        name, even where objects below the prefix ``key/`` exist too). This default, for a backend that does
        not tell: False."""
        return False

    @abc.abstractmethod
    def list(self, prefix: str) -> Keys:
        """Return the names of files directly under folder ``prefix`` (sorted, no hidden names; [] if none)."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str) -> Keys:
        """Return the names of folders directly under folder ``prefix`` (sorted, no hidden names; [] if none)."""

    def leads_outside(self, key: str) -> str | None:
        """Where ``key`` leads if it is a link out of the root (its real path), else None (a store without
        links: always None)."""
        return None

    def entries(self, prefix: str) -> tuple[Keys, Keys]:
        """Return what :meth:`list` and :meth:`list_dirs` return for ``prefix``, in one listing where the
        backend can (both built-in ones do; this default lists twice)."""
        return self.list(prefix), self.list_dirs(prefix)

    def listed_version(self, key: str) -> str | None:
        """What tells the content of file ``key`` from another written under its name since, as the last
        :meth:`list` (or :meth:`entries`) of its folder showed it (an object's ETag, a modification time), or
        as the file is now where no listing shows it (local files: one ``stat``); None when not known (then
        only reading the file again tells).

        A reader compares it between two refreshes to know whether a file it read was written again, and
        takes it before reading the file (a version taken after could stand for content written since the
        read). The default says None.
        """
        return None

    @abc.abstractmethod
    def walk(self) -> Keys:
        """Return every file key under the root, sorted, without hidden ones (for ``tensortap check``)."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the content of ``key``; FileNotFoundError if it does not exist."""

    def read_start(self, key: str, size: int) -> bytes:
        """Return the first ``size`` bytes of ``key`` (all of it if shorter); FileNotFoundError if it does not exist.

        The default reads the whole file (:meth:`read_bytes`); the built-in backends read no more than ``size``
        bytes (a stranger's sparse file may claim gigabytes and take none on disk).
        """
        return self.read_bytes(key)[:size]

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key`` with ``data``."""

    @abc.abstractmethod
    def publish_file(self, local_path: str, key: str) -> None:
        """Atomically move the finished local file ``local_path`` to ``key`` (``local_path`` is gone after)."""

    @abc.abstractmethod
    def local_path(self, key: str) -> str:
        """Return a local file path with the content of ``key``; FileNotFoundError if it does not exist.

        Remote backends return a downloaded copy, kept for later calls while the file is not written
        again (:class:`FsspecStorage` names its copies by the object's version).
        """

    @contextlib.contextmanager
    def one_view(self) -> Iterator[None]:
        """Within, a published file's metadata asked once may be kept (a reader reading many tensors from
        one view of the trial opens each shard once per tensor); the default keeps nothing."""
        yield

    def open_ranges(self, key: str) -> RangedFile:
        """Open ``key`` (an immutable key: a published shard) to read byte ranges of it.

        The default opens :meth:`local_path`; a remote backend may read only the ranges asked for.
        """
        return LocalRanges.open(self.local_path(key))

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove each of ``keys`` that exists, in no particular order: in as few requests as the backend can (on
        S3 one for up to 1,000 keys). A batch may pass over a key the store refused (s3fs does): a caller that
        must know lists again. The default deletes them one after the other."""
        for key in keys:
            self.delete(key)

    @abc.abstractmethod
    def makedirs(self) -> None:
        """Create the root if needed; raise OSError (e.g. PermissionError) if it cannot be written."""

    publishes_in_place = False
    """Whether :meth:`publish_file` renames a file built in :meth:`staging_dir` rather than copying it
    (the writer then starts writing a shard to disk while it builds it)."""

    def staging_dir(self) -> str:
        """Return a local directory in which the writer builds files before publishing them."""
        return tempfile.gettempdir()

    def read_json(self, key: str) -> Any:
        """Return the parsed JSON content of ``key``; ValueError if it is not JSON, too large or too deep."""
        return _parse_json(key, self.read_start(key, MAX_JSON_BYTES + 1))

    def read_json_many(self, keys: Sequence[str]) -> Records:
        """:meth:`read_json` of each of ``keys``, in order, and in place of a record that cannot be read
        or parsed, the OSError or ValueError it raised. Every key is checked before anything is read. A
        failure of the storage (:data:`STORAGE_FAILURES`: it says nothing of the records) is raised.

        The default reads them one after the other; a remote backend makes the requests at once.
        """
        for key in keys:
            check_key(key)
        out: Records = []
        for key in keys:
            try:
                out.append(self.read_json(key))
            except STORAGE_FAILURES:
                raise
            except (OSError, ValueError) as exc:
                out.append(exc)
        return out

    def write_json(self, key: str, obj: Any) -> None:
        """Atomically write ``obj`` as JSON to ``key``."""
        self.write_bytes(key, _json_bytes(obj))

    #: Whether :meth:`create_json` is exclusive even against a concurrent writer.
    exclusive_create: bool = False

    def create_json(self, key: str, obj: Any) -> bool:
        """Write ``obj`` as JSON to ``key`` unless ``key`` exists; return whether it was written.

        The default checks, then writes: two processes that call it at the same instant may
        both succeed (:attr:`exclusive_create` is False). Backends that can create a file
        exclusively override it (the writer's claim of a worker name relies on it).
        """
        if self.exists(key):
            return False
        self.write_json(key, obj)
        return True

    def child(self, name: str) -> Storage:
        """Return the storage of the folder ``name`` directly under the root (a run folder).

        Raises
        ------
        NotImplementedError
            When the backend cannot open a sub-folder (``if_exists="new_run"`` needs it).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot open the sub-folder {name!r} of {self.url}")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def drop_cached_pages(fd: int) -> None:
    """Drop the pages of ``fd``, written and synced, from the page cache (``POSIX_FADV_DONTNEED``).

    A shard is written once and read far less than it is written: left cached, gigabytes of shards
    would push out what the training reads (its data), and the next shard's writes would each take
    fresh memory from the kernel. Dropped, they reuse the pages just freed: an every-step shard is
    written in a fifth of the system time on the benchmark's virtual machine
    (``bench/profiles/torch.md``, session 15). Advisory: a system without it keeps the pages.
    """
    if hasattr(os, "posix_fadvise"):  # not on macOS or Windows
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``, so that
    no file another thread makes meanwhile gets a wrong mode); elsewhere set and set back at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _umask_mode(fd: int) -> None:
    """Give the open file ``fd`` the mode that ``open()`` gives a new file, ``0o666`` less the umask
    (``0o644`` under the usual ``022``), so that whoever may read the trial's folders may read its files.

    The files of a trial are made by :func:`tempfile.mkstemp` (then renamed into place, see
    :meth:`LocalStorage.publish_file`), which makes them ``0o600`` whatever the umask: another user, or
    a container of another uid on a shared volume, could list a trial but not read it. A filesystem that
    refuses modes (some network or FAT mounts) keeps its own: the file is written all the same.
    """
    if hasattr(os, "fchmod"):  # not on Windows before Python 3.13, whose files have no such mode
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666 & ~_umask())


def _temporary_file(dest: Path) -> tuple[int, str]:
    """A new temporary file beside ``dest`` (hidden: ``.NAME.*.tmp``), open for writing, with the mode of
    :func:`_umask_mode`: its descriptor and path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    _umask_mode(fd)
    return fd, tmp


def _not_a_file(path: str, mode: int) -> str:
    """What ``path``, of ``st_mode`` ``mode`` and no regular file, is: the end of a sentence naming it."""
    if stat.S_ISDIR(mode):
        try:
            os.scandir(path).close()
        except OSError as exc:
            return f"is a folder that cannot be listed ({exc.strerror}), not a regular file"
    return "is not a regular file (a FIFO, device or folder)"


def _is_dir_or_unknown(entry: os.DirEntry[str]) -> bool | None:
    """Whether ``entry`` is a folder (links followed); None if that cannot be told (a link loop)."""
    try:
        return entry.is_dir()
    except OSError:
        return None


class LocalStorage(Storage):
    """A trial in a local directory.

    Parameters
    ----------
    root
        The trial directory (created by :meth:`makedirs`).
    """

    is_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key) if key else self.root

    def _regular_file(self, key: str) -> str:
        """The path of ``key``, once sure it is a regular file inside the root (links may not leave it).

        Each part of ``key`` is looked at with ``lstat``: where none is a link, the file is inside the
        root's folder, whatever the root is, and its path is returned; where one is, its real path is
        returned once sure it is inside the root's.
        """
        here = str(self.root)
        for part in check_key(key).split("/"):
            here = os.path.join(here, part)
            mode = os.lstat(here).st_mode  # FileNotFoundError if missing
            if stat.S_ISLNK(mode):
                return self._linked_file(key)
        if not stat.S_ISREG(mode):
            raise NotInTrial(f"{self.url}: {key!r} {_not_a_file(here, mode)}")
        return here

    def _outside(self, path: str | Path) -> str | None:
        """The real path of ``path`` if it is not inside the root's, else None."""
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        return real if os.path.commonpath([real, root]) != root else None

    def leads_outside(self, key: str) -> str | None:
        path = self._path(key)
        return self._outside(path) if path.is_symlink() else None

    def _linked_file(self, key: str) -> str:
        """The real path of ``key``, a path through links, once sure it is a regular file inside the root."""
        real = os.path.realpath(self._path(key))
        if self._outside(real) is not None:
            raise NotInTrial(f"{self.url}: {key!r} is a link that leads outside the trial (to {real})")
        mode = os.stat(real).st_mode  # FileNotFoundError if missing
        if not stat.S_ISREG(mode):
            raise NotInTrial(f"{self.url}: {key!r} is not a regular file (a FIFO, device or folder)")
        return real

    def exists(self, key: str = "") -> bool:
        return self._path(key).exists()

    def is_file(self, key: str = "") -> bool:
        return self._path(key).is_file()

    def entries(self, prefix: str) -> tuple[Keys, Keys]:
        """The names of the files and of the folders under ``prefix``. One whose kind cannot be told (a
        link loop, a link through a folder that cannot be read) is in both, so that whoever reads it meets
        its error and says so, and the rest are listed; a folder that cannot be read raises its OSError
        (PermissionError), for the caller to say so."""
        try:
            with os.scandir(self._path(prefix)) as it:
                kinds = [(e.name, _is_dir_or_unknown(e)) for e in it if e.name[0] != "."]
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        return sorted(n for n, is_dir in kinds if is_dir is not True), sorted(
            n for n, is_dir in kinds if is_dir is not False
        )

    def list(self, prefix: str) -> Keys:
        return self.entries(prefix)[0]

    def list_dirs(self, prefix: str) -> Keys:
        return self.entries(prefix)[1]

    def listed_version(self, key: str) -> str | None:
        """The file's inode, size and modification time, from one ``stat`` (a listing shows none of them); None
        when it is not there. Every write makes a new file and renames it over the old one (:meth:`_atomic`),
        whose inode is in use until then: a file written again once has another inode, and one written again
        several times that got the first inode back has another modification time (or size)."""
        try:
            st = os.stat(os.path.join(self.root, check_key(key)))  # a str: cheaper than self._path
        except OSError:
            return None
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def walk(self) -> Keys:
        """Every key that is not a real folder: FIFOs, devices and links too, and folders that cannot be
        listed (no permission), so that ``check`` reports them."""
        if not self.root.is_dir():
            return []
        keys: Keys = []

        def unlisted(exc: OSError) -> None:
            if exc.filename is not None:
                keys.append(Path(exc.filename).relative_to(self.root).as_posix())

        for folder, dirs, files in os.walk(self.root, onerror=unlisted):  # never follows links to folders
            base = Path(folder).relative_to(self.root)
            links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
            keys.extend((base / name).as_posix() for name in [*files, *links])
        return sorted(k for k in keys if not is_hidden(k))

    def _open(self, key: str) -> int:
        """A descriptor of ``key``, checked by :meth:`_regular_file` and again once open (it may have
        been replaced since)."""
        return open_regular(self._regular_file(key), follow=False)

    def read_bytes(self, key: str) -> bytes:
        with os.fdopen(self._open(key), "rb") as f:
            return f.read()

    def read_start(self, key: str, size: int) -> bytes:
        with os.fdopen(self._open(key), "rb") as f:
            # read(size) allocates size bytes whatever the file holds: ask for no more than it holds, and a byte more
            return f.read(min(size, os.fstat(f.fileno()).st_size + 1))

    def open_ranges(self, key: str) -> RangedFile:
        return LocalRanges(self._open(key))

    def _in_folders(self, key: str, make: bool = True) -> Path:
        """The path of ``key`` to write or delete, once sure that no folder on the way is a link that leads
        outside the trial (:class:`NotInTrial`: a file written or deleted through it would be outside), the
        folders made where missing (``make``; else FileNotFoundError where one is missing)."""
        here = self.root
        if make:
            here.mkdir(parents=True, exist_ok=True)  # the root itself may be a link: the user named it
        for part in check_key(key).split("/")[:-1]:
            here = here / part
            try:
                mode = os.lstat(here).st_mode
            except FileNotFoundError:
                if not make:
                    raise
                here.mkdir(exist_ok=True)
                continue
            if stat.S_ISLNK(mode):
                if (real := self._outside(here)) is not None:
                    where = here.relative_to(self.root).as_posix()
                    raise NotInTrial(f"{self.url}: {where!r} is a link that leads outside the trial (to {real})")
            elif not stat.S_ISDIR(mode):
                raise NotInTrial(f"{self.url}: {here.relative_to(self.root).as_posix()!r} is not a folder")
        return self._path(key)

    def _atomic(self, key: str, write: Callable[[IO[bytes]], Any]) -> None:
        dest = self._in_folders(key)
        fd, tmp = _temporary_file(dest)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda f: f.write(data))

    def publish_file(self, local_path: str, key: str) -> None:
        dest = self._in_folders(key)
        if Path(local_path).parent == dest.parent:  # the writer stages next to the destination: rename
            with open(local_path, "rb+") as f:
                _umask_mode(f.fileno())  # made by tempfile.mkstemp (mode 0600), like the files of _atomic
                os.fsync(f.fileno())
                drop_cached_pages(f.fileno())
            os.replace(local_path, dest)
            return

        def copy(f: IO[bytes]) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)

        self._atomic(key, copy)
        os.unlink(local_path)

    exclusive_create = True

    def create_json(self, key: str, obj: Any) -> bool:
        """Exclusive: the finished file is hard-linked to ``key``, which fails if ``key`` exists."""
        dest = self._in_folders(key)
        fd, tmp = _temporary_file(dest)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_json_bytes(obj))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create, then write
                try:
                    with open(dest, "xb") as f:
                        f.write(_json_bytes(obj))
                except FileExistsError:
                    return False
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def child(self, name: str) -> Storage:
        return LocalStorage(self.root / name)

    def local_path(self, key: str) -> str:
        try:
            self._regular_file(key)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: no file {key!r}") from None
        return os.path.join(self.root, *key.split("/"))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # a folder on the way missing: nothing to delete
            self._in_folders(key, make=False).unlink(missing_ok=True)  # a link itself, never what it leads to

    def makedirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {self.root}")

    publishes_in_place = True

    def staging_dir(self) -> str:
        return str(self.root)


class FsspecStorage(Storage):
    """A trial at any fsspec URL (``s3://bucket/prefix``, ``memory://x``, ...).

    Object stores (:data:`OBJECT_STORE_PROTOCOLS`) get each file as one
    upload of a finished local file, which S3, GCS and Azure make visible
    whole or not at all. Other filesystems get an upload under a hidden
    temporary name followed by a move. Listings and :meth:`exists` bypass
    fsspec's listing cache, so files written by another process are seen at
    once. Files read through :meth:`local_path` (published shards) are kept
    in the persistent :class:`ShardCache` of the user's cache directory, so a
    second process does not download them again (``memory://`` and a disabled
    cache use a temporary directory that is removed when the storage is
    garbage-collected or the interpreter exits).

    Parameters
    ----------
    url
        The trial root.
    storage_options
        Passed to the fsspec filesystem (for s3fs: ``key``, ``secret``,
        ``client_kwargs={"endpoint_url": ...}``, ``anon``, ...).
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec
        from fsspec.asyn import AsyncFileSystem

        self.url = url
        self._options = storage_options  # for child()
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.whole_object_uploads = not OBJECT_STORE_PROTOCOLS.isdisjoint(protocols)
        self._asynchronous = isinstance(self.fs, AsyncFileSystem)
        self._tmp = tempfile.mkdtemp(prefix="tensortap-")
        self._cache = os.path.join(self._tmp, "cache")
        self._staging = os.path.join(self._tmp, "staging")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        self._cleanup.atexit = False  # at exit, _remove_temporary_dirs runs it after the writers closed
        _LIVE_FSSPEC.add(self)
        folder = None if "memory" in protocols else user_cache_dir()
        self.cache = None if folder is None else ShardCache(folder, cache_bytes())
        self.kept_bytes = None if self.cache is None else self.cache.max_bytes
        client = storage_options.get("client_kwargs") or {}
        endpoint = client.get("endpoint_url") or storage_options.get("endpoint_url")
        self._endpoint: str | None = endpoint
        self._identity = f"{url}\0{endpoint or ''}"
        self._listed: dict[str, int] = {}  # the size of each file (its path) in its folder's last listing
        self._versions: dict[str, str | None] = {}  # object_version of each file in its folder's last listing
        self._copies: dict[str, str] = {}  # key -> its copy in the private folder (without ShardCache)
        self._kept: dict[str, dict[str, Any]] | None = None  # _info of published files, inside one_view

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}" if key else self.root

    def _ask(self, method: str, *args: Any, moves: int = 0, limit: float | None = None, **kwargs: Any) -> Any:
        """``self.fs.<method>(*args, **kwargs)``; on an asynchronous filesystem (the object stores), given
        ``limit`` seconds (by default :data:`ANSWER_SECONDS` and a second for each :data:`SLOWEST_RATE` bytes
        it ``moves``; within :func:`answer_by`, no more than the time left), after which its requests are
        cancelled and it raises TimeoutError naming the storage. An error that says the storage failed, not
        the file, is raised as :class:`~tensortap.exceptions.StorageUnreachable` (:meth:`_failure`)."""
        call = getattr(self.fs, method)
        if not self._asynchronous:
            return call(*args, **kwargs)
        if limit is None:
            limit = ANSWER_SECONDS + moves / SLOWEST_RATE
        deadline = _ANSWER_BY.get()
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
        if limit <= 0:  # fsspec takes a timeout of 0 for none
            raise TimeoutError(f"{self.url}: no time was left to ask the storage ({method})")
        try:
            return call(*args, timeout=limit, **kwargs)  # fsspec's sync() takes it: asyncio.wait_for
        except (TimeoutError, asyncio.TimeoutError):  # fsspec's FSTimeoutError: not a TimeoutError on Python 3.10
            raise TimeoutError(f"{self.url}: the storage did not answer within {limit:.0f} s ({method})") from None
        except Exception as exc:
            failure = self._failure(method, exc)
            if failure is None:
                raise
            raise failure from exc

    def _failure(self, method: str, exc: BaseException) -> StorageUnreachable | None:
        """The :class:`~tensortap.exceptions.StorageUnreachable` that the error ``exc`` of a call of ``method``
        means (:func:`unreachable`, or a request the storage failed), or None: an answer about the file."""
        failure = unreachable(exc, self.url, self._endpoint)
        if failure is None and isinstance(exc, OSError) and not isinstance(exc, PERMANENT_ERRORS):
            # an HTTP 5xx, a reset, after the client's own retries: the object may be sound, a later request
            # may succeed (never taken for a damaged or missing file)
            failure = StorageUnreachable(f"{self.url}: the storage failed a request ({method}: {exc})")
        return failure

    # Reads are retried (:func:`retried`) only under a caller's bound (the writer's set-up); elsewhere they are
    # tried once: a reader raises what failed, and its next call asks again.
    def exists(self, key: str = "") -> bool:
        path = self._path(key)

        def ask() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self._ask("exists", path))

        return retried(f"looking for {path}", ask, attempts=1)

    def is_file(self, key: str = "") -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        try:
            return bool(self._ask("info", path).get("type") == "file")
        except FileNotFoundError:
            return False

    def _ls(self, path: str) -> Any:
        """``ls`` of ``path`` with details, asked again at once (twice at most) where it raises KeyError or
        RuntimeError: memory:// lists a dict that a concurrent write may change."""
        self.fs.invalidate_cache(path)
        for _ in range(2):
            with contextlib.suppress(KeyError, RuntimeError):
                return self._ask("ls", path, detail=True)
        return self._ask("ls", path, detail=True)

    def entries(self, prefix: str) -> tuple[Keys, Keys]:
        path = self._path(prefix)
        try:
            entries = retried(f"listing {path}", lambda: self._ls(path), attempts=1)
        except FileNotFoundError as exc:
            if not_the_storage(exc):
                raise StorageUnreachable(
                    f"{self.url}: {self._endpoint or 'the endpoint'} answered a listing with HTTP 404 and no "
                    "S3 error: it does not look like the storage (a wrong endpoint_url, or a proxy)"
                ) from exc
            return [], []
        except NotADirectoryError:
            return [], []
        for e in entries:
            if e.get("type") != "directory":
                self._versions[e["name"]] = object_version(e)
                if isinstance(e.get("size"), int):
                    self._listed[e["name"]] = e["size"]
        names = [(e["name"].rstrip("/").rsplit("/", 1)[-1], e.get("type") == "directory") for e in entries]
        names = [(n, is_dir) for n, is_dir in names if not n.startswith(".")]
        return sorted(n for n, is_dir in names if not is_dir), sorted(n for n, is_dir in names if is_dir)

    def list(self, prefix: str) -> Keys:
        return self.entries(prefix)[0]

    def list_dirs(self, prefix: str) -> Keys:
        return self.entries(prefix)[1]

    def listed_version(self, key: str) -> str | None:
        return self._versions.get(self._path(key))

    def walk(self) -> Keys:
        self.fs.invalidate_cache(self.root)
        try:
            found = self._ask("find", self.root)
        except FileNotFoundError:
            return []
        n = len(self.root) + 1
        return sorted(k for p in found if (k := p[n:]) and not is_hidden(k))

    def _cat(self, paths: Sequence[str], end: int | None) -> Contents:
        """The first ``end`` bytes (None: all) of each of ``paths``, one concurrent batch of requests
        (``cat_ranges``: no glob expansion of names), an exception in place of a file that fails; a failure
        of the storage for any of them (:meth:`_failure`) is raised.

        Each is one ranged GET from byte 0: without a range, s3fs asks every object's size first (a
        ``HEAD``, to split large downloads), which doubles the round trips of small records. An empty
        object has no byte 0 (S3 answers 416, each filesystem raises its own error): a file that fails
        other than missing, and that its folder's last listing did not show with bytes, is read again
        whole, in what is left of the time the first request was given (one read: one bound).
        """
        # explicit lists: fsspec 2023.1 repeats `starts` for a missing `ends` list
        limit = ANSWER_SECONDS + sum(min(self._listed.get(p, 0), end or MAX_JSON_BYTES) for p in paths) / SLOWEST_RATE
        start = time.monotonic()
        got: Contents = self._ask("cat_ranges", [*paths], [0] * len(paths), [end] * len(paths), limit=limit)
        again = [
            i
            for i, g in enumerate(got)
            if isinstance(g, Exception) and not isinstance(g, FileNotFoundError) and not self._listed.get(paths[i])
        ]
        if again:
            left = max(limit - (time.monotonic() - start), 0.0)
            whole = self._ask(
                "cat_ranges", [paths[i] for i in again], [None] * len(again), [None] * len(again), limit=left
            )
            for i, data in zip(again, whole, strict=True):
                got[i] = data
        for data in got:  # cat_ranges returns each file's error: none went through _ask's translation
            if isinstance(data, STORAGE_FAILURES):
                raise data
            if isinstance(data, Exception) and (failure := self._failure("cat_ranges", data)) is not None:
                raise failure from data
        return got

    def read_bytes(self, key: str) -> bytes:
        return self._read(key, None)

    def read_start(self, key: str, size: int) -> bytes:
        return self._read(key, size)

    def _read(self, key: str, size: int | None) -> bytes:
        """The first ``size`` bytes of ``key`` (None: all of it)."""
        path = self._path(key)

        def read() -> bytes:
            data = self._cat([path], size)[0]
            if isinstance(data, BaseException):
                raise data
            return bytes(data)

        return retried(f"reading {path}", read, attempts=1)

    def read_json_many(self, keys: Sequence[str]) -> Records:
        """One concurrent batch of requests, each reading at most one byte more than a record may have
        (:data:`MAX_JSON_BYTES`); a file whose last listing showed more than that is refused unread."""
        paths = [self._path(key) for key in keys]
        big = {p for p in paths if self._listed.get(p, 0) > MAX_JSON_BYTES}
        wanted = [p for p in paths if p not in big]
        got = dict(zip(wanted, self._cat(wanted, MAX_JSON_BYTES + 1), strict=True))
        out: Records = []
        for key, path in zip(keys, paths, strict=True):
            data = got.get(path, b"")
            try:
                if path in big:
                    raise ValueError(f"{key}: {self._listed[path]} bytes, more than a JSON record may have")
                if isinstance(data, BaseException):
                    raise data
                out.append(_parse_json(key, bytes(data)))
            except (OSError, ValueError) as exc:
                out.append(exc)
        return out

    def _put(self, key: str, upload: Callable[[str], Any]) -> None:
        """Make ``key`` appear whole: ``upload(path)`` writes a complete file at ``path``."""
        dest = self._path(key)
        if self.whole_object_uploads:
            upload(dest)
            return
        parent, _, name = dest.rpartition("/")
        self._ask("makedirs", parent, exist_ok=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            upload(tmp)
            self._ask("mv", tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                self._ask("rm_file", tmp)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        def pipe(path: str) -> None:
            self._ask("pipe_file", path, data, moves=len(data))

        retried(f"writing {self._path(key)}", lambda: self._put(key, pipe))

    def publish_file(self, local_path: str, key: str) -> None:
        size = os.path.getsize(local_path)

        def put(path: str) -> None:
            self._ask("put_file", local_path, path, moves=size)

        retried(f"uploading {self._path(key)}", lambda: self._put(key, put))
        os.unlink(local_path)

    def _info(self, key: str) -> dict[str, Any]:
        """One request: the object's metadata (its identity, so a replaced trial is never served stale);
        inside :meth:`one_view`, the answer kept until it ends."""
        kept = self._kept
        if kept is not None and key in kept:
            return kept[key]
        path = self._path(key)
        self.fs.invalidate_cache(path)
        info: dict[str, Any] = self._ask("info", path)
        if info.get("type") == "directory":
            raise NotInTrial(f"{self.url}: {key!r} is a folder")
        if kept is not None:
            kept[key] = info
        return info

    @contextlib.contextmanager
    def one_view(self) -> Iterator[None]:
        """Within, each shard's metadata (one ``HEAD``) is asked once: a trial replaced meanwhile is
        read through the metadata of the one the view began with, as through its index records."""
        if self._kept is not None:  # nested: the outer view keeps them
            yield
            return
        self._kept = {}
        try:
            yield
        finally:
            self._kept = None

    def _cache_name(self, key: str, info: dict[str, Any]) -> str:
        """The name of the copy of ``key`` as its metadata ``info`` describes it (in the persistent
        :class:`ShardCache`, or the private folder): a file written again under ``key`` has another."""
        version = object_version(info) or info.get("size")
        return hashlib.sha256(f"{self._identity}\0{key}\0{version}".encode()).hexdigest()

    def local_path(self, key: str) -> str:
        """A copy of the object as it is now (its metadata asked, one ``HEAD``, unless :meth:`one_view`
        kept it): in the persistent :class:`ShardCache`, else (``memory://``, no cache, a file larger than
        the cache) in this storage's private folder, where it replaces the copy of an earlier version."""
        path = self._path(key)
        info = self._info(key)
        size = int(info.get("size") or 0)
        name = self._cache_name(key, info)

        def fetch(tmp: str) -> None:
            self._ask("get_file", path, tmp, moves=size)

        if self.cache is not None:
            cached = self.cache.get(name, fetch, size)
            if cached is not None:
                return cached
        dest = os.path.join(self._cache, name)
        if not os.path.exists(dest):
            _download(fetch, self._cache, dest)
            before = self._copies.get(key)
            if before is not None and before != dest:
                Path(before).unlink(missing_ok=True)  # a reader that has it open keeps reading it (POSIX)
            self._copies[key] = dest
        return dest

    def open_ranges(self, key: str) -> RangedFile:
        """A copy of ``key`` as it is now, downloaded before, else the object itself, read by range
        requests: reading a tensor located by its index record (``raw_at``) downloads its bytes only, not
        the shard."""
        path = self._path(key)  # refuses a key that leaves the root
        info = self._info(key)
        name = self._cache_name(key, info)
        for copy in (os.path.join(self._cache, name), None if self.cache is None else self.cache.cached(name)):
            if copy is not None:
                with contextlib.suppress(FileNotFoundError):  # not downloaded, or evicted since
                    return LocalRanges.open(copy)
        return _RemoteRanges(functools.partial(self._ask, "cat_file", path), int(info["size"]))

    def delete(self, key: str) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self._ask("rm_file", self._path(key))

        retried(f"deleting {self._path(key)}", rm)

    def delete_many(self, keys: Sequence[str]) -> None:
        """One ``rm`` of a list of paths on an object store (s3fs: ``DeleteObjects``, 1,000 keys a request, which
        passes over the keys S3 says it could not delete); one :meth:`delete` each elsewhere, and where a path has a
        glob character (``rm`` would expand it, to other files maybe)."""
        paths = [self._path(key) for key in keys]
        if len(paths) < 2 or not self._asynchronous or any(map(has_magic, paths)):
            super().delete_many(keys)
            return
        retried(f"deleting {len(paths)} files under {self.root}", lambda: self._ask("rm", paths))

    def makedirs(self) -> None:
        if self.whole_object_uploads:
            return  # no folders to make; the bucket must exist (creating one needs rights writers rarely have)
        retried(f"creating {self.root}", lambda: self._ask("makedirs", self.root, exist_ok=True))

    def child(self, name: str) -> Storage:
        return FsspecStorage(f"{self.url.rstrip('/')}/{name}", **self._options)

    def staging_dir(self) -> str:
        os.makedirs(self._staging, exist_ok=True)
        return self._staging


class _RemoteRanges:
    """An object of an fsspec filesystem read by range requests (:class:`RangedFile`): one request for
    parts less than :data:`RANGE_GAP` bytes apart (a tensor's values and their checksums are close)."""

    def __init__(self, cat: Callable[..., bytes], size: int) -> None:
        self.cat, self.size = cat, size

    def read_into(self, parts: Sequence[tuple[int, memoryview]]) -> bool:
        runs: list[tuple[int, int, list[tuple[int, memoryview]]]] = []  # first byte, end, parts
        for start, out in parts:
            if runs and start - runs[-1][1] <= RANGE_GAP:
                first, end, run = runs[-1]
                runs[-1] = (first, max(end, start + len(out)), [*run, (start, out)])
            else:
                runs.append((start, start + len(out), [(start, out)]))
        for first, end, run in runs:
            data = self.cat(start=first, end=end, moves=end - first)
            if len(data) != end - first:
                return False
            for start, out in run:
                out[:] = data[start - first : start - first + len(out)]
        return True

    def close(self) -> None:
        """Nothing is held between requests."""


def _download(fetch: Callable[[str], Any], folder: str, dest: str) -> None:
    """``fetch(tmp)`` into a temporary file of ``folder``, renamed to ``dest`` once complete."""
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=folder)
    os.close(fd)
    try:
        fetch(tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def user_cache_dir() -> str | None:
    """The persistent shard cache: ``$TENSORTAP_CACHE_DIR`` (empty: no persistent cache), else
    ``tensortap/shards`` in the platform's user cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``,
    ``~/Library/Caches``, ``%LOCALAPPDATA%``)."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if folder is not None:
        return os.path.expanduser(folder) or None
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    elif sys.platform == "darwin":
        base = os.path.join(home, "Library", "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(base, "tensortap", "shards")


def cache_bytes() -> int:
    """Size bound of the persistent cache: ``$TENSORTAP_CACHE_BYTES``, default 10 GiB."""
    text = os.environ.get(CACHE_BYTES_ENV, "")
    try:
        return int(text) if text else DEFAULT_CACHE_BYTES
    except ValueError:
        raise ValueError(f"{CACHE_BYTES_ENV}={text!r}: expected a number of bytes") from None


class ShardCache:
    """Whole downloaded files shared by every process of the user, bounded in size.

    A file is named by a hash of the trial URL, the key and the object's
    version (ETag) and size, and appears under its name only once complete
    (download to a temporary file, then rename), so processes can share the
    folder without locks. After each download the least recently used files
    are removed until the folder holds at most ``max_bytes``; a file larger
    than that is not cached here.

    Parameters
    ----------
    folder
        The cache folder (created when first needed).
    max_bytes
        Size bound of the folder.
    """

    STALE_PART_SECONDS = 3600.0

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def cached(self, name: str) -> str | None:
        """The cached file ``name``, marked as used now (the recency that eviction goes by); None if absent."""
        path = os.path.join(self.folder, name)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def get(self, name: str, fetch: Callable[[str], Any], size: int) -> str | None:
        """The cached file ``name``, downloaded with ``fetch(tmp)`` if absent; None if ``size`` is too large."""
        path = self.cached(name)
        if path is not None:
            return path
        path = os.path.join(self.folder, name)
        if size > self.max_bytes:
            return None
        _download(fetch, self.folder, path)
        self.trim(keep=path)
        return path

    def trim(self, keep: str = "") -> None:
        """Remove least recently used files until the folder fits ``max_bytes`` (never ``keep``)."""
        now = time.time()
        files = []
        with os.scandir(self.folder) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if e.name.startswith("."):  # a download in progress, or one killed long ago
                        if now - st.st_mtime > self.STALE_PART_SECONDS:
                            os.unlink(e.path)
                        continue
                    files.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # a process that has it open keeps reading it (POSIX)
                total -= size


KEPT_MODULE = "_tensortap_kept"
"""The name in ``sys.modules`` of the module object, defined by no file, that holds what :func:`kept` keeps."""


def kept(name: str, make: Callable[[], _T]) -> _T:
    """This process's object ``name``, made by ``make()`` at the first call.

    For a module's live state (open writers, exit handlers registered once): running the module again
    (``importlib.reload``, or IPython's ``%autoreload``, which also empties the module's namespace first) then
    finds the objects it made before instead of making empty ones, which would forget what is open. They are
    kept in a module object of their own in ``sys.modules``, which no file defines, so nothing reloads it.
    """
    holder = sys.modules.get(KEPT_MODULE)
    if holder is None:
        holder = sys.modules.setdefault(KEPT_MODULE, types.ModuleType(KEPT_MODULE, "tensortap's live state"))
    if not hasattr(holder, name):
        setattr(holder, name, make())
    found: _T = getattr(holder, name)
    return found


def _remove_temporary_dirs() -> None:
    for storage in list(_LIVE_FSSPEC):
        if storage._cleanup.detach() is not None:  # calling a finalizer is a no-op once weakref's exit hook ran
            shutil.rmtree(storage._tmp, ignore_errors=True)


def _live_fsspec() -> weakref.WeakSet[FsspecStorage]:
    """The set of the process's :class:`FsspecStorage`, made once (:func:`kept`) with the exit handler that
    removes their temporary folders: registered at the first import, so that it runs after the exit handler
    that closes the writers (LIFO), and once, so that a reload does not register one that runs before."""
    atexit.register(_remove_temporary_dirs)
    return weakref.WeakSet()


_LIVE_FSSPEC: weakref.WeakSet[FsspecStorage] = kept(f"{__name__}.live_fsspec", _live_fsspec)
