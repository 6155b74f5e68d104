"""SPEC section 7 and 9 (untrusted trials): a trial from a stranger reads nothing outside itself,
never hangs, bounds what it allocates, and says what is wrong, naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import h5py
import numpy as np
import pytest
from helpers.hdf5_bytes import move_contiguous_data
from helpers.trials import logged_warnings, write_trial

import tensortap
from tensortap import TensorUnavailableForStep
from tensortap.backends import NotInTrial, get_storage
from tensortap.backends import storage as storage_module
from tensortap.backends.layout import FORMAT_VERSION, UnsafeKey, check_key
from tensortap.backends.shard import FORMAT_1 as FORMAT_1_VETTER
from tensortap.backends.shard import ShardError, ShardReader, crc32, raw_at_check
from tensortap.capture import ShardPolicy, Writer
from tensortap.cli import main
from tensortap.config import Collection, ReductionConfig
from tensortap.trial.check import _inspect_shards, _same_bits, find_problems
from tensortap.trial.trial import find_trials

SHARD = "shards/worker_0/0000000000.h5"
RECORD = "index/worker_0/0000000000.json"
FORMAT_1 = Path(__file__).parent / "data" / "trial_format_1"


def kernel(step: int) -> np.ndarray:
    return (np.arange(6, dtype=np.float32) + 0.5) * (step + 1)


def write(out: Path | str, steps: int = 2, pack_bytes: int = 0, **options: object) -> None:
    """A real trial: one shard of ``steps`` steps (``dense/kernel`` fixed, ``ragged`` ragged), each tensor in
    a group of its own (``/tensors/<id>``, which most tests craft) unless ``pack_bytes`` packs ``dense/kernel``."""
    policy = ShardPolicy(max_steps=100, pack_bytes=pack_bytes)
    with Writer(out, shard_policy=policy, storage_options=options or None) as w:  # type: ignore[arg-type]
        for step in range(steps):
            with w.stepping():
                w.save("dense/kernel", kernel(step), collections=["weights"])
                w.save("ragged", np.full(step + 1, step, dtype=np.int16), collections=["outputs"])


# the objects a test adds to a shard get checksummed headers, as the writer's (the reader refuses others):
# HDF5 2.0 (h5py 3.16) no longer takes that from the file it opens
CHECKSUMMED = {"libver": ("v110", "v110")}


def rewrite(out: Path, change: Callable[[h5py.File], object]) -> None:
    """Change the shard with h5py, then fix its index record's size, as a stranger crafting a trial would,
    and drop the record's ``raw_at`` (:func:`located_by_hdf5`)."""
    with h5py.File(out / SHARD, "r+", **CHECKSUMMED) as f:
        change(f)
    record = json.loads((out / RECORD).read_text())
    record["bytes"] = os.path.getsize(out / SHARD)
    (out / RECORD).write_text(json.dumps(record))
    located_by_hdf5(out)


def located_by_hdf5(out: Path) -> None:
    """Drop the ``raw_at`` of every tensor of the index record (a record of format 2.0): its values are
    then found through the shard's HDF5 structure, which the tests of that path craft."""
    record = json.loads((out / RECORD).read_text())
    for entry in record["tensors"].values():
        entry.pop("raw_at", None)
    (out / RECORD).write_text(json.dumps(record))


def read_all(out: Path | str, **options: object) -> tuple[dict[str, dict[int, np.ndarray]], list[str]]:
    """Every value a reader returns, and the warnings it gave."""
    with logged_warnings() as warned:
        trial = tensortap.create_trial(out, **options)
        values = {n: trial.tensor(n).values() for n in trial.tensor_names()}
    return values, warned


def on_object_storage(out: Path) -> str:
    """A copy of the trial folder ``out`` (its regular files) at a new ``memory://`` URL: read through the
    fsspec backend, as from an object store (range requests, downloads, sizes from the store)."""
    fs = fsspec.filesystem("memory")
    root = f"/untrusted-{uuid.uuid4().hex}"
    for path in sorted(out.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fs.pipe_file(f"{root}/{path.relative_to(out).as_posix()}", path.read_bytes())
    return f"memory://{root}"


def refused(out: Path, why: str, remote: bool = True) -> None:
    """The shard is skipped with one warning naming it and ``why``; ``check`` reports it. With ``remote``,
    the same from object storage (:func:`on_object_storage`)."""
    for where in [str(out), on_object_storage(out)] if remote else [str(out)]:
        values, warned = read_all(where)
        assert values == {"dense/kernel": {}, "ragged": {}}, where
        assert len(warned) == 1 and SHARD in warned[0] and why in warned[0], (where, warned)
        problems = find_problems(where)
        assert any(p.startswith(SHARD) and why in p for p in problems), (where, problems)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "2"])
def test_a_worker_record_of_a_newer_or_bad_format_version_is_refused_naming_it(version: object, tmp_path: Path) -> None:
    """format.md: readers refuse records of a newer format version, naming the file; a worker record of
    version 3 was read as if it were 2 (found by the second hostile-input audit, in format 2)."""
    write(tmp_path)
    worker = tmp_path / "workers" / "worker_0.json"
    record = json.loads(worker.read_text())
    record["format_version"] = version
    worker.write_text(json.dumps(record))
    if version == FORMAT_VERSION + 1:  # a newer tensortap wrote it: the trial is refused, saying so (session 47's hunt)
        with pytest.raises(tensortap.TrialTooNew, match=r"workers/worker_0\.json .*newer.*upgrade tensortap"):
            tensortap.create_trial(tmp_path)
        assert main(["ls", str(tmp_path)]) == 2
        return
    why = "'format_version' is not a positive integer"
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
        trial.workers()
    assert any("workers/worker_0.json" in w and why in w for w in warned), warned
    problems = find_problems(str(tmp_path))
    assert any(p.startswith("workers/worker_0.json") and why in p for p in problems), problems


def test_a_trial_a_newer_tensortap_wrote_is_refused_not_shown_empty(tmp_path: Path) -> None:
    """Every record of a newer format version was refused with a warning, and the trial then looked empty:
    `ls` said "no tensors", `export` "wrote 0 rows" (exit 0), `rules` that the training saved no step
    (session 47's compatibility hunt). Opening it raises TrialTooNew (exit 2), also for a live reader that
    meets such a record later."""
    write(tmp_path)
    trial = tensortap.create_trial(tmp_path)
    assert trial.steps() == [0, 1]
    record = json.loads((tmp_path / RECORD).read_text())
    record["format_version"] = FORMAT_VERSION + 1
    (tmp_path / RECORD).write_text(json.dumps(record))
    trial.refresh()  # read already: not read again
    fresh = tmp_path.parent / "fresh"
    shutil.copytree(tmp_path, fresh)
    with pytest.raises(
        tensortap.TrialTooNew, match=f"{RECORD} .*format version {FORMAT_VERSION + 1} is newer.*upgrade tensortap"
    ) as got:
        tensortap.create_trial(fresh)
    assert got.value.records.keys() == {RECORD}
    for command in (["ls"], ["export", "-o", str(tmp_path.parent / "out.csv")], ["rules"]):
        assert main([*command, str(fresh)]) == 2, command


def test_a_trial_refused_as_too_new_says_so_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hunt 49 F3: a trial whose index records a newer tensortap wrote logged one "skipping ..." warning per
    record (a run of 1,000 shards: 1,000 lines), then the one TrialTooNew error, which names the first and
    counts the others; nothing is skipped, the trial is refused whole. The error is all that is said now."""
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=1)) as w:  # a record per step
        for step in range(3):
            with w.stepping():
                w.save("x", np.float32(step))
    for record in (tmp_path / "index" / "worker_0").iterdir():
        record.write_text(json.dumps({**json.loads(record.read_text()), "format_version": FORMAT_VERSION + 1}))
    with logged_warnings() as warned, pytest.raises(tensortap.TrialTooNew, match=r"0000000000\.json and 2 more"):
        tensortap.create_trial(tmp_path)
    assert warned == []
    assert main(["ls", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "was written by a newer tensortap than this one" in err[0], err


# ---------------------------------------------------------------- keys and names
def traversal_record(target: str) -> dict[str, object]:
    return {
        "format": "tensortap-index",
        "format_version": 2,
        "worker": "worker_0",
        "seq": 0,
        "shard": target,
        "bytes": 5,
        "steps": [[0, 1, 0]],
        "tensors": {"x": {"id": 0, "collections": [], "dtype": "float32", "shape": [], "raw_steps": "*"}},
    }


def test_traversal_in_a_record_writes_nothing_outside_on_memory(tmp_path: Path) -> None:
    url = "memory://tensortap-traversal"
    storage = get_storage(url)
    storage.write_bytes("shards/worker_0/0000000000.h5", b"shard")
    storage.write_json(RECORD, traversal_record("../../../../" + str(tmp_path / "escaped" / "file").lstrip("/")))
    values, warned = read_all(url)
    assert values == {}
    assert len(warned) == 1 and RECORD in warned[0] and "'shard'" in warned[0]
    assert not (tmp_path / "escaped").exists()
    assert any(p.startswith(RECORD) for p in find_problems(url))


def test_a_worker_folder_with_an_unsafe_name_is_skipped(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "index" / "bad\\name").mkdir()
    (tmp_path / "index" / "bad\\name" / "0000000000.json").write_text("{}")
    values, warned = read_all(tmp_path)
    np.testing.assert_array_equal(values["dense/kernel"][0], kernel(0))
    assert len(warned) == 1 and "index/bad" in warned[0]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("index/notes:old", "its part 'notes:old' holds ':'"),
        ("index/../x", "its part '..' leads out of its folder"),
        ("/etc/passwd", "its part '' is empty"),
        ("index/a\\b", "its part 'a\\\\b' holds '\\\\'"),
        ("index/w\udcff/x", "its part 'w\\udcff' is not valid Unicode"),
    ],
)
def test_an_unsafe_key_is_refused_saying_what_is_wrong_with_its_part(key: str, why: str) -> None:
    """hunt 36 H36-8: the message names the part and its fault. Before, it said "absolute, '..' or an empty
    part" whatever the fault (a ':' of a timestamp)."""
    with pytest.raises(UnsafeKey, match=re.escape(f"{key!r} is not a valid key in a trial: {why}")):
        check_key(key)


