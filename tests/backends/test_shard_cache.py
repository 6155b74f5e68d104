"""Issue "object storage as users expect": shards read from object storage are cached across
processes, in a size-bounded folder, and never served stale."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tensortap
from tensortap.backends import FsspecStorage, get_storage
from tensortap.backends.storage import ShardCache, user_cache_dir
from tensortap.capture import Writer

KEY = "shards/worker_0/0000000000.h5"


def no_download(*args: object) -> None:
    raise AssertionError("downloaded again")


@pytest.mark.s3
def test_a_second_reader_does_not_download_again(s3_url: str, s3_options: dict[str, Any], shard_cache: Path) -> None:
    mask = np.arange(4) % 2 == 0  # booleans are read through the shard's HDF5 structure: a download
    with Writer(s3_url, storage_options=s3_options) as w:
        with w.stepping():
            w.save("x", mask)
    first = tensortap.create_trial(s3_url, **s3_options)
    np.testing.assert_array_equal(first.tensor("x").value(0), mask)
    second = tensortap.create_trial(s3_url, skip_instance_cache=True, **s3_options)  # as another process
    assert isinstance(second.storage, FsspecStorage) and second.storage.fs is not first.storage.fs
    second.storage.fs.get_file = no_download  # type: ignore[method-assign]
    np.testing.assert_array_equal(second.tensor("x").value(0), mask)
    assert os.path.dirname(second.storage.local_path(KEY)) == str(shard_cache)


@pytest.mark.s3
def test_a_located_read_of_a_cached_shard_marks_it_used(
    s3_url: str, s3_options: dict[str, Any], shard_cache: Path
) -> None:
    """A tensor read where its index record says, from a shard already in the cache, reads the copy
    and marks it as just used, as a download would: least recently used copies are evicted first."""
    weight = np.arange(8, dtype=np.float32)
    with Writer(s3_url, storage_options=s3_options) as w:
        with w.stepping():
            w.save("w", weight)
    trial = tensortap.create_trial(s3_url, **s3_options)
    copy = Path(trial.storage.local_path(KEY))  # downloaded into the cache
    assert copy.parent == shard_cache
    past = time.time() - 1000
    os.utime(copy, (past, past))
    reader = tensortap.create_trial(s3_url, skip_instance_cache=True, **s3_options)
    reader.storage.fs.get_file = no_download  # type: ignore[method-assign]
    np.testing.assert_array_equal(reader.tensor("w").values()[0], weight)
    assert copy.stat().st_mtime > past + 900


@pytest.mark.s3
def test_a_replaced_trial_is_never_served_stale(s3_url: str, s3_options: dict[str, Any]) -> None:
    storage = get_storage(s3_url, **s3_options)
    storage.write_bytes(KEY, b"first run")
    old = storage.local_path(KEY)
    storage.write_bytes(KEY, b"second run, same key")  # the trial deleted and written again
    new = storage.local_path(KEY)
    assert new != old
    assert Path(new).read_bytes() == b"second run, same key"


def test_least_recently_used_files_go_first(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path), max_bytes=250)

    def fetch(content: bytes) -> Any:
        return lambda tmp: Path(tmp).write_bytes(content)

    a = cache.get("a", fetch(b"a" * 100), 100)
    b = cache.get("b", fetch(b"b" * 100), 100)
    assert a and b
    past = time.time() - 100
    os.utime(b, (past, past))
    os.utime(a, (past + 1, past + 1))  # a used after b
    c = cache.get("c", fetch(b"c" * 100), 100)
    assert sorted(os.listdir(tmp_path)) == ["a", "c"]
    assert cache.get("a", no_download, 100) == a
    assert cache.get("big", no_download, 251) is None  # larger than the bound: not cached here
    assert c and Path(c).read_bytes() == b"c" * 100


def test_a_killed_download_never_appears_under_its_name(tmp_path: Path) -> None:
    cache = ShardCache(str(tmp_path), max_bytes=1000)

    def dies(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise ConnectionError("connection reset")

    with pytest.raises(ConnectionError):
        cache.get("a", dies, 8)
    assert os.listdir(tmp_path) == []


def test_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TENSORTAP_CACHE_DIR", str(tmp_path))
    assert user_cache_dir() == str(tmp_path)
    monkeypatch.setenv("TENSORTAP_CACHE_DIR", "")
    assert user_cache_dir() is None
    monkeypatch.delenv("TENSORTAP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and os.uname().sysname == "Linux":
        assert user_cache_dir() == str(tmp_path / "xdg" / "tensortap" / "shards")
