"""Choose a storage backend for a path or URL.

Built-in: plain paths and ``file://`` use :class:`LocalStorage`; any other
scheme goes to :class:`FsspecStorage`. Third-party packages register a
backend class for a scheme through the entry point group
``tensortap.backends`` (``myscheme = mypkg.module:MyStorage``); a broken
plugin warns and is skipped instead of breaking tensortap.
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import entry_points
from typing import Any

from .storage import FsspecStorage, LocalStorage, Storage

ENTRY_POINT_GROUP = "tensortap.backends"

# fsspec protocols that need an extra package, with the hint to give.
_INSTALL_HINTS = {
    "s3": ('s3fs', 'pip install "tensortap[s3]"'),
    "s3a": ('s3fs', 'pip install "tensortap[s3]"'),
    "gs": ('gcsfs', 'pip install gcsfs'),
    "gcs": ('gcsfs', 'pip install gcsfs'),
    "az": ('adlfs', 'pip install adlfs'),
    "abfs": ('adlfs', 'pip install adlfs'),
}


def _plugins() -> dict[str, type[Storage]]:
    found: dict[str, type[Storage]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break tensortap
            warnings.warn(f"tensortap backend plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
            continue
        found[ep.name] = cls
    return found


def get_storage(url: str | os.PathLike[str] | Storage, **storage_options: Any) -> Storage:
    """Return the storage backend for ``url``.

    Parameters
    ----------
    url
        A local path, a ``file://`` URL, an fsspec URL such as ``s3://bucket/prefix``,
        a URL whose scheme a plugin registered, or a ready :class:`Storage`.
    storage_options
        Passed to fsspec (e.g. ``endpoint_url`` through ``client_kwargs``).

    Raises
    ------
    ImportError
        When the scheme needs a package that is missing; the message says what to install.
    """
    if isinstance(url, Storage):
        return url
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    if not sep or (len(scheme) == 1 and os.name == "nt"):
        return LocalStorage(text)
    if scheme == "file":
        return LocalStorage(rest)
    plugins = _plugins()
    if scheme in plugins:
        return plugins[scheme](text, **storage_options)
    try:
        return FsspecStorage(text, **storage_options)
    except (ImportError, ValueError) as exc:
        if scheme in _INSTALL_HINTS:
            package, hint = _INSTALL_HINTS[scheme]
            raise ImportError(f"{package} is needed for {scheme}:// URLs: {hint}") from exc
        raise ValueError(
            f"out_dir: no storage backend for scheme {scheme!r}; valid: local paths, file://, "
            f"fsspec protocols, or plugins ({', '.join(sorted(plugins)) or 'none installed'})"
        ) from exc