# ---------------------------------------------------------------- nothing from outside the trial
def test_external_link_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    write(out)
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["secret"] = np.arange(12, dtype=np.float32).reshape(2, 6)

    def link(f: h5py.File) -> None:
        del f["tensors/0/data"]
        f["tensors/0/data"] = h5py.ExternalLink(str(outside), "secret")

    rewrite(out, link)
    values, warned = read_all(out)
    assert values["dense/kernel"] == {}
    assert any(SHARD in w and "ExternalLink" in w for w in warned)


def test_external_raw_storage_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    write(out)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(12, dtype=np.float32).tobytes())

    def external(f: h5py.File) -> None:
        del f["tensors/0/data"]
        f.create_dataset("tensors/0/data", shape=(2, 6), dtype=np.float32, external=[(str(secret), 0, 48)])

    rewrite(out, external)
    values, warned = read_all(out)
    assert values["dense/kernel"] == {}
    assert any(SHARD in w and "external raw storage" in w for w in warned)


def test_virtual_dataset_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    write(out)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["v"] = np.ones((2, 6), dtype=np.float32)

    def virtual(f: h5py.File) -> None:
        del f["tensors/0/data"]
        layout = h5py.VirtualLayout(shape=(2, 6), dtype=np.float32)
        layout[:] = h5py.VirtualSource(str(other), "v", shape=(2, 6))
        f.create_virtual_dataset("tensors/0/data", layout)

    rewrite(out, virtual)
    values, warned = read_all(out)
    assert values["dense/kernel"] == {}
    assert any(SHARD in w and "virtual dataset" in w for w in warned)


def test_symlinks_out_of_the_trial_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    write(out)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(out / SHARD, outside / "shard.h5")
    (out / SHARD).symlink_to(outside / "shard.h5")
    refused(out, "outside the trial", remote=False)  # object stores have no links
    shutil.move(out / RECORD, outside / "record.json")
    (out / RECORD).symlink_to(outside / "record.json")
    values, warned = read_all(out)
    assert values == {} and len(warned) == 1 and RECORD in warned[0] and "outside the trial" in warned[0]


def test_a_stop_request_is_never_written_through_a_link_out_of_the_trial(tmp_path: Path) -> None:
    """``tensortap rules --stop-training`` on a stranger's trial whose ``control`` folder links outside."""
    out, outside = tmp_path / "trial", tmp_path / "elsewhere"
    write_trial(out, 3)
    outside.mkdir()
    (out / "control").symlink_to(outside)
    trial = tensortap.create_trial(out)
    with pytest.raises(NotInTrial, match="'control' is a link that leads outside the trial"):
        trial.request_stop("a rule fired")
    assert list(outside.iterdir()) == []
    (out / "control").unlink()
    (out / "control").symlink_to(out / "shards")  # a link inside the trial is followed
    trial.request_stop("a rule fired")
    assert json.loads((out / "shards" / "stop.json").read_text())["reason"] == "a rule fired"


def test_overwriting_a_trial_deletes_nothing_through_a_link_out_of_it(tmp_path: Path) -> None:
    out, outside = tmp_path / "trial", tmp_path / "elsewhere"
    write_trial(out, 3)
    shutil.move(out / "index" / "worker_0", outside)
    (out / "index" / "worker_0").symlink_to(outside)
    kept = {p.name: p.read_bytes() for p in outside.iterdir()}
    with logged_warnings() as warned, Writer(out, if_exists="overwrite") as writer, writer.stepping():
        writer.save("a", np.zeros(2))  # capture is disabled, the training goes on
    assert any("'index/worker_0' is a link that leads outside the trial" in w for w in warned)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == kept


def test_a_search_for_trials_follows_no_link_out_of_the_folder(tmp_path: Path) -> None:
    folder, private = tmp_path / "stranger", tmp_path / "private"
    write_trial(folder / "run1", 2)
    write_trial(private / "secret", 2)
    (folder / "evil").symlink_to(private)
    (folder / "up").symlink_to(tmp_path)
    (folder / "again").symlink_to(folder / "run1")  # inside the folder: followed
    with logged_warnings() as warned:
        assert find_trials(get_storage(folder)) == ["again", "run1"]
    assert warned == [
        f"tensortap: {folder}/{name} not searched: a link that leads outside it (to {to})"
        for name, to in (("evil", private), ("up", tmp_path))
    ]


def test_a_folder_named_as_no_path_in_a_trial_may_be_is_named_and_the_other_trials_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 36 H36-8: a folder of the user's named with ':' (a run's timestamp) or a control character is not
    searched, named in one warning each; the other trials are listed, exit 0, and the trial in such a folder
    reads from its own path. Before, ``ls`` of the folder above failed whole (exit 2) with a wrong reason
    ("absolute, '..' or an empty part")."""
    write_trial(tmp_path / "good", 2)
    write_trial(tmp_path / "run-2024-01-01T10:30", 2)
    (tmp_path / "notes\x1b[1m").mkdir()
    with logged_warnings() as warned:
        assert main(["ls", str(tmp_path)]) == 0
    assert "good" in capsys.readouterr().out
    assert warned == [
        f"tensortap: {tmp_path}/{name} not searched: its name holds {held!r}, which no path in a trial may; "
        "give its path to read a trial there"
        for name, held in (("notes\x1b[1m", "\x1b"), ("run-2024-01-01T10:30", ":"))
    ]
    assert main(["ls", str(tmp_path / "run-2024-01-01T10:30")]) == 0


def test_a_symlink_inside_the_trial_reads(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "shards" / "copy.h5").write_bytes((tmp_path / SHARD).read_bytes())
    (tmp_path / SHARD).unlink()
    (tmp_path / SHARD).symlink_to(tmp_path / "shards" / "copy.h5")
    trial = tensortap.create_trial(tmp_path)
    np.testing.assert_array_equal(trial.tensor("dense/kernel").value(1), kernel(1))


def test_fifos_never_hang_the_reader_or_check(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / SHARD).unlink()
    os.mkfifo(tmp_path / SHARD)
    os.mkfifo(tmp_path / "index" / "worker_0" / "0000000001.json")
    values, warned = read_all(tmp_path)  # a FIFO opened for reading would block forever
    assert values == {"dense/kernel": {}, "ragged": {}}
    assert any("0000000001.json" in w and "not a regular file" in w for w in warned)
    assert any(SHARD in w and "not a regular file" in w for w in warned)
    problems = find_problems(str(tmp_path))
    assert sum("not a regular file" in p for p in problems) == 2, problems


def test_link_loops_are_skipped_naming_them_and_the_rest_read(tmp_path: Path) -> None:
    write(tmp_path)
    loops = ["index/loop", "index/worker_0/0000000001.json", "workers/loop.json"]
    for loop in loops:
        (tmp_path / loop).symlink_to(tmp_path / loop)  # a link to itself: ELOOP when followed
    values, warned = read_all(tmp_path)
    np.testing.assert_array_equal(values["dense/kernel"][1], kernel(1))
    trial = tensortap.create_trial(tmp_path)  # an unreadable worker record alone is no worker holding steps back
    assert trial.workers() == ["worker_0"] and trial.steps() == [0, 1], (trial.workers(), trial.steps())
    assert len(warned) == len(loops), warned
    for loop in loops:
        assert any(loop in w and "Too many levels of symbolic links" in w for w in warned), (loop, warned)
    problems = find_problems(str(tmp_path))
    assert sorted(p.split(":")[0] for p in problems) == sorted(loops), problems


@pytest.mark.parametrize("folder", ["empty", "link-loop"])
def test_an_index_folder_without_records_is_no_worker(folder: str, tmp_path: Path) -> None:
    """An empty or unreadable ``index/<name>/`` does not hold back every step as a worker that published
    nothing: a worker counts from its worker record, its end marker or its first index record."""
    write(tmp_path)
    if folder == "empty":
        (tmp_path / "index/worker_1").mkdir()
    else:
        (tmp_path / "index/worker_1").symlink_to(tmp_path / "index/worker_1")
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
        assert trial.workers() == ["worker_0"] and trial.steps() == [0, 1]
    assert len(warned) == (folder != "empty") and all("index/worker_1" in w for w in warned), warned
    (tmp_path / "workers/worker_1.json").write_text(
        (tmp_path / "workers/worker_0.json").read_text().replace("worker_0", "worker_1")
    )
    trial = tensortap.create_trial(tmp_path)  # a worker that has started and published nothing yet holds them back
    assert (
        trial.workers() == ["worker_0", "worker_1"]
        and trial.steps() == []
        and trial.steps(show_incomplete=True) == [0, 1]
    )


def without_root_override() -> list[str]:
    """The prefix of a command that runs without root's right to read any folder (none when not root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a folder without permissions stays readable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.parametrize("folder", ["index/worker_0", "shards/worker_0"])
