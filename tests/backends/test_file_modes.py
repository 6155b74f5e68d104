"""The modes of a trial's files: what ``open()`` gives a new file (``0o666`` less the umask), not ``0o600``.

The files were made by ``tempfile.mkstemp`` (for atomic publication) and kept its ``0o600`` whatever the
umask, while the folders followed it (``0o755``): another user could list a trial but read none of it.
Each test sets a real umask (``os.umask``) and sets the old one back.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import tensortap
from tensortap.backends import LocalStorage, get_storage
from tensortap.capture import Writer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")

UMASKS = [0o022, 0o027, 0o002]


@pytest.fixture(params=UMASKS, ids=lambda mask: f"umask{mask:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, tuple[bool, int]]:
    """Every entry below ``root``: whether it is a folder, and its permission bits."""
    found = {}
    for path in sorted(root.rglob("*")):
        mode = os.lstat(path).st_mode
        found[path.relative_to(root).as_posix()] = (stat.S_ISDIR(mode), stat.S_IMODE(mode))
    return found


def assert_umask_modes(root: Path, umask: int) -> None:
    entries = modes(root)
    files = [key for key, (is_dir, _) in entries.items() if not is_dir]
    assert files, entries
    wrong = {key: oct(mode) for key, (is_dir, mode) in entries.items() if mode != (0o777 if is_dir else 0o666) & ~umask}
    assert not wrong, f"umask {umask:03o}: {wrong}"


def write_trial(out: Path | str) -> None:
    with Writer(out, save_config=tensortap.SaveConfig(save_interval=1)) as w:
        for step in range(3):
            with w.stepping():
                w.save("fc1.weight", np.full((4, 3), step, dtype=np.float32), ["weights"])
                w.save("losses/loss", np.float64(1.0 / (step + 1)), ["losses"])


def test_every_file_of_a_written_trial_has_the_mode_of_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "run"
    write_trial(out)
    trial = tensortap.create_trial(out)
    trial.request_stop("a test")  # a record a reader writes
    trial.close()
    keys = set(modes(out))
    for folder in ("workers", "index", "end", "shards"):  # every kind of file is among those checked
        assert any(k.startswith(f"{folder}/") and k.endswith((".json", ".h5")) for k in keys), (folder, keys)
    assert_umask_modes(out, umask)


def test_a_trial_written_through_a_file_url_has_the_modes_of_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "run"
    write_trial(f"file://{out}")
    assert_umask_modes(out, umask)


def test_each_way_of_writing_a_file_gives_the_mode_of_the_umask(tmp_path: Path, umask: int) -> None:
    storage = get_storage(str(tmp_path / "trial"))
    assert isinstance(storage, LocalStorage)
    storage.write_bytes("a/bytes.bin", b"x")
    storage.write_json("a/record.json", {"a": 1})
    assert storage.create_json("a/created.json", {"b": 2})
    staged = Path(storage.staging_dir()) / "shards" / "worker_0"
    staged.mkdir(parents=True)
    fd, local = tempfile.mkstemp(dir=staged, suffix=".h5.tmp")  # as the writer stages a shard
    os.write(fd, b"shard")
    os.close(fd)
    storage.publish_file(local, "shards/worker_0/0000000000.h5")  # renamed in place
    elsewhere = tmp_path / "elsewhere.h5"
    elsewhere.write_bytes(b"shard")
    os.chmod(elsewhere, 0o600)
    storage.publish_file(str(elsewhere), "shards/worker_0/0000000001.h5")  # copied
    assert_umask_modes(tmp_path / "trial", umask)
