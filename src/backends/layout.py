"""Where each file of a trial lives, and the rules every key and name read from a trial obeys.

See ``docs/format.md`` for the normative description. A trial may come from a
stranger: every key a backend is handed and every name taken from a trial
(a folder listing, an index record's ``shard``) goes through :func:`check_key`
or :func:`check_name` before it is used as a path, so that nothing outside the
trial is ever read or written.
"""

from __future__ import annotations

import re

FORMAT_VERSION = 3
"""The version this tensortap writes; it reads every version up to this one."""
# Additions within a version that older readers of it ignore safely (docs/format.md, "Versioning"):
# none yet in version 3 (in version 2, minor 1 added the index record's ``raw_at``).
FORMAT_MINOR = 0

SHARDS = "shards"
INDEX = "index"
WORKERS = "workers"
ENDS = "end"
STOP_REQUEST = "control/stop.json"

RUN_PREFIX = "run-"
"""A run folder ``run-<n>`` in a trial folder: a later run that ``if_exists="new_run"`` wrote there, a trial itself."""


def run_number(name: str) -> int | None:
    """The ``n`` of a run folder's name ``run-<n>`` (:data:`RUN_PREFIX`); None for any other name."""
    return int(name[len(RUN_PREFIX) :]) if re.fullmatch(r"run-\d{1,9}", name) else None


MAX_NAME_LENGTH = 255
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f:]")


class UnsafeKey(ValueError):
    """A key or name from a trial that could reach outside the trial (``..``, an absolute path, ...)."""


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8: it holds no lone surrogate (as JSON's ``"\\ud800"`` gives, or a
    file name's byte that is not UTF-8, as Python lists it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_fault(name: object) -> str | None:
    """What makes ``name`` unsafe as one path component of a trial (see :func:`check_name`), to follow "its
    name" in a sentence (``"holds ':'"``); None if nothing."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    if name == "..":
        return "leads out of its folder"
    if name == ".":
        return "is '.'"
    if name.startswith("."):
        return "starts with '.'"
    if (bad := _BAD_NAME.search(name)) is not None:
        return f"holds {bad.group()!r}"
    if not is_unicode(name):
        return "is not valid Unicode"
    return None


def check_name(name: object) -> str:
    """Return ``name`` if it is safe as one path component of a trial, else raise :class:`UnsafeKey`.

    A name is a non-empty string of valid Unicode, of at most 255 characters, without ``/``, ``\\``, ``:``,
    control characters, and not starting with ``.`` (which also excludes ``.`` and ``..``).
    """
    why = name_fault(name)
    if why is not None:
        raise UnsafeKey(f"{name!r} is not a valid name in a trial: it {why}")
    return name  # type: ignore[return-value]


def check_key(key: object) -> str:
    """Return ``key`` if it is a safe key relative to a trial's root, else raise :class:`UnsafeKey`.

    ``""`` is the root itself; any other key is ``/``-separated parts, each
    a valid name except that it may start with ``.`` (temporary files and
    folders of a writer), though never be ``.`` or ``..``: so no absolute
    path, no ``..``, no empty part.
    """
    if not isinstance(key, str):
        raise UnsafeKey(f"{key!r} is not a valid key in a trial")
    if key:
        for part in key.split("/"):
            why = name_fault(part[1:] if part.startswith(".") and part not in (".", "..") else part)
            if why is not None:
                raise UnsafeKey(f"{key!r} is not a valid key in a trial: its part {part!r} {why}")
    return key


def shard_key(worker: str, seq: int) -> str:
    """Key of a worker's ``seq``-th shard."""
    return f"{SHARDS}/{worker}/{seq:010d}.h5"


def is_shard_key_of(key: object, worker: str) -> bool:
    """Whether ``key`` (from an index record) is a valid key of a shard of ``worker``."""
    if not isinstance(key, str) or not key.startswith(f"{SHARDS}/{worker}/") or not key.endswith(".h5"):
        return False
    try:
        check_name(key[len(SHARDS) + len(worker) + 2 :])
    except UnsafeKey:
        return False
    return True


def index_key(worker: str, seq: int) -> str:
    """Key of the index record of a worker's ``seq``-th shard."""
    return f"{INDEX}/{worker}/{seq:010d}.json"


def worker_key(worker: str) -> str:
    """Key of the record a worker writes when it starts."""
    return f"{WORKERS}/{worker}.json"


def end_key(worker: str) -> str:
    """Key of the end-of-training marker of a worker."""
    return f"{ENDS}/{worker}.json"


def worker_name(rank: int) -> str:
    """``worker_<rank>``."""
    return f"worker_{rank}"