def test_a_folder_that_cannot_be_read_is_named_never_taken_as_empty(folder: str, tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / folder).chmod(0)
    try:
        run = [*without_root_override(), sys.executable]
        checked = subprocess.run(
            [*run, "-m", "tensortap", "check", str(tmp_path)], capture_output=True, text=True, timeout=120
        )
        read = "t = tensortap.create_trial(sys.argv[1]); print([len(t.tensor(n).values()) for n in t.tensor_names()])"
        values = subprocess.run(
            [*run, "-c", f"import sys, tensortap; {read}", str(tmp_path)], capture_output=True, text=True, timeout=120
        )
    finally:
        (tmp_path / folder).chmod(0o755)
    assert checked.returncode == 1, checked
    assert f"{folder}: " in checked.stdout and "cannot be listed (Permission denied)" in checked.stdout
    assert values.returncode == 0 and values.stdout.strip() in ("[]", "[0, 0]"), values
    assert folder in values.stderr and "Permission denied" in values.stderr, values


# ---------------------------------------------------------------- declared sizes
def test_huge_declared_shape_in_a_tiny_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path)

    def huge(f: h5py.File) -> None:
        del f["tensors/0/data"]
        f.create_dataset("tensors/0/data", shape=(2, 1 << 36), dtype=np.float32, chunks=(1, 1 << 20))

    rewrite(tmp_path, huge)  # 512 GiB declared, no chunk stored: reading would allocate it all
    assert os.path.getsize(tmp_path / SHARD) < 100_000
    refused(tmp_path, "declares 549755813888 bytes")


def test_compressed_data_beyond_what_deflate_allows_is_refused(tmp_path: Path) -> None:
    write(tmp_path)

    def bomb(f: h5py.File) -> None:
        del f["tensors/0/data"]
        ds = f.create_dataset(
            "tensors/0/data", shape=(2, 1 << 28), dtype=np.uint8, chunks=(1, 1 << 20), compression="gzip"
        )
        ds[0, : 1 << 20] = 0  # one chunk stored (about 1 KiB); 512 MiB declared

    rewrite(tmp_path, bomb)
    refused(tmp_path, "declares 536870912 bytes")


def test_filters_tensortap_does_not_write_are_refused(tmp_path: Path) -> None:
    write(tmp_path)

    def scaleoffset(f: h5py.File) -> None:
        del f["tensors/0/data"]
        f.create_dataset("tensors/0/data", data=np.stack([kernel(0), kernel(1)]), scaleoffset=2)

    rewrite(tmp_path, scaleoffset)
    refused(tmp_path, "uses HDF5 filter")


def test_check_refuses_an_unreferenced_dataset_without_reading_it(tmp_path: Path) -> None:
    write(tmp_path)
    rewrite(tmp_path, lambda f: f.create_dataset("junk", shape=(1 << 40,), dtype=np.uint8, chunks=(1 << 20,)))
    trial = tensortap.create_trial(tmp_path)  # readers never look at it
    np.testing.assert_array_equal(trial.tensor("dense/kernel").value(0), kernel(0))
    assert find_problems(str(tmp_path)) == [
        f"{SHARD}: unreadable shard ({tmp_path / SHARD}: /junk is not part of the format (not read))"
    ]


def test_check_leaves_an_object_of_a_later_minor_version_unread(tmp_path: Path) -> None:
    """A later minor version of the format may add objects older readers ignore (format.md, Versioning):
    `check` called a shard of format 2.2 with one more dataset unreadable, and exited 1, while every reader
    read it (session 47's compatibility hunt). It leaves them unread there; in this version, still refuses."""
    write(tmp_path)

    def later(f: h5py.File) -> None:
        f.attrs.modify("format_minor", np.int64(f.attrs["format_minor"] + 1))
        added = np.arange(2, dtype=np.int64)
        f["steps"].create_dataset("added", data=added).attrs["crc32"] = np.uint32(crc32(added))

    rewrite(tmp_path, later)
    with tensortap.create_trial(tmp_path) as trial:
        np.testing.assert_array_equal(trial.tensor("dense/kernel").value(1), kernel(1))
    assert find_problems(str(tmp_path)) == []
    rewrite(tmp_path, lambda f: f.attrs.modify("format_minor", np.int64(f.attrs["format_minor"] - 1)))
    assert find_problems(str(tmp_path)) == [
        f"{SHARD}: unreadable shard ({tmp_path / SHARD}: /steps/added is not part of the format (not read))"
    ]


# ---------------------------------------------------------------- only numbers
@pytest.mark.parametrize(
    "make",
    [
        lambda f: f.create_dataset("tensors/0/data", data=np.array([b"abc", b"def"])),
        lambda f: f.create_dataset("tensors/0/data", data=["abc", "def"], dtype=h5py.string_dtype()),
        lambda f: f.create_dataset("tensors/0/data", data=np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])),
        lambda f: f.create_dataset("tensors/0/data", data=np.zeros(2, dtype="V8")),
        lambda f: f.create_dataset("tensors/0/data", shape=(2,), dtype=h5py.ref_dtype),
        lambda f: f.create_dataset("tensors/0/data", data=np.zeros(2, "i1"), dtype=h5py.enum_dtype({"a": 0}, "i1")),
    ],
    ids=["bytes", "strings", "compound", "opaque", "references", "enum"],
)
def test_non_numeric_values_are_refused(make: Callable[[h5py.File], object], tmp_path: Path) -> None:
    write(tmp_path)

    def replace(f: h5py.File) -> None:
        del f["tensors/0/data"]
        make(f)

    rewrite(tmp_path, replace)
    values, warned = read_all(tmp_path)
    assert values["dense/kernel"] == {}
    assert any(SHARD in w and "not allowed here (only numeric values)" in w for w in warned), warned


# ---------------------------------------------------------------- checksums
def value_offset(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["tensors/0/data"].id.get_offset())


def test_a_flipped_value_is_never_returned(tmp_path: Path) -> None:
    write(tmp_path)
    data = bytearray((tmp_path / SHARD).read_bytes())
    data[value_offset(tmp_path / SHARD) + 24 + 2] ^= 0x10  # a bit of the value of step 1
    (tmp_path / SHARD).write_bytes(bytes(data))
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
        with pytest.raises(TensorUnavailableForStep, match=SHARD):
            trial.tensor("dense/kernel").value(1)
    assert any("does not match its checksum" in w for w in warned), warned
    assert any("does not match its checksum" in p for p in find_problems(str(tmp_path)))


def test_a_flipped_value_fails_the_whole_read_of_its_shard(tmp_path: Path) -> None:
    write(tmp_path)
    data = bytearray((tmp_path / SHARD).read_bytes())
    data[value_offset(tmp_path / SHARD) + 24 + 2] ^= 0x10
    (tmp_path / SHARD).write_bytes(bytes(data))
    refused(tmp_path, "value 1 of tensor step 1 does not match its checksum")  # values(): one read per shard


# ---------------------------------------------------------------- where values are read from
def read_directly(shard: Path, name: str) -> bool:
    """Whether the reader reads the values of ``name`` from the file's bytes (not through HDF5)."""
    reader = ShardReader(str(shard))
    try:
        data = reader._values(name).data
        return data is not None and data.offset is not None
    finally:
        reader.close()


def test_values_pointed_at_other_bytes_of_the_shard_are_never_returned(tmp_path: Path) -> None:
    write(tmp_path)
    located_by_hdf5(tmp_path)
    assert read_directly(tmp_path / SHARD, "dense/kernel")
    move_contiguous_data(tmp_path / SHARD, "tensors/0/data", 8)  # the superblock's bytes, within the file
    assert read_directly(tmp_path / SHARD, "dense/kernel")
    refused(tmp_path, "value 0 of tensor step 0 does not match its checksum")
    with logged_warnings() as warned:
        with pytest.raises(TensorUnavailableForStep, match=SHARD):
            tensortap.create_trial(tmp_path).tensor("dense/kernel").value(1)
    assert len(warned) == 1 and "value 1 of tensor step 1 does not match its checksum" in warned[0], warned


@pytest.mark.parametrize("past_the_end", [8, 1 << 40])
def test_values_pointed_past_the_end_of_the_shard_are_refused_unread(past_the_end: int, tmp_path: Path) -> None:
    write(tmp_path)
    located_by_hdf5(tmp_path)
    size = (tmp_path / SHARD).stat().st_size
    move_contiguous_data(tmp_path / SHARD, "tensors/0/data", size + past_the_end - 48)  # its 48 bytes cross the end
    # HDF5 1.14.4 (h5py 3.12) refuses to open the dataset; an older one opens it, and the reader refuses it
    refused(tmp_path, "cannot read shard" if h5py.version.hdf5_version_tuple >= (1, 14, 4) else "not inside the file")


