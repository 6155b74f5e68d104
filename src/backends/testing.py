"""The conformance suite of storage backends (needs pytest; never imported by tensortap itself).

:class:`StorageTests` is the contract of :class:`tensortap.backends.Storage`
(like zarr's ``StoreTests``). A backend's test class subclasses it and
provides the ``storage`` fixture (a backend whose root does not exist yet)
and :meth:`StorageTests.raw_keys` (every key really stored, hidden ones too)::

    from tensortap.backends.testing import StorageTests

    class TestMyStorage(StorageTests):
        @pytest.fixture
        def storage(self, tmp_path):
            return MyStorage(f"my://{tmp_path}/trial")

        def raw_keys(self, storage):
            return sorted(...)  # every key stored, bypassing the backend

tensortap runs it against its local, ``memory://`` and S3 backends.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from . import storage as storage_module
from .layout import UnsafeKey
from .storage import Storage

UNSAFE_KEYS = [
    "../outside.json",
    "index/../../outside.json",
    "/etc/passwd",
    "index//x.json",
    "index/./x.json",
    "shards/worker_0/..",
    "a\\..\\b",
    "x\x00y",
    "C:x",
]
"""Keys that could leave a trial's root: every backend refuses them (``UnsafeKey``)."""

KEYS = [
    "workers/worker_0.json",
    "index/worker_0/0000000000.json",
    "index/worker_1/0000000000.json",
    "shards/worker_0/0000000000.h5",
    "end/worker_0.json",
]


def payload(fill: int, size: int) -> bytes:
    """``size`` bytes of value ``fill`` (a torn read shows as a mix)."""
    return bytes([fill]) * size


