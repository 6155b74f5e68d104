"""Choose a storage backend for a path or URL.

Built-in: plain paths and ``file://`` use :class:`LocalStorage`; any other
scheme that fsspec knows goes to :class:`FsspecStorage`. Third-party
packages register a :class:`Storage` subclass for a scheme through the entry
point group ``tensortap.backends``::

    [project.entry-points."tensortap.backends"]
    myscheme = "mypkg.storage:MyStorage"

A registered plugin takes precedence over fsspec for its scheme. Only the
plugin of the scheme in use is imported; a plugin that fails to load warns
(naming it) and is skipped instead of breaking tensortap. A scheme that
several installed distributions register goes to the first found on
``sys.path`` that loads, with one warning naming them all.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ..exceptions import StorageOptionsError
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


def _origin(ep: EntryPoint) -> str:
    """How messages name a plugin: ``'myfs' (mypkg.storage:MyStorage, from mypkg 1.0)``."""
    dist = f", from {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
    return f"{ep.name!r} ({ep.value}{dist})"


def _load(ep: EntryPoint) -> type[Storage] | str:
    """Import one plugin: its Storage class, or why it cannot be used (a broken plugin must not break tensortap)."""
    try:
        cls = ep.load()
    except Exception as exc:
        return f"failed to load: {exc!r}"
    if not (isinstance(cls, type) and issubclass(cls, Storage)):
        return f"expected a subclass of tensortap.backends.Storage, got {cls!r}"
    return cls


@functools.cache
def _warn_shared_scheme(scheme: str, origins: tuple[str, ...], used: str) -> None:
    """Warn, once a process, that several plugins registered ``scheme`` and which one serves it."""
    logger.warning(
        "tensortap backend scheme %s:// is registered by %d plugins: %s; using %s (the first found on sys.path "
        "that loads); uninstall the others to silence this",
        scheme,
        len(origins),
        "; ".join(origins),
        used,
    )


def _choose(scheme: str, eps: Sequence[EntryPoint]) -> tuple[type[Storage] | None, list[str]]:
    """The class of the first plugin of ``eps`` (all registered for ``scheme``) that loads, and the problems of
    those skipped before it (each also a warning); a warning names them all when there are several."""
    problems: list[str] = []
    for ep in eps:
        cls = _load(ep)
        if not isinstance(cls, str):
            if len(eps) > 1:
                _warn_shared_scheme(scheme, tuple(_origin(e) for e in eps), _origin(ep))
            return cls, problems
        problems.append(f"{_origin(ep)} {cls}")
        logger.warning("tensortap backend plugin %s, and is skipped", problems[-1])
    return None, problems


def _registered() -> dict[str, list[EntryPoint]]:
    """Every entry point of the group by scheme, in the order they are found."""
    by_scheme: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        by_scheme.setdefault(ep.name, []).append(ep)
    return by_scheme


def plugin_schemes() -> list[str]:
    """Return the schemes registered in the entry point group, without importing any plugin."""
    return sorted(_registered())


def list_backends() -> dict[str, type[Storage]]:
    """Import every registered plugin and return them by scheme (broken ones warn and are left out).

    A scheme registered by several plugins goes to the first found that loads (with a warning naming them).
    """
    found: dict[str, type[Storage]] = {}
    for scheme, eps in _registered().items():
        cls, _ = _choose(scheme, eps)
        if cls is not None:
            found[scheme] = cls
    return found


def _open_plugin(cls: type[Storage], scheme: str, url: str, storage_options: dict[str, Any]) -> Storage:
    """``cls(url, **storage_options)``; a :class:`StorageOptionsError` where the options do not fit its signature."""
    signature = inspect.signature(cls)
    try:
        signature.bind(url, **storage_options)
    except TypeError as exc:
        params = list(signature.parameters.values())[1:]  # after the URL
        takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [] if any(p.kind is p.VAR_KEYWORD for p in params) else sorted(set(storage_options) - set(takes))
        problem = f"unknown option(s) {', '.join(unknown)}" if unknown else str(exc)
        raise StorageOptionsError(
            f"storage URL {url!r}: storage_options {storage_options!r} do not fit the {scheme}:// plugin "
            f"{cls.__module__}.{cls.__qualname__}: {problem}; it takes {', '.join(takes) or 'none'}"
        ) from None
    make: Callable[..., Storage] = cls  # a plugin's constructor takes the URL and its options
    return make(url, **storage_options)


def _plugin_choices() -> str:
    """The plugin schemes an error offers: those whose plugin loads, then those registered whose plugin does not."""
    usable: list[str] = []
    broken: list[str] = []
    for scheme, eps in sorted(_registered().items()):
        loads = any(not isinstance(_load(ep), str) for ep in eps)
        (usable if loads else broken).append(f"{scheme}://")
    if not broken:
        return ", ".join(usable) or "none installed"
    return f"{', '.join(usable) or 'none that loads'}; registered but failing to load: {', '.join(broken)}"


def _check_fsspec_protocol(protocol: str, url: str, broken: Sequence[str] = ()) -> None:
    """Raise ImportError (with an install hint) or ValueError (listing the valid choices) for ``protocol``.

    ``broken`` says why each plugin registered for ``protocol`` cannot be used: where fsspec does not know the
    protocol either, the ValueError says that instead of calling the scheme unknown.
    """
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        package, hint = _INSTALL_HINTS.get(protocol, ("", ""))
        detail = f"the package {package}, which is missing: {hint}" if package else f"a missing package ({exc})"
        raise ImportError(f"storage URL {url!r}: {protocol}:// needs {detail}") from exc
    except ValueError as exc:
        if broken:
            raise ValueError(
                f"storage URL {url!r}: the plugin registered for {protocol}:// cannot be used: {'; '.join(broken)}"
            ) from exc
        raise ValueError(
            f"storage URL {url!r}: unknown scheme {protocol!r}; valid: a local path, file://, "
            f"a plugin scheme ({_plugin_choices()}), or an fsspec protocol ({', '.join(fsspec.available_protocols())})"
        ) from exc


def is_local_path(url: str) -> bool:
    """Whether ``url`` names a local folder (a path, a ``file://`` URL): :func:`get_storage` opens it without
    storage options.

    Parameters
    ----------
    url
        A trial's path or URL.

    Returns
    -------
    bool
        False for a URL of another scheme (``s3://``, ``memory://``, chained ``simplecache::s3://``).
    """
    scheme, sep, _ = url.partition("://")
    return not sep or (len(scheme) == 1 and os.name == "nt") or scheme == "file"


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
    StorageOptionsError
        (a ValueError) When ``storage_options`` do not fit the constructor of the scheme's plugin
        (a name it does not take, a required one missing); the message names the scheme, the
        options and the names the plugin takes.
    ValueError
        When no backend serves the scheme (the message lists the valid ones), when the plugins
        registered for a scheme fsspec does not know fail to load (the message says why), or when
        ``storage_options`` are given for a local path or a ready Storage.
    """
    if isinstance(url, Storage):
        if storage_options:
            raise ValueError(f"storage_options: not used with a ready {url!r}, got {sorted(storage_options)}")
        return url
    text = os.fspath(url)
    if is_local_path(text):
        if storage_options:
            raise ValueError(
                f"storage_options: only used with URLs such as s3://, got {sorted(storage_options)} "
                f"for the local path {text!r}"
            )
        return LocalStorage(text.removeprefix("file://"))
    protocols = [part.partition("://")[0] for part in text.split("::")]
    plugin, broken = _choose(protocols[0], list(entry_points(group=ENTRY_POINT_GROUP, name=protocols[0])))
    if plugin is not None:
        return _open_plugin(plugin, protocols[0], text, storage_options)
    for protocol in protocols:
        _check_fsspec_protocol(protocol, text, broken if protocol == protocols[0] else ())
    return FsspecStorage(text, **storage_options)