# ---------------------------------------------------------------- values read where the record says (raw_at)
def raw_at(out: Path, name: str = "dense/kernel") -> dict[str, Any]:
    return json.loads((out / RECORD).read_text())["tensors"][name]["raw_at"]


def set_raw_at(out: Path, recheck: bool = True, name: str = "dense/kernel", **changes: Any) -> None:
    """Change fields of the ``raw_at`` of ``name`` (and of its entry: ``shape``, ``raw_steps``); with
    ``recheck``, compute its ``check`` again, as a stranger who knows the format would."""
    record = json.loads((out / RECORD).read_text())
    entry = record["tensors"][name]
    for key in ("shape", "raw_steps"):
        if key in changes:
            entry[key] = changes.pop(key)
    entry["raw_at"].update(changes)
    if recheck:
        at = entry["raw_at"]
        steps = np.array([s for s, _, _ in record["steps"]] if entry["raw_steps"] == "*" else entry["raw_steps"])
        at["check"] = raw_at_check(name, np.dtype(at["dtype"]), entry["shape"], steps, at["data"], at["crc32"])
    (out / RECORD).write_text(json.dumps(record))


def test_values_are_read_where_the_record_says_without_hdf5(tmp_path: Path) -> None:
    """A fixed-layout tensor of integers or floats is read at the offsets its index record gives, its
    values verified; HDF5 is not needed for it: with the file's HDF5 signature gone, it still reads, and
    the ragged tensor (no ``raw_at``) is refused with the shard."""
    write(tmp_path, steps=3)
    at = raw_at(tmp_path)
    assert at["dtype"] == "<f4" and at["data"] == value_offset(tmp_path / SHARD)
    assert "raw_at" not in json.loads((tmp_path / RECORD).read_text())["tensors"]["ragged"]
    data = bytearray((tmp_path / SHARD).read_bytes())
    data[:8] = bytes(8)
    (tmp_path / SHARD).write_bytes(bytes(data))
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
        values = trial.tensor("dense/kernel").values()
        assert sorted(values) == [0, 1, 2]
        for step, value in values.items():
            assert value.tobytes() == kernel(step).tobytes() and value.dtype == np.float32
        assert trial.tensor("dense/kernel").value(1).tobytes() == kernel(1).tobytes()
        assert trial.tensor("ragged").values() == {}
    assert len(warned) == 1 and SHARD in warned[0] and "HDF5" in warned[0], warned
    assert any(p.startswith(SHARD) for p in find_problems(str(tmp_path)))


@pytest.mark.parametrize(
    "change",
    [
        {"data": 8},
        {"crc32": 8},
        {"dtype": "<i4"},
        {"shape": [3]},
        {"raw_steps": [0]},
    ],
    ids=["data", "crc32", "dtype", "shape", "steps"],
)
def test_a_damaged_raw_at_is_refused_naming_its_shard(change: dict[str, Any], tmp_path: Path) -> None:
    """A record whose ``raw_at`` or the entry fields it depends on changed (a bit flip, an edit without
    the check) is never read as other bytes or other steps: the shard is refused, naming why."""
    write(tmp_path)
    set_raw_at(tmp_path, recheck=False, **change)
    values, warned = read_all(tmp_path)
    assert values["dense/kernel"] == {}
    why = "raw_at of 'dense/kernel' does not match its check"  # not the values' checksums: refused before a read
    assert any(SHARD in w and why in w for w in warned), warned
    assert any(why in p for p in find_problems(str(tmp_path)))


@pytest.mark.parametrize("where", ["superblock", "checksums-on-values"])
def test_a_raw_at_pointed_at_other_bytes_of_the_shard_is_never_returned(where: str, tmp_path: Path) -> None:
    """With a check that matches: the values at the superblock's bytes, or the checksums read from the
    values' own bytes."""
    write(tmp_path)
    set_raw_at(tmp_path, **({"data": 8} if where == "superblock" else {"crc32": raw_at(tmp_path)["data"]}))
    values, warned = read_all(tmp_path)
    assert values["dense/kernel"] == {}
    assert any("value 0 of tensor step 0 does not match its checksum" in w for w in warned), warned


@pytest.mark.parametrize(
    "change",
    [{"data": 1 << 40}, {"crc32": 1 << 40}, {"shape": [1 << 40]}, {"shape": [1 << 20, 1 << 20, 1 << 20]}],
    ids=["data", "crc32", "shape", "huge-shape"],
)
def test_a_raw_at_past_the_end_of_the_shard_is_refused_unread(change: dict[str, Any], tmp_path: Path) -> None:
    """Whatever the record declares, what is read is bounded by the file's size (nothing is allocated), on
    object storage too (range requests bounded by the size the store reports)."""
    write(tmp_path)
    set_raw_at(tmp_path, **change)
    for where in (str(tmp_path), on_object_storage(tmp_path)):
        values, warned = read_all(where)
        assert values["dense/kernel"] == {}
        assert any(SHARD in w and "would lie past the end of the file" in w for w in warned), (where, warned)


def test_check_reports_a_raw_at_that_gives_other_values_than_the_shard_holds(tmp_path: Path) -> None:
    """The shard's names swapped (with a valid checksum), the record left as it was: its ``raw_at`` of
    ``dense/kernel`` still gives the values stored under that name before. Readers read what the
    record says; ``tensortap check`` compares it with what HDF5 reads under the name and reports it."""
    write(tmp_path, steps=3)
    names = np.frombuffer(json.dumps(["ragged", "dense/kernel"]).encode(), dtype=np.uint8)
    with h5py.File(tmp_path / SHARD, "r+", **CHECKSUMMED) as f:
        del f["names"]
        f["names"] = names
        f["names"].attrs["crc32"] = np.uint32(crc32(names))
    record = json.loads((tmp_path / RECORD).read_text())
    record["bytes"] = os.path.getsize(tmp_path / SHARD)
    (tmp_path / RECORD).write_text(json.dumps(record))
    assert tensortap.create_trial(tmp_path).tensor("dense/kernel").value(2).tobytes() == kernel(2).tobytes()
    problems = find_problems(str(tmp_path))
    assert len(problems) == 1 and "raw_at of 'dense/kernel' does not give the values the shard holds" in problems[0]


@pytest.mark.parametrize("pack_bytes", [0, 1 << 20], ids=["grouped", "packed"])
def test_a_raw_at_of_the_other_byte_order_than_its_shard_gives_no_second_value(pack_bytes: int, tmp_path: Path) -> None:
    """The record's ``raw_at`` says ``>f4`` for the shard's ``<f4`` values, its check made to match as a
    stranger would (hunt 21, F4). Read where the record says, a value is those bytes as ``>f4``; through HDF5 it
    was the shard's ``<f4``, so a step's value depended on the way it was read (``histogram_values``; a shard's
    second value on object storage, read from the downloaded shard). Read through HDF5, the shard is refused
    as disagreeing with its record, with one warning naming both; ``check`` reports it."""
    write(tmp_path, steps=3, pack_bytes=pack_bytes)
    set_raw_at(tmp_path, dtype=">f4")
    recorded = {step: kernel(step).view(">f4") for step in range(3)}  # the record's reading of the same bytes
    why = "says the values of 'dense/kernel' are >f4 where they lie (raw_at); the shard holds <f4"
    with logged_warnings() as warned:
        tensor = tensortap.create_trial(tmp_path).tensor("dense/kernel")
        assert tensor.value(1).dtype == ">f4" and tensor.value(1).tobytes() == recorded[1].tobytes()
        assert tensor.histogram_values() == {}  # binned from the values HDF5 reads: the shard is refused
    with logged_warnings() as warned_remote:
        tensor = tensortap.create_trial(on_object_storage(tmp_path)).tensor("dense/kernel")
        assert tensor.value(0).tobytes() == recorded[0].tobytes()  # by range, where the record says
        with pytest.raises(TensorUnavailableForStep, match=re.escape(why)):
            tensor.value(1)  # then from the downloaded shard, through HDF5
    for said in (warned, warned_remote):
        assert len(said) == 1 and f"{SHARD}: {RECORD} {why}" in said[0], said
    problems = find_problems(str(tmp_path))
    assert [p.split(":")[0] for p in problems] == [SHARD], problems
    assert "raw_at of 'dense/kernel' does not give the values the shard holds" in problems[0], problems


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "complex128", "int8"])
def test_check_compares_located_values_bit_for_bit(dtype: str) -> None:
    """What ``raw_at`` gives and what HDF5 reads must hold the same bits: a NaN matches itself, a
    negative zero does not match a zero, whatever the item size."""
    a = np.zeros((3, 4), dtype=dtype)
    if a.dtype.kind in "fc":
        a[1, 2] = np.nan
    b = a.copy()
    assert _same_bits(a, b)
    b[2, 3] = -0.0 if a.dtype.kind in "fc" else 1
    assert not _same_bits(a, b)