class StorageTests:
    """The behaviour every backend must have. Subclass and provide the fixtures."""

    @pytest.fixture
    def storage(self) -> Storage:
        """A backend whose root does not exist yet."""
        raise NotImplementedError

    def raw_keys(self, storage: Storage) -> list[str]:
        """Every key stored under the root, temporary (hidden) ones included, bypassing the backend."""
        raise NotImplementedError

    def staged_file(self, storage: Storage, content: bytes) -> str:
        """A finished file where the writer builds shards (``staging_dir``), as the writer makes it."""
        staging = os.path.join(storage.staging_dir(), "shards", "worker_0")
        os.makedirs(staging, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".0000000000.", suffix=".h5.tmp", dir=staging)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return path

    # ------------------------------------------------------------- root
    def test_missing_root_is_empty(self, storage: Storage) -> None:
        assert not storage.exists()
        assert not storage.exists("workers/worker_0.json")
        assert storage.list("") == []
        assert storage.list_dirs("") == []
        assert storage.walk() == []

    def test_root_exists_once_written(self, storage: Storage) -> None:
        storage.makedirs()
        storage.makedirs()  # idempotent
        storage.write_json("workers/worker_0.json", {"worker": "worker_0"})
        assert storage.exists()
        assert storage.exists("workers/worker_0.json")
        assert storage.exists("workers")

    # ------------------------------------------------------- read, write
    def test_write_then_read(self, storage: Storage) -> None:
        data = bytes(range(256)) * 3
        storage.write_bytes("index/worker_0/0000000000.json", data)
        assert storage.read_bytes("index/worker_0/0000000000.json") == data

    def test_write_replaces(self, storage: Storage) -> None:
        storage.write_bytes("control/stop.json", b"first, longer content")
        storage.write_bytes("control/stop.json", b"second")
        assert storage.read_bytes("control/stop.json") == b"second"
        assert storage.list("control") == ["stop.json"]

    def test_json_round_trip(self, storage: Storage) -> None:
        record = {"reason": "loss is NaN", "step": 12, "names": ["fc1.weight", "ünïcödé/λ"], "ok": None}
        storage.write_json("control/stop.json", record)
        assert storage.read_json("control/stop.json") == record

    def test_read_json_many_gives_each_record_or_its_error_in_order(self, storage: Storage) -> None:
        """Opening a trial reads its index records this way: at once on remote storage."""
        records = {f"index/worker_0/{i:010d}.json": {"seq": i, "names": ["λ"] * i} for i in range(5)}
        for key, record in records.items():
            storage.write_json(key, record)
        storage.write_bytes("index/worker_0/bad.json", b"{not json")
        storage.list("index/worker_0")  # what a reader does first
        keys = [*reversed(records), "index/worker_0/missing.json", "index/worker_0/bad.json"]
        got = storage.read_json_many(keys)
        assert got[:5] == [records[k] for k in reversed(records)]
        assert isinstance(got[5], FileNotFoundError) and isinstance(got[6], ValueError)
        assert storage.read_json_many([]) == []

    def test_an_empty_file_reads_as_no_bytes(self, storage: Storage) -> None:
        """S3 has no byte 0 of an empty object to give a ranged read: it is still no bytes, and as a
        record it is not JSON (not a failed read)."""
        storage.write_bytes("control/stop.json", b"")
        assert storage.read_bytes("control/stop.json") == b""
        with pytest.raises(ValueError):
            storage.read_json("control/stop.json")
        (got,) = storage.read_json_many(["control/stop.json"])
        assert isinstance(got, ValueError)

    def test_a_record_larger_than_a_record_may_be_is_refused_unlisted(
        self, storage: Storage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The bound holds by what is read, whether or not a listing showed the file's size first."""
        monkeypatch.setattr(storage_module, "MAX_JSON_BYTES", 100)
        big, small = "index/worker_0/0000000000.json", "index/worker_0/0000000001.json"
        storage.write_json(big, {"names": ["x" * 200]})
        storage.write_json(small, {"names": ["x"]})
        got = storage.read_json_many([big, small])
        assert isinstance(got[0], ValueError) and "more than" in str(got[0])
        assert got[1] == {"names": ["x"]}
        with pytest.raises(ValueError, match="more than"):
            storage.read_json(big)

    def test_read_start_gives_the_first_bytes(self, storage: Storage) -> None:
        """What a record is read with: its first bytes, one more than a record may have (hunt 36 H36-5)."""
        storage.write_bytes("control/stop.json", b"0123456789")
        assert storage.read_start("control/stop.json", 4) == b"0123"
        assert storage.read_start("control/stop.json", 100) == b"0123456789"
        with pytest.raises(FileNotFoundError):
            storage.read_start("control/missing.json", 4)

    @pytest.mark.parametrize("key", ["missing.json", "no/such/folder/file.json"])
    def test_read_missing_raises_file_not_found(self, storage: Storage, key: str) -> None:
        storage.write_bytes("present.json", b"{}")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(key)
        with pytest.raises(FileNotFoundError):
            storage.read_json(key)
        with pytest.raises(FileNotFoundError):
            storage.local_path(key)
        with pytest.raises(FileNotFoundError):
            storage.open_ranges(key)

    @pytest.mark.parametrize("key", UNSAFE_KEYS)
    def test_keys_that_leave_the_root_are_refused(self, storage: Storage, key: str) -> None:
        """Keys may come from a trial written by a stranger (an index record's ``shard``)."""
        storage.write_bytes("present.json", b"{}")
        reads = (storage.read_bytes, storage.local_path, storage.open_ranges, storage.exists)
        for call in (*reads, storage.delete, storage.list):
            with pytest.raises(UnsafeKey):
                call(key)
        with pytest.raises(UnsafeKey):
            storage.delete_many([key, "present.json"])
        with pytest.raises(UnsafeKey):
            storage.write_bytes(key, b"x")
        with pytest.raises(UnsafeKey):  # refused before anything is read
            storage.read_json_many(["present.json", key])

    # ------------------------------------------------------------ listing
    def test_list_separates_files_and_folders(self, storage: Storage) -> None:
        for key in [*KEYS, "index/summary.json"]:
            storage.write_bytes(key, key.encode())
        assert storage.list("") == []
        assert storage.list_dirs("") == ["end", "index", "shards", "workers"]
        assert storage.list("index") == ["summary.json"]
        assert storage.list_dirs("index") == ["worker_0", "worker_1"]
        assert storage.list("index/worker_0") == ["0000000000.json"]
        assert storage.list_dirs("index/worker_0") == []
        assert storage.list("workers") == ["worker_0.json"]
        assert storage.list("missing") == []
        assert storage.list_dirs("missing") == []
        for prefix in ["", "index", "index/worker_0", "missing"]:  # both in one listing, as readers ask
            assert storage.entries(prefix) == (storage.list(prefix), storage.list_dirs(prefix))

    def test_list_is_sorted(self, storage: Storage) -> None:
        names = [f"{i:010d}.json" for i in (7, 0, 12, 3)]
        for name in names:
            storage.write_bytes(f"index/worker_0/{name}", b"{}")
        assert storage.list("index/worker_0") == sorted(names)

    def test_hidden_names_are_never_listed(self, storage: Storage) -> None:
        storage.write_bytes("index/worker_0/0000000000.json", b"{}")
        storage.write_bytes("index/worker_0/.0000000001.json.tmp", b"partial")
        storage.write_bytes("index/.staging/worker_0.json", b"{}")
        assert storage.list("index/worker_0") == ["0000000000.json"]
        assert storage.list_dirs("index") == ["worker_0"]
        assert storage.walk() == ["index/worker_0/0000000000.json"]

    def test_walk_lists_every_file(self, storage: Storage) -> None:
        for key in KEYS:
            storage.write_bytes(key, b"x")
        assert storage.walk() == sorted(KEYS)

    def test_writes_leave_no_temporary_files(self, storage: Storage, tmp_path: Path) -> None:
        storage.write_bytes("end/worker_0.json", b"{}")
        storage.write_bytes("end/worker_0.json", b"{}")
        storage.publish_file(self.staged_file(storage, b"shard"), "shards/worker_0/0000000000.h5")
        outside = tmp_path / "elsewhere.h5"
        outside.write_bytes(b"shard 2")
        storage.publish_file(str(outside), "shards/worker_0/0000000001.h5")
        assert self.raw_keys(storage) == [
            "end/worker_0.json",
            "shards/worker_0/0000000000.h5",
            "shards/worker_0/0000000001.h5",
        ]

    # ------------------------------------------------------------ delete
    def test_delete(self, storage: Storage) -> None:
        storage.write_bytes("end/worker_0.json", b"{}")
        storage.write_bytes("end/worker_1.json", b"{}")
        storage.delete("end/worker_0.json")
        assert not storage.exists("end/worker_0.json")
        assert storage.list("end") == ["worker_1.json"]
        storage.delete("end/worker_0.json")  # missing: no error
        storage.delete("never/was.json")
        assert storage.walk() == ["end/worker_1.json"]

    def test_delete_many(self, storage: Storage) -> None:
        """Each key asked for goes, and no other; a missing one is no error."""
        keys = ["index/worker_0/0000000000.json", "index/worker_0/0000000001.json", "shards/worker_0/0000000000.h5"]
        for key in keys:
            storage.write_bytes(key, b"x")
        storage.delete_many([*keys[:2], "never/was.json"])
        assert storage.walk() == keys[2:]
        storage.delete_many([])
        storage.delete_many(keys[2:])
        assert storage.walk() == []

    # ---------------------------------------------------------- publish
    def test_publish_file_moves_a_finished_file(self, storage: Storage) -> None:
        content = os.urandom(100_000)
        local = self.staged_file(storage, content)
        storage.publish_file(local, "shards/worker_0/0000000000.h5")
        assert not os.path.exists(local)
        assert storage.read_bytes("shards/worker_0/0000000000.h5") == content
        assert storage.list("shards/worker_0") == ["0000000000.h5"]

    def test_publish_file_from_another_directory(self, storage: Storage, tmp_path: Path) -> None:
        local = tmp_path / "shard.h5"
        local.write_bytes(b"whole shard")
        storage.publish_file(str(local), "shards/worker_3/0000000004.h5")
        assert not local.exists()
        assert storage.read_bytes("shards/worker_3/0000000004.h5") == b"whole shard"

    def test_local_path_opens_a_published_shard_with_h5py(self, storage: Storage) -> None:
        local = self.staged_file(storage, b"")
        data = np.arange(12, dtype=np.float32).reshape(3, 4)
        with h5py.File(local, "w") as f:
            f.create_dataset("data", data=data)
        storage.publish_file(local, "shards/worker_0/0000000000.h5")
        path = storage.local_path("shards/worker_0/0000000000.h5")
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["data"][()], data)
        assert storage.local_path("shards/worker_0/0000000000.h5") == path

    def test_open_ranges_reads_the_ranges_asked_for_and_says_when_the_file_ends(self, storage: Storage) -> None:
        content = bytes(range(256)) * 40
        storage.publish_file(self.staged_file(storage, content), "shards/worker_0/0000000001.h5")
        file = storage.open_ranges("shards/worker_0/0000000001.h5")
        try:
            assert file.size == len(content)
            out, near, far = bytearray(100), bytearray(3), bytearray(2)
            assert file.read_into([(5000, memoryview(out))]) and bytes(out) == content[5000:5100]
            assert file.read_into([(0, memoryview(near)), (7, memoryview(out)), (len(content) - 2, memoryview(far))])
            assert (bytes(near), bytes(out), bytes(far)) == (content[:3], content[7:107], content[-2:])
            assert not file.read_into([(len(content) - 10, memoryview(out))])  # 10 bytes left, 100 asked for
        finally:
            file.close()

    def test_files_read_inside_one_view_read_as_outside_it(self, storage: Storage) -> None:
        """``one_view`` (a reader of many tensors) may keep what it learns of published files; it nests,
        and a file is read the same inside it, twice, and after it."""
        content = bytes(range(256)) * 4
        key = "shards/worker_0/0000000001.h5"
        storage.publish_file(self.staged_file(storage, content), key)
        out = bytearray(8)
        with storage.one_view():
            for _ in range(2):
                with storage.one_view():
                    file = storage.open_ranges(key)
                    try:
                        assert file.size == len(content)
                        assert file.read_into([(500, memoryview(out))]) and bytes(out) == content[500:508]
                    finally:
                        file.close()
        assert Path(storage.local_path(key)).read_bytes() == content

    def test_a_file_published_again_is_never_read_stale(self, storage: Storage) -> None:
        """A trial overwritten (``if_exists="overwrite"``) publishes shards under the names of the old ones:
        ``local_path`` and ``open_ranges`` give the new content, not a copy of the old one kept by key."""
        key = "shards/worker_0/0000000000.h5"
        for content in (b"first run", b"second run, same key", b"third run, the same size"):
            storage.publish_file(self.staged_file(storage, content), key)
            assert Path(storage.local_path(key)).read_bytes() == content
            file = storage.open_ranges(key)
            try:
                out = bytearray(len(content))
                assert file.size == len(content) and file.read_into([(0, memoryview(out))]) and out == content
            finally:
                file.close()

    def test_listed_version_tells_a_file_written_again(self, storage: Storage) -> None:
        """``listed_version``, as a listing (or a local ``stat``) shows it, is None (not known) or another once
        the file is written again, its size the same (a reader takes an equal one for a file it need not read
        again)."""
        key = "workers/worker_0.json"
        versions = []
        for content in (b'{"run_id": "a"}', b'{"run_id": "b"}'):
            storage.write_bytes(key, content)
            assert storage.list("workers") == ["worker_0.json"]
            versions.append(storage.listed_version(key))
        assert versions[0] is None or versions[0] != versions[1]
        assert storage.listed_version("workers/worker_1.json") is None  # never listed

    # ------------------------------------------------------- atomicity
    def _check_whole_under_reads(self, storage: Storage, key: str, writes: list[Callable[[], bytes]]) -> None:
        """Run ``writes`` (each returns what it wrote) while another thread reads ``key``; every read is whole."""
        written: set[bytes] = set()
        bad: list[str] = []
        done = threading.Event()
        reads = 0

        def read_loop() -> None:
            nonlocal reads
            while not done.is_set():
                try:
                    if any(n.startswith(".") for n in storage.list(key.rsplit("/", 1)[0])):
                        bad.append("a hidden name was listed")
                    data = storage.read_bytes(key)
                except FileNotFoundError:
                    continue
                except Exception as exc:
                    bad.append(repr(exc))
                    return
                reads += 1
                if not data or data != payload(data[0], len(data)):
                    bad.append(f"a torn read of {len(data)} bytes")

        reader = threading.Thread(target=read_loop)
        reader.start()
        try:
            for write in writes:
                written.add(write())
        finally:
            done.set()
            reader.join()
        assert not bad, bad[:3]
        assert reads > 0
        assert storage.read_bytes(key) in written

    def test_replace_is_atomic_under_concurrent_reads(self, storage: Storage) -> None:
        key = "control/stop.json"

        def write(i: int) -> Callable[[], bytes]:
            def run() -> bytes:
                data = payload(65 + i % 26, 300_000 + 70_000 * (i % 3))
                storage.write_bytes(key, data)
                return data

            return run

        storage.write_bytes(key, payload(64, 10))
        self._check_whole_under_reads(storage, key, [write(i) for i in range(12)])

    def test_publish_is_atomic_under_concurrent_reads(self, storage: Storage) -> None:
        key = "shards/worker_0/0000000000.h5"

        def publish(i: int) -> Callable[[], bytes]:
            def run() -> bytes:
                data = payload(65 + i, 400_000 + 100_000 * i)
                storage.publish_file(self.staged_file(storage, data), key)
                return data

            return run

        storage.write_bytes(key, payload(64, 10))
        self._check_whole_under_reads(storage, key, [publish(i) for i in range(8)])

    # ---------------------------------------------------------- naming
    def test_create_json_writes_only_a_key_that_does_not_exist(self, storage: Storage) -> None:
        storage.makedirs()
        assert storage.create_json("workers/worker_0.json", {"run_id": "a"})
        assert not storage.create_json("workers/worker_0.json", {"run_id": "b"})
        assert storage.read_json("workers/worker_0.json") == {"run_id": "a"}
        assert self.raw_keys(storage) == ["workers/worker_0.json"]  # no temporary file left

    def test_create_json_is_exclusive_when_it_says_so(self, storage: Storage) -> None:
        """Of 8 threads creating one key at the same instant, exactly one succeeds."""
        if not storage.exclusive_create:
            pytest.skip(f"{type(storage).__name__} does not promise an exclusive create")
        storage.makedirs()
        barrier = threading.Barrier(8)
        won: list[bool] = []

        def create(i: int) -> None:
            barrier.wait()
            won.append(storage.create_json("workers/worker_0.json", {"i": i}))

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert won.count(True) == 1

    def test_url_and_repr_name_the_root(self, storage: Storage) -> None:
        assert isinstance(storage.url, str)
        assert storage.url in repr(storage)
        assert isinstance(storage.is_local, bool)
