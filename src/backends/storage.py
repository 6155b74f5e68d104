"""Storage backends: where shard files and small JSON records live.

A backend stores whole files under string keys relative to the trial root
(``"shards/worker_0/0000000001.h5"``). Writes are atomic: a reader sees a
file whole or not at all. Two implementations ship: :class:`LocalStorage`
(a directory; temp file, fsync, ``os.replace``) and :class:`FsspecStorage`
(any fsspec URL; whole-object uploads, reads through a local cache).
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class Storage(abc.ABC):
    """The interface every backend implements.

    Attributes
    ----------
    url
        The trial root as the user gave it.
    is_local
        True when keys are plain files that h5py can open in place.
    """

    url: str
    is_local: bool = False

    @abc.abstractmethod
    def exists(self, key: str = "") -> bool:
        """Return whether ``key`` (or the root, for ``""``) exists."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Return the keys of files directly under folder ``prefix`` (names only, sorted)."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Return the names of folders directly under folder ``prefix`` (sorted)."""

    @abc.abstractmethod
    def walk(self) -> list[str]:
        """Return every file key under the root (for ``tensortap check``)."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the content of ``key``; FileNotFoundError if it does not exist."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key`` with ``data``."""

    @abc.abstractmethod
    def publish_file(self, local_path: str, key: str) -> None:
        """Atomically move the finished local file ``local_path`` to ``key``."""

    @abc.abstractmethod
    def local_path(self, key: str) -> str:
        """Return a local file path with the content of ``key`` (a cached copy for remote stores)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""

    @abc.abstractmethod
    def makedirs(self) -> None:
        """Create the root if needed; raise OSError (e.g. PermissionError) if it cannot be written."""

    def staging_dir(self) -> str:
        """Return a local directory in which the writer builds files before publishing them."""
        return tempfile.gettempdir()

    def read_json(self, key: str) -> Any:
        """Return the parsed JSON content of ``key``."""
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        """Atomically write ``obj`` as JSON to ``key``."""
        self.write_bytes(key, json.dumps(obj, separators=(",", ":")).encode())


class LocalStorage(Storage):
    """A trial in a local directory."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def exists(self, key: str = "") -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> list[str]:
        try:
            with os.scandir(self._path(prefix)) as it:
                return sorted(e.name for e in it if e.is_file() and not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_dirs(self, prefix: str) -> list[str]:
        try:
            with os.scandir(self._path(prefix)) as it:
                return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _atomic(self, key: str, write: Any) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
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
        dest = self._path(key)
        if Path(local_path).parent == dest.parent:
            with open(local_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(local_path, dest)
            return

        def copy(f: Any) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)

        self._atomic(key, copy)
        os.unlink(local_path)

    def local_path(self, key: str) -> str:
        return str(self._path(key))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def makedirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {self.root}")

    def staging_dir(self) -> str:
        return str(self.root)


class FsspecStorage(Storage):
    """A trial at any fsspec URL (``s3://bucket/prefix``, ``memory://x``, ...).

    Object stores have no rename, so files are uploaded whole; a reader never
    sees a partial object. Files read are cached in a local directory.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a core dependency
            raise ImportError('fsspec is needed for URLs: pip install "tensortap[s3]"') from exc
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = self.root.rstrip("/")
        self._cache = tempfile.mkdtemp(prefix="tensortap-cache-")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str = "") -> bool:
        return bool(self.fs.exists(self._path(key)))

    def list(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(prefix), detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            name
            for e in entries
            if e.get("type") == "file" and not (name := e["name"].rstrip("/").rsplit("/", 1)[-1]).startswith(".")
        )

    def list_dirs(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(prefix), detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def walk(self) -> list[str]:
        if not self.exists():
            return []
        n = len(self.root) + 1
        return sorted(p[n:] for p in self.fs.find(self.root))

    def read_bytes(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def publish_file(self, local_path: str, key: str) -> None:
        self.fs.put_file(local_path, self._path(key))
        os.unlink(local_path)

    def local_path(self, key: str) -> str:
        dest = os.path.join(self._cache, key)
        if not os.path.exists(dest):  # published files are immutable: cache forever
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = dest + ".part"
            self.fs.get_file(self._path(key), tmp)
            os.replace(tmp, dest)
        return dest

    def delete(self, key: str) -> None:
        if self.fs.exists(self._path(key)):
            self.fs.rm_file(self._path(key))

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