def rewrite_values(f: h5py.File, values: np.ndarray, **options: Any) -> None:
    """Replace ``dense/kernel``'s values with ``values`` stored with ``options``, and their checksums."""
    del f["tensors/0/data"], f["tensors/0/crc32"]
    f.create_dataset("tensors/0/data", data=values, **options)
    f.create_dataset("tensors/0/crc32", data=[crc32(v) for v in f["tensors/0/data"][()]], dtype=np.uint32)


def compact() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    return dcpl


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        ("<f4", {}),
        (">f4", {}),
        ("<f4", {"chunks": (1, 6)}),
        ("<f4", {"chunks": (1, 3), "compression": "gzip"}),
        ("<f4", {"dcpl": compact()}),
        ("<f8", {}),
    ],
    ids=["contiguous", "big-endian", "chunked", "gzip", "compact", "float64"],
)
def test_every_storage_of_values_reads_the_same(dtype: str, options: dict[str, Any], tmp_path: Path) -> None:
    write(tmp_path, steps=3)
    stored = np.stack([kernel(s) for s in range(3)]).astype(dtype)
    rewrite(tmp_path, lambda f: rewrite_values(f, stored, **options))
    # a record that declares what the shard holds (a record declaring another dtype is refused)
    record = json.loads((tmp_path / RECORD).read_text())
    record["tensors"]["dense/kernel"]["dtype"] = str(stored.dtype.newbyteorder("="))
    (tmp_path / RECORD).write_text(json.dumps(record))
    assert read_directly(tmp_path / SHARD, "dense/kernel") == (not options and dtype in ("<f4", "<f8", ">f4"))
    trial = tensortap.create_trial(tmp_path)
    tensor = trial.tensor("dense/kernel")
    for step, value in tensor.values().items():
        assert value.dtype == np.dtype(dtype) and value.tobytes() == stored[step].tobytes()
    for step in range(3):
        assert tensor.value(step).dtype == np.dtype(dtype) and tensor.value(step).tobytes() == stored[step].tobytes()
    np.testing.assert_array_equal(trial.tensor("ragged").value(2), np.full(3, 2, dtype=np.int16))


@pytest.mark.parametrize(
    ("obj", "name", "why"),
    [
        ("/", "format_version", "attribute 'format_version' of / is not a single value"),
        ("tensors/0/steps", "crc32", "attribute 'crc32' of /tensors/0/steps is not a single value"),
    ],
)
def test_an_attribute_of_many_values_is_refused_unread(obj: str, name: str, why: str, tmp_path: Path) -> None:
    write(tmp_path)

    def many(f: h5py.File) -> None:
        f[obj].attrs[name] = np.full(64, f[obj].attrs[name])  # read into one value's room, it would overrun it

    rewrite(tmp_path, many)
    refused(tmp_path, why)


def test_a_shard_open_elsewhere_meanwhile_still_reads(tmp_path: Path) -> None:
    write(tmp_path)
    with tensortap.create_trial(tmp_path) as trial:
        with h5py.File(tmp_path / SHARD, "r") as f:  # the same file, opened by h5py's defaults while the trial has it
            np.testing.assert_array_equal(trial.tensor("dense/kernel").value(1), kernel(1))
            np.testing.assert_array_equal(f["tensors/0/data"][1], kernel(1))
    with h5py.File(tmp_path / SHARD, "r") as f, tensortap.create_trial(tmp_path) as trial:
        np.testing.assert_array_equal(trial.tensor("dense/kernel").values()[0], kernel(0))
        np.testing.assert_array_equal(f["tensors/0/data"][0], kernel(0))
    first, second = tensortap.create_trial(tmp_path), tensortap.create_trial(tmp_path)  # HDF5 shares the open file
    np.testing.assert_array_equal(first.tensor("dense/kernel").value(0), kernel(0))
    np.testing.assert_array_equal(second.tensor("dense/kernel").value(0), kernel(0))
    first.close()
    np.testing.assert_array_equal(second.tensor("dense/kernel").value(1), kernel(1))
    second.close()


def test_a_truncated_shard_is_refused_before_hdf5_opens_it(tmp_path: Path) -> None:
    write(tmp_path)
    data = (tmp_path / SHARD).read_bytes()
    (tmp_path / SHARD).write_bytes(data[: len(data) - 100])
    refused(tmp_path, "its index record says")
    with pytest.raises(ShardError, match="superblock says"):
        ShardReader(str(tmp_path / SHARD))


def test_format_1_trials_still_read() -> None:
    trial = tensortap.create_trial(FORMAT_1)
    assert trial.steps() == [0, 1, 2]
    for step in range(3):
        np.testing.assert_array_equal(trial.tensor("dense/kernel").value(step), kernel(step))
        np.testing.assert_array_equal(trial.tensor("ragged").value(step), np.full(step + 1, step, dtype=np.int16))
    assert find_problems(str(FORMAT_1)) == []


FORMAT_2 = Path(__file__).parent / "data" / "trial_format_2"


def test_format_2_trials_still_read() -> None:
    """A trial tensortap wrote in format 2.1 (137c081, before packed tensors): every tensor in a group of its
    own, fixed, ragged, bool, bfloat16, reductions only, histograms."""
    trial = tensortap.create_trial(FORMAT_2)
    assert trial.steps() == [0, 1, 2]
    for step in range(3):
        np.testing.assert_array_equal(trial.tensor("dense/kernel").value(step), kernel(step))
        np.testing.assert_array_equal(trial.tensor("ragged").value(step), np.full(step + 1, step, dtype=np.int16))
        np.testing.assert_array_equal(trial.tensor("flags").value(step), [True, step % 2 == 0])
        np.testing.assert_array_equal(trial.tensor("half").value(step), np.array([1.5, -2.0]) * (step + 1))
        assert trial.tensor("losses/loss").value(step) == 1.0 / (step + 1)
        assert trial.tensor("grad").reduction_value(step, "mean") == 1.5 - step
        assert trial.tensor("hidden").histogram_value(step)[1].sum() == 8
    assert find_problems(str(FORMAT_2)) == []


# ---------------------------------------------------------------- packed tensors (format 3)
def rewrite_meta(out: Path, change: Callable[[list[Any]], Any]) -> None:
    """Replace ``/packed/meta`` of the shard by what ``change`` makes of it, with a matching checksum, as a
    stranger crafting a trial would (:func:`rewrite`)."""

    def edit(f: h5py.File) -> None:
        meta = change(json.loads(f["packed/meta"][()].tobytes()))
        raw = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        del f["packed/meta"]
        f.create_dataset("packed/meta", data=raw).attrs["crc32"] = np.uint32(crc32(raw))

    rewrite(out, edit)


def same_values(got: dict[str, dict[int, np.ndarray]], want: dict[str, dict[int, np.ndarray]]) -> bool:
    return got.keys() == want.keys() and all(
        got[n].keys() == want[n].keys() and all(np.array_equal(got[n][s], want[n][s]) for s in want[n]) for n in want
    )


def test_packed_tensors_read_as_grouped_ones_with_and_without_hdf5(tmp_path: Path) -> None:
    want = {"dense/kernel": {s: kernel(s) for s in range(3)}, "ragged": {s: np.full(s + 1, s, "i2") for s in range(3)}}
    for packed in (True, False):
        out = tmp_path / str(packed)
        write(out, steps=3, pack_bytes=1 << 20 if packed else 0)
        with h5py.File(out / SHARD, "r") as f:
            assert ("0" not in f["tensors"]) == packed and "1" in f["tensors"]  # ragged: never packed
        for located in (True, False):
            if not located:
                located_by_hdf5(out)
            values, warned = read_all(out)
            assert not warned and same_values(values, want), (packed, located)
        assert find_problems(str(out)) == []


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda m: {"0": m[0]}, "/packed/meta is not a list"),
        (lambda m: [{**m[0], "id": 2}], "/packed/meta[0] is not an object with the id of a tensor of /names"),
        (lambda m: [{**m[0], "id": True}], "/packed/meta[0] is not an object with the id"),
        (lambda m: [m[0], m[0]], "/packed/meta lists tensor 0 twice"),
        (lambda m: [{**m[0], "dtype": "|b1"}], "dtype '|b1' is not an integer or float type code"),
        (lambda m: [{**m[0], "dtype": "<c8"}], "dtype '<c8' is not an integer or float type code"),
        (lambda m: [{**m[0], "dtype": "V48"}], "dtype 'V48' is not an integer or float type code"),
        (lambda m: [{**m[0], "shape": [-6]}], "shape [-6] is not a list of sizes"),
        (lambda m: [{**m[0], "shape": [1] * 65}], "is not a list of sizes"),
        (lambda m: [{**m[0], "rows": [0, 3]}], "its values lie outside /packed (rows [0, 3]"),
        (lambda m: [{**m[0], "rows": [0]}], "rows [0] is not [first, count]"),
        (lambda m: [{**m[0], "offset": 8}], "its values lie outside /packed (rows [0, 2], offset 8)"),
        (lambda m: [{**m[0], "offset": 1 << 62}], "its values lie outside /packed"),
        (lambda m: [{**m[0], "shape": [1 << 61]}], "its values lie outside /packed"),
        (lambda m: [{**m[0], "rows": [0, 1]}], "/packed: the tensors' values do not fill its tables one after another"),
        (lambda m: [{**m[0], "shape": [3]}], "/packed: the tensors' values do not fill its tables one after another"),
        (lambda m: [m[0], {**m[0], "id": 1}], "/packed: the tensors' values do not fill its tables one after another"),
    ],
    ids=[
        *("not-a-list", "id-out-of-range", "id-bool", "twice", "bool", "complex", "void", "negative-shape"),
        *("65-dims", "rows-past-steps", "rows-one", "offset-past-data", "offset-huge", "shape-huge"),
        *("half-the-rows", "half-the-bytes", "two-claim-the-same-rows"),
    ],
)
def test_a_packed_table_that_lies_is_refused_naming_the_shard(
    change: Callable[[list[Any]], Any], why: str, tmp_path: Path
) -> None:
    write(tmp_path, pack_bytes=1 << 20)
    rewrite_meta(tmp_path, change)
    refused(tmp_path, why)


