"""Choose a storage backend for a path or URL.

Built-in: plain paths and ``file://`` use :class:`LocalStorage`; any other
scheme that fsspec knows goes to :class:`FsspecStorage`. Third-party
packages register a :class:`Storage` subclass for a scheme through the entry
point group ``tensortap.backends``::

    [project.entry-points."tensortap.backends"]
    myscheme = "mypkg.storage:MyStorage"

A registered plugin takes precedence over fsspec for its scheme. Only the
plugin of the scheme in use is imported; a plugin that fails to load warns
(naming it) and is skipped instead of breaking tensortap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .storage import FsspecStorage, LocalStorage, Storage

logger = logging.getLogger("tensortap")

ENTRY_POINT_GROUP = "tensortap.backends"

_S3_HINT = 'pip install "tensortap[s3]"'
# fsspec protocols that need an extra package: the package and how to install it.
_INSTALL_HINTS = {
    "s3": ("s3fs", _S3_HINT),
    "s3a": ("s3fs", _S3_HINT),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
    "abfss": ("adlfs", "pip install adlfs"),
}


def _load(ep: EntryPoint) -> type[Storage] | None:
    """Import one plugin; warn and return None if it is broken."""
    where = f"tensortap backend plugin {ep.name!r} ({ep.value}"
    if ep.dist is not None:
        where += f", from {ep.dist.name} {ep.dist.version}"
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not break tensortap
        logger.warning("%s) failed to load and is skipped: %r", where, exc)
        return None
    if not (isinstance(cls, type) and issubclass(cls, Storage)):
        logger.warning("%s) is skipped: expected a subclass of tensortap.backends.Storage, got %r", where, cls)
        return None
    return cls


def plugin_schemes() -> list[str]:
    """Return the schemes registered in the entry point group, without importing any plugin."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def list_backends() -> dict[str, type[Storage]]:
    """Import every registered plugin and return them by scheme (broken ones warn and are left out)."""
    found: dict[str, type[Storage]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found and (cls := _load(ep)) is not None:
            found[ep.name] = cls
    return found


def _plugin(scheme: str) -> Callable[..., Storage] | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=scheme):
        cls = _load(ep)
        if cls is not None:
            return cls
    return None


def _check_fsspec_protocol(protocol: str, url: str) -> None:
    """Raise ImportError (with an install hint) or ValueError (listing the valid choices) for ``protocol``."""
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        package, hint = _INSTALL_HINTS.get(protocol, ("", ""))
        detail = f"the package {package}, which is missing: {hint}" if package else f"a missing package ({exc})"
        raise ImportError(f"storage URL {url!r}: {protocol}:// needs {detail}") from exc
    except ValueError as exc:
        plugins = ", ".join(f"{s}://" for s in plugin_schemes()) or "none installed"
        raise ValueError(
            f"storage URL {url!r}: unknown scheme {protocol!r}; valid: a local path, file://, "
            f"a plugin scheme ({plugins}), or an fsspec protocol ({', '.join(fsspec.available_protocols())})"
        ) from exc


def get_storage(url: str | os.PathLike[str] | Storage, **storage_options: Any) -> Storage:
    """Return the storage backend for ``url``.

    Parameters
    ----------
    url
        A local path, a ``file://`` URL, an fsspec URL such as ``s3://bucket/prefix``
        (chained URLs like ``simplecache::s3://...`` too), a URL whose scheme a plugin
        registered, or a ready :class:`Storage` (returned as is).
    storage_options
        Passed to the plugin or the fsspec filesystem (e.g. s3fs's ``key``, ``secret``,
        ``client_kwargs={"endpoint_url": ...}``).

    Raises
    ------
    ImportError
        When the scheme needs a package that is missing; the message says what to install.
    ValueError
        When no backend serves the scheme (the message lists the valid ones), or when
        ``storage_options`` are given for a local path or a ready Storage.
    """
    if isinstance(url, Storage):
        if storage_options:
            raise ValueError(f"storage_options: not used with a ready {url!r}, got {sorted(storage_options)}")
        return url
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    if not sep or (len(scheme) == 1 and os.name == "nt") or scheme == "file":
        if storage_options:
            raise ValueError(
                f"storage_options: only used with URLs such as s3://, got {sorted(storage_options)} "
                f"for the local path {text!r}"
            )
        return LocalStorage(rest if scheme == "file" else text)
    outer = text.partition("::")[0].partition("://")[0]
    plugin = _plugin(outer)
    if plugin is not None:
        return plugin(text, **storage_options)
    for part in text.split("::"):
        _check_fsspec_protocol(part.partition("://")[0], text)
    return FsspecStorage(text, **storage_options)