def test_a_packed_value_that_changed_is_never_returned(tmp_path: Path) -> None:
    write(tmp_path, pack_bytes=1 << 20)
    with h5py.File(tmp_path / SHARD, "r") as f:
        start = int(f["packed/data"].id.get_offset())
    data = bytearray((tmp_path / SHARD).read_bytes())
    data[start + 24 + 2] ^= 0x10  # a bit of the value of step 1
    (tmp_path / SHARD).write_bytes(bytes(data))
    for located in (True, False):  # where the record says, then through HDF5
        if not located:
            located_by_hdf5(tmp_path)
        with logged_warnings() as warned:
            trial = tensortap.create_trial(tmp_path)
            np.testing.assert_array_equal(trial.tensor("dense/kernel").value(0), kernel(0))
            with pytest.raises(TensorUnavailableForStep, match=SHARD):
                trial.tensor("dense/kernel").value(1)
        assert any("of tensor step 1 does not match its checksum" in w for w in warned), warned
    assert any("does not match its checksum" in p for p in find_problems(str(tmp_path)))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda f: f.__delitem__("packed"), "/packed is missing"),
        (
            lambda f: (
                f.create_dataset("packed/x", data=f.pop("packed/data")[()], chunks=(8,), compression="gzip")
                and f.move("packed/x", "packed/data")
            ),
            "/packed/data is not stored contiguously as its bytes",
        ),
        (
            lambda f: (
                f.create_dataset("packed/x", data=f.pop("packed/crc32")[()][:1]) and f.move("packed/x", "packed/crc32")
            ),
            "/packed/crc32 has 1 checksums for 2 steps",
        ),
    ],
    ids=["no-packed-group", "compressed-data", "one-checksum"],
)
def test_a_packed_table_missing_or_stored_otherwise_is_refused(
    change: Callable[[h5py.File], object], why: str, tmp_path: Path
) -> None:
    write(tmp_path, pack_bytes=1 << 20)
    rewrite(tmp_path, change)
    refused(tmp_path, why)


EITHER = "collections or orig_dtype"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda m: [{**m[0], "junk": "A" * 1000}], "/packed/meta[0]: key 'junk' not as the format says"),
        (lambda m: [{**m[0], "collections": 17}], f"/packed/meta[0]: {EITHER} not as the format says"),
        (lambda m: [{**m[0], "collections": [1]}], "/packed/meta[0]: collections not as the format says"),
        (lambda m: [{**m[0], "orig_dtype": ["x"]}], f"/packed/meta[0]: {EITHER} not as the format says"),
    ],
    ids=["unknown-key", "collections-int", "collections-of-ints", "orig-dtype-list"],
)
def test_check_refuses_packed_meta_the_format_does_not_define(
    change: Callable[[list[Any]], Any], why: str, tmp_path: Path
) -> None:
    """Readers take collections and orig_dtype from the index record and read such a shard; ``check`` said it
    had no problem (session 49's hunt 21)."""
    write(tmp_path, pack_bytes=1 << 20)
    rewrite_meta(tmp_path, change)
    values, warned = read_all(tmp_path)
    assert not warned and same_values({"k": values["dense/kernel"]}, {"k": {0: kernel(0), 1: kernel(1)}})
    assert find_problems(str(tmp_path)) == [f"{SHARD}: unreadable shard ({tmp_path / SHARD}: {why})"]


def test_check_refuses_a_tensor_both_packed_and_in_a_group(tmp_path: Path) -> None:
    write(tmp_path, pack_bytes=1 << 20)
    rewrite(tmp_path, lambda f: f["tensors"].create_group("0"))
    values, _ = read_all(tmp_path)  # readers look for a group first: this one holds no values
    assert values["dense/kernel"] == {}
    assert find_problems(str(tmp_path)) == [
        f"{SHARD}: unreadable shard ({tmp_path / SHARD}: /tensors/0 is not part of the format (not read))"
    ]


# ---------------------------------------------------------------- malformed records
@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.pop("steps"),
        lambda r: r.update(steps="0,1"),
        lambda r: r.update(steps=[[0, 9, 0]]),
        lambda r: r.update(tensors=[]),
        lambda r: r.update(seq=True),
        lambda r: r.update(worker="worker_1"),
        lambda r: r.update(
            steps=[], wall_times=[], tensors={n: {**e, "raw_at": None} for n, e in r["tensors"].items()}
        ),
        lambda r: r.update(seq=1 << 63),
    ],
    ids=["missing", "wrong-type", "bad-mode", "tensors-list", "bool", "worker", "no-steps", "seq-beyond-int64"],
)
def test_a_malformed_record_is_skipped_and_reported(change: Callable[[dict], object], tmp_path: Path) -> None:
    write(tmp_path)
    record = json.loads((tmp_path / RECORD).read_text())
    change(record)
    (tmp_path / RECORD).write_text(json.dumps(record))
    values, warned = read_all(tmp_path)
    assert values == {}
    assert len(warned) == 1 and RECORD in warned[0] and "not a valid index record" in warned[0]
    assert [p.split(":")[0] for p in find_problems(str(tmp_path))] == [RECORD]


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e.update(raw_steps=[99]),
        lambda e: e.update(shape="6"),
        lambda e: e.update(raw_at=[0, 0, 0]),
        lambda e: e["raw_at"].update(dtype="float32"),
        lambda e: e["raw_at"].update(dtype="|b1"),
        lambda e: e["raw_at"].update(dtype="<f16"),
        lambda e: e["raw_at"].update(data=-1),
        lambda e: e["raw_at"].update(check=1 << 32),
        lambda e: e.pop("raw_steps"),
        lambda e: e.update(raw_steps=[], raw_at=None) and None,
        lambda e: e["raw_at"].update(data=1 << 63),
        lambda e: e["raw_at"].update(crc32=1 << 64),
        lambda e: e.update(shape=[1 << 64, 3]),
        lambda e: e.update(reductions=["max", "__class__"]),
        lambda e: e.update(reductions=["abs_<b>x</b>"]),
        lambda e: e.update(reductions=[["max"]]),
    ],
    ids=[
        *("foreign-step", "shape-str", "raw_at-list", "raw_at-dtype-name", "raw_at-bool", "raw_at-longdouble"),
        *("raw_at-negative", "raw_at-check", "raw_at-no-steps", "tensor-at-no-step", "raw_at-beyond-int64"),
        *("crc32-beyond-int64", "shape-beyond-int64", "reduction-unknown", "reduction-abs-unknown"),
        "reduction-list",
    ],
)
def test_a_malformed_record_entry_is_refused_alone_and_reported(
    change: Callable[[dict], object], tmp_path: Path
) -> None:
    """An entry of ``tensors`` stands alone (its id, steps and ``raw_at``): refused, it loses only its tensor.
    hunt 36 H36-9: reductions are among the keys the format defines (before, ``"__class__"`` passed ``check``)."""
    write(tmp_path)
    record = json.loads((tmp_path / RECORD).read_text())
    change(record["tensors"]["dense/kernel"])
    (tmp_path / RECORD).write_text(json.dumps(record))
    values, warned = read_all(tmp_path)
    assert list(values) == ["ragged"] and sorted(values["ragged"]) == [0, 1]
    assert len(warned) == 1 and RECORD in warned[0] and "refused tensor 'dense/kernel'" in warned[0], warned
    assert SHARD in warned[0]
    assert [p.split(":")[0] for p in find_problems(str(tmp_path))] == [RECORD]


def test_a_tensor_name_that_is_not_valid_unicode_is_refused_alone_and_reported(tmp_path: Path) -> None:
    """hunt 36 H36-6: a tensor named with a lone surrogate (``"evil\\ud800name"``: valid escaped JSON, in the record
    and the shard's ``/names`` alike) is refused alone, as the writer refuses the name; the other tensors read,
    export and ``check`` reports it. Before, it passed ``check`` and then broke export (``'utf-8' codec can't
    encode``), report, plot and ``to_pandas`` for the whole trial."""
    write(tmp_path)
    names = json.dumps(["evil\ud800name", "ragged"]).encode()

    def rename(f: h5py.File) -> None:
        del f["names"]
        f.create_dataset("names", data=np.frombuffer(names, np.uint8)).attrs.create(
            "crc32", crc32(names), dtype=np.uint32
        )

    rewrite(tmp_path, rename)
    record = json.loads((tmp_path / RECORD).read_text())
    record["tensors"]["evil\ud800name"] = record["tensors"].pop("dense/kernel")
    (tmp_path / RECORD).write_text(json.dumps(record))
    values, warned = read_all(tmp_path)
    assert list(values) == ["ragged"] and sorted(values["ragged"]) == [0, 1]
    assert len(warned) == 1 and "refused tensor 'evil\\ud800name' (its name is not valid Unicode)" in warned[0]
    assert [p.split(":")[0] for p in find_problems(str(tmp_path))] == [RECORD]
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "out.csv")]) == 0
    assert "ragged" in (tmp_path / "out.csv").read_text()


def test_a_worker_folder_named_with_a_byte_that_is_not_utf_8_is_skipped_and_reported(tmp_path: Path) -> None:
    """hunt 36 H36-6: a worker folder whose name is not UTF-8 (``w\\xff``, listed as ``"w\\udcff"``) is skipped with
    one warning naming it and reported by ``check``; the other worker reads and exports. Before, ``check`` said
    ok and export and report failed for the whole trial (``'utf-8' codec can't encode``)."""
    write(tmp_path)
    record = json.loads((tmp_path / RECORD).read_text())
    record.update(worker="w\udcff", shard="shards/w\udcff/0000000000.h5")
    (tmp_path / "index" / "w\udcff").mkdir()
    (tmp_path / "index" / "w\udcff" / "0000000000.json").write_text(json.dumps(record))
    shutil.copytree(tmp_path / "shards" / "worker_0", tmp_path / "shards" / "w\udcff")
    values, warned = read_all(tmp_path)
    np.testing.assert_array_equal(values["dense/kernel"][1], kernel(1))
    assert len(warned) == 1 and "index/w\udcff" in warned[0] and "not valid Unicode" in warned[0], warned
    problems = find_problems(str(tmp_path))
    assert problems and all("w\udcff" in p and "not valid Unicode" in p for p in problems), problems
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "out.csv")]) == 0


def test_a_tensor_name_that_is_not_valid_unicode_is_refused_by_the_writer_as_by_readers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Duplication A3: the writer's own test of a name's Unicode (a twin of ``layout.is_unicode``, the readers'
    rule) is that function now; a name readers would refuse is skipped with one warning naming it, the rest of
    the step saved."""
    with Writer(tmp_path) as w, w.stepping():
        w.save("evil\ud800name", np.ones(2))
        w.save("ok", np.ones(2))
    warned = [r.getMessage() for r in caplog.records if r.name == "tensortap"]
    assert warned == [
        "tensortap: evil\ud800name cannot be captured and is skipped: name: 'evil\\ud800name' is not valid Unicode"
    ]
    assert tensortap.create_trial(tmp_path).tensor_names() == ["ok"]


def test_a_record_listing_a_reduction_its_shard_lacks_is_reported_and_readers_name_what_the_shard_holds(
    tmp_path: Path,
) -> None:
    """hunt 36 H36-9: ``check`` reports a record that lists a reduction its shard does not hold, and the reader's
    error names the reductions the shard holds. Before, ``check`` said ok and the error said "reduction
    'nan_count' was not saved ...; saved: max, mean, nan_count"."""
    weights = Collection("weights", reduction_config=ReductionConfig(reductions=["mean", "max"]))
    with Writer(tmp_path, collection_configs={"weights": weights}) as w:
        with w.stepping():
            w.save("w", np.arange(4, dtype=np.float32), collections=["weights"])
    record = json.loads((tmp_path / RECORD).read_text())
    record["tensors"]["w"]["reductions"] = ["max", "mean", "nan_count"]
    (tmp_path / RECORD).write_text(json.dumps(record))
    tensor = tensortap.create_trial(tmp_path).tensor("w")
    assert tensor.reduction_value(0, "max") == 3
    with pytest.raises(TensorUnavailableForStep, match=r"reduction 'nan_count' was not saved .*; saved: max, mean$"):
        tensor.reduction_value(0, "nan_count")
    assert find_problems(str(tmp_path)) == [
        f"{SHARD}: unreadable shard ({tmp_path / SHARD}: its index record lists the reductions max, mean, nan_count "
        "of 'w'; the shard holds max, mean)"
    ]


# ---------------------------------------------------------------- records that disagree with their shards
def three_shards(out: Path) -> None:
    """A real trial of three shards of two steps each (``dense/kernel``, ``ragged``); records without
    ``raw_at``, so that values are found through HDF5."""
    with Writer(out, shard_policy=ShardPolicy(max_steps=2)) as w:
        for step in range(6):
            with w.stepping():
                w.save("dense/kernel", kernel(step), collections=["weights"])
                w.save("ragged", np.full(step + 1, step, dtype=np.int16), collections=["outputs"])
    for seq in range(3):
        edit_record(out, seq, lambda _: None)


def edit_record(out: Path, seq: int, change: Callable[[dict[str, Any]], object], to_seq: int | None = None) -> None:
    """``change`` the index record ``seq`` of ``out`` (its ``raw_at`` dropped) and write it as ``to_seq``."""
    record = json.loads((out / f"index/worker_0/{seq:010d}.json").read_text())
    for entry in record["tensors"].values():
        entry.pop("raw_at", None)
    change(record)
    (out / f"index/worker_0/{seq if to_seq is None else to_seq:010d}.json").write_text(json.dumps(record))


def shift_steps(by: int) -> Callable[[dict[str, Any]], object]:
    return lambda record: record.update(steps=[[s + by, m, ms + by] for s, m, ms in record["steps"]])


@pytest.mark.parametrize(
    "change",
    [
        shift_steps(100),
        lambda r: r.update(steps=[[-s - 1, m, ms] for s, m, ms in r["steps"]]),
        lambda r: r.update(steps=[[s, 2, ms] for s, _, ms in r["steps"]]),  # TRAIN steps said to be EVAL
        lambda r: r["tensors"]["dense/kernel"].update(raw_steps=[r["steps"][0][0]]),
    ],
    ids=["shifted", "negative", "other-mode", "fewer-raw-steps"],
)
def test_a_record_that_lists_other_steps_than_its_shard_is_refused_naming_the_shard(
    change: Callable[[dict[str, Any]], object], tmp_path: Path
) -> None:
    three_shards(tmp_path)
    edit_record(tmp_path, 1, change)
    shard = "shards/worker_0/0000000001.h5"
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
        values = trial.tensor("dense/kernel").values()
        assert sorted(values) == [0, 1, 4, 5] == trial.steps()  # every step listed has its value
        for step, value in values.items():
            np.testing.assert_array_equal(value, kernel(step))
        assert trial.tensor("ragged").steps() == [0, 1, 4, 5]
    assert len(warned) == 1 and shard in warned[0] and "lists other steps" in warned[0], warned
    assert [p.split(":")[0] for p in find_problems(str(tmp_path))] == [shard]


@pytest.mark.parametrize("kind", ["overlapping-steps", "same-shard"])
def test_of_two_records_of_one_step_or_shard_the_earlier_is_kept_naming_both(kind: str, tmp_path: Path) -> None:
    """A record claiming steps of another (or its shard) hides none of that one's values."""
    three_shards(tmp_path)
    if kind == "overlapping-steps":
        edit_record(tmp_path, 1, shift_steps(-2))  # claims steps 0 and 1, of shard 0
        later, kept, expected = "0000000001.json", "0000000000.json", [0, 1, 4, 5]
    else:
        edit_record(tmp_path, 1, lambda _: None, to_seq=7)  # a copy of record 1 names shard 1 too
        later, kept, expected = "0000000007.json", "0000000001.json", list(range(6))
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
        values = trial.tensor("dense/kernel").values()
        np.testing.assert_array_equal(trial.tensor("dense/kernel").value(0), kernel(0))
    assert sorted(values) == expected == trial.steps()
    for step, value in values.items():
        np.testing.assert_array_equal(value, kernel(step))
    assert len(warned) == 1 and later in warned[0] and kept in warned[0], warned
    problems = find_problems(str(tmp_path))
    assert len(problems) == 1 and later in problems[0].split(":")[0] and kept in problems[0], problems


@pytest.mark.parametrize(
    "declared", [{"shape": [10**6] * 3}, {"dtype": "<U3"}, {"dtype": "int32"}, {"dtype": "no such type"}]
)
def test_a_record_declaring_another_form_than_its_shard_holds_is_refused_naming_the_shard(
    declared: dict[str, object], tmp_path: Path
) -> None:
    """Shape (found by the first hostile-input audit) and dtype (the second: a record's ``<U3`` for float32
    values was listed by ``ls`` and passed ``check``)."""
    three_shards(tmp_path)
    edit_record(tmp_path, 2, lambda r: r["tensors"]["dense/kernel"].update(declared))
    shard = "shards/worker_0/0000000002.h5"
    what = next(iter(declared))
    with logged_warnings() as warned:
        trial = tensortap.create_trial(tmp_path)
        values = trial.tensor("dense/kernel").values()
        assert sorted(values) == [0, 1, 2, 3] == trial.steps()
        summary = trial.tensor("dense/kernel").summary()  # the shards', once the false record is refused
        assert summary["shape"] == (6,) and summary["dtype"] == "float32", summary
    assert len(warned) == 1 and shard in warned[0] and f"declares the {what}" in warned[0], warned
    problems = find_problems(str(tmp_path))
    assert [p.split(":")[0] for p in problems] == [shard] and f"declares the {what}" in problems[0], problems


def test_a_folder_where_an_index_record_belongs_is_named(tmp_path: Path) -> None:
    write(tmp_path)
    folder = "index/worker_0/0000000003.json"
    (tmp_path / folder).mkdir()
    values, warned = read_all(tmp_path)
    np.testing.assert_array_equal(values["dense/kernel"][1], kernel(1))
    assert len(warned) == 1 and folder in warned[0] and "a folder" in warned[0], warned
    problems = find_problems(str(tmp_path))
    assert [p.split(":")[0] for p in problems] == [folder] and "a folder" in problems[0], problems


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ', "\xff", "null", "[1, 2]"])
@pytest.mark.parametrize("folder", ["index/worker_0/0000000000.json", "workers/worker_0.json", "end/worker_0.json"])
def test_broken_json_anywhere_is_skipped_with_a_warning(text: str, folder: str, tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / folder).write_text(text, encoding="utf-8", errors="surrogateescape")
    _, warned = read_all(tmp_path)
    assert len(warned) == 1 and folder in warned[0]
    assert folder in find_problems(str(tmp_path))[0]


@pytest.mark.parametrize("key", [RECORD, "workers/worker_0.json", "end/worker_0.json", "control/stop.json"])
def test_a_sparse_json_file_is_refused_reading_no_more_than_a_record_may_have(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hunt 36 H36-5: a JSON file that claims a gigabyte and takes nothing on disk (sparse, as ``truncate`` or an
    archive makes it) is refused having read at most one byte more than a record may have. Before, it was read
    whole, then refused: a 2 GiB end marker made ``ls`` take 4 GB of memory, a larger one all of it."""
    monkeypatch.setattr(storage_module, "MAX_JSON_BYTES", 1 << 20)
    write(tmp_path)
    (tmp_path / key).parent.mkdir(exist_ok=True)
    with open(tmp_path / key, "ab") as f:
        f.truncate(1 << 30)
    why = f"more than the {1 << 20}"
    tracemalloc.start()
    try:
        if key == "control/stop.json":
            with pytest.raises(ValueError, match=re.escape(why)):
                tensortap.create_trial(tmp_path).stop_request()
        else:
            _, warned = read_all(tmp_path)
            assert len(warned) == 1 and key in warned[0] and why in warned[0], warned
            assert any(p.startswith(key) and why in p for p in find_problems(str(tmp_path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_check_exits_1_naming_each_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path)
    (tmp_path / "end" / "worker_0.json").write_text("[")
    assert main(["check", str(tmp_path)]) == 1
    assert "end/worker_0.json" in capsys.readouterr().out


def test_check_gives_up_on_a_shard_that_takes_too_long(tmp_path: Path) -> None:
    write(tmp_path)
    problems = find_problems(str(tmp_path), timeout=0.001)  # as if HDF5 looped on it
    late = "reading it did not finish within 0.001 s (corrupt HDF5 structure)"
    assert problems == [f"{SHARD}: unreadable shard ({tmp_path / SHARD}: {late})"]


def test_check_reads_shards_in_several_processes_and_reports_in_shard_order(tmp_path: Path) -> None:
    """Six shards, the second truncated and the fifth not HDF5: read by three children at once, the
    problems are the ones one child finds, in the shards' order."""
    write_trial(tmp_path, 6, shard_policy=ShardPolicy(max_steps=1))
    shards = sorted((tmp_path / "shards" / "worker_0").glob("*.h5"))
    assert len(shards) == 6
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    shards[4].write_bytes(b"not hdf5 at all")
    serial = find_problems(str(tmp_path), processes=1)
    assert find_problems(str(tmp_path), processes=3) == serial
    assert [p.split(":")[0] for p in serial] == [f"shards/worker_0/{shards[i].name}" for i in (1, 4)], serial


def test_check_ends_its_children_when_stopped_midway(tmp_path: Path) -> None:
    """An interrupt (here: the generator of results closed after the first) kills the children that
    read shards at once, whatever they were reading."""
    write_trial(tmp_path, 8, shard_policy=ShardPolicy(max_steps=1))
    storage = get_storage(tmp_path)
    shards = sorted(k for k in storage.walk() if k.endswith(".h5"))
    found = _inspect_shards(storage, {}, shards, timeout=60.0, count=2)
    assert next(found) is None
    assert _readers() != []
    found.close()
    assert _readers() == []


def _readers() -> list[int]:
    """Child processes of this one that run ``tensortap check``'s shard reader."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"inspect_shard" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_local_storage_refuses_special_files_directly(tmp_path: Path) -> None:
    storage = get_storage(tmp_path)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(NotInTrial, match="not a regular file"):
        storage.read_bytes("fifo.json")
    assert storage.walk() == ["fifo.json"]


def test_a_variable_length_text_attribute_is_refused_unread(tmp_path: Path) -> None:
    write(tmp_path)

    def variable(f: h5py.File) -> None:
        f.attrs["format"] = "tensortap-shard"  # h5py stores str in HDF5's global heap, which has no checksum

    rewrite(tmp_path, variable)
    refused(tmp_path, "attribute 'format' of / has type object")


# ---------------------------------------------------------------- format 1: HDF5's global heap
def break_global_heap(shard: Path) -> None:
    """Zero 3 bytes of the global heap that holds the shard's text attributes (format 1): the size of
    its last object becomes 0, on which HDF5 loops forever reading the root attribute ``format``."""
    data = bytearray(shard.read_bytes())
    heap = data.index(b"GCOL")
    at, last = heap + 16, None
    while int.from_bytes(data[at : at + 2], "little"):  # index 0: the free space that ends the heap
        last = at
        at += 16 + -(-int.from_bytes(data[at + 8 : at + 16], "little") // 8) * 8
    assert last is not None
    data[last + 6 : last + 9] = b"\0\0\0"  # 2 reserved bytes and the low byte of the object's size
    shard.write_bytes(bytes(data))


READ_IN_A_CHILD = """
import json, sys
from helpers.trials import logged_warnings
import tensortap
from tensortap.backends.shard import FORMAT_1
FORMAT_1.child.timeout = float(sys.argv[2])
with logged_warnings() as warned:
    trial = tensortap.create_trial(sys.argv[1])
    values = {n: sorted(trial.tensor(n).values()) for n in trial.tensor_names()}
print(json.dumps({"values": values, "warned": warned}))
"""


def read_in_a_child(trial: Path, vet_seconds: float) -> dict[str, Any]:
    """What a reader returns and warns, read in a child process that is killed if HDF5 hangs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", READ_IN_A_CHILD, str(trial), str(vet_seconds)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_a_format_1_shard_on_which_hdf5_loops_is_refused_in_process(tmp_path: Path) -> None:
    shutil.copytree(FORMAT_1, tmp_path / "trial")
    broken = tmp_path / "trial" / SHARD
    break_global_heap(broken)
    got = read_in_a_child(tmp_path / "trial", vet_seconds=2)
    assert got["values"] == {"dense/kernel": [2], "losses/loss": [2], "ragged": [2]}  # the other shard reads
    assert len(got["warned"]) == 1, got["warned"]
    assert SHARD in got["warned"][0] and "did not finish within 2 s" in got["warned"][0]


def test_format_1_shards_are_vetted_once_and_again_when_they_change(tmp_path: Path) -> None:
    shutil.copytree(FORMAT_1, tmp_path / "trial")
    vetted = FORMAT_1_VETTER.child.ask
    asked: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FORMAT_1_VETTER.child, "ask", lambda path, size: asked.append(path) or vetted(path, size))
        mp.setattr(FORMAT_1_VETTER.child, "timeout", 2)
        for _ in range(2):
            values, warned = read_all(tmp_path / "trial")
            assert sorted(values["dense/kernel"]) == [0, 1, 2] and warned == []
        assert sorted(Path(p).name for p in asked) == ["0000000000.h5", "0000000001.h5"]
        break_global_heap(tmp_path / "trial" / SHARD)  # same size, new modification time
        values, warned = read_all(tmp_path / "trial")
    assert sorted(values["dense/kernel"]) == [2]
    assert len(warned) == 1 and SHARD in warned[0], warned


def test_compressed_values_beyond_the_read_budget_are_refused_naming_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Writer(tmp_path, shard_policy=ShardPolicy(max_steps=100, compression="gzip")) as w:
        for _ in range(4):
            with w.stepping():
                w.save("zeros", np.zeros(4096, dtype=np.float32))  # 64 KiB that deflate shrinks to almost nothing
    assert tensortap.create_trial(tmp_path).tensor("zeros").values().keys() == {0, 1, 2, 3}  # the default budget
    monkeypatch.setenv("TENSORTAP_MAX_READ_BYTES", "65535")
    values, warned = read_all(tmp_path)
    assert values == {"zeros": {}}
    assert len(warned) == 1 and SHARD in warned[0] and "/tensors/0/data declares 65536 bytes" in warned[0]
    assert "TENSORTAP_MAX_READ_BYTES" in warned[0]
    monkeypatch.setenv("TENSORTAP_MAX_READ_BYTES", "65536")
    assert read_all(tmp_path)[0]["zeros"].keys() == {0, 1, 2, 3}
