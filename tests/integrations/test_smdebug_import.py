"""``tensortap import-smdebug`` on a trial smdebug 1.0.34 wrote, compared with what smdebug's own trial API read.

tests/data/smdebug-trial was made by tests/data/make_smdebug_trial.py in smdebug's environment.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

import tensortap
from tensortap import Mode
from tensortap.capture import Writer
from tensortap.cli import main
from tensortap.crc32c import crc32c, masked_crc32c
from tensortap.exceptions import RuleInputsMissing, TrialNotFound
from tensortap.importers import smdebug as smdebug_importer
from tensortap.importers.smdebug import (
    SmdebugFormatError,
    import_smdebug,
    read_records,
    tensortap_name,
)
from tensortap.rules import TreeDepth, invoke_rule

DATA = Path(__file__).parents[1] / "data" / "smdebug-trial"
EXPECTED = json.loads((DATA / "expected.json").read_text())


def collections_of(name: str) -> list[str]:
    return [c for c, names in EXPECTED["collections"].items() if name in names]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tensortap.Trial:
    out = tmp_path_factory.mktemp("imported") / "trial"
    summary = import_smdebug(DATA / "trial", out)
    assert summary.workers == ["worker_0"] and summary.steps == len(EXPECTED["steps"]) and not summary.skipped
    return tensortap.create_trial(out)


def test_every_value_is_what_smdebug_reads(imported: tensortap.Trial) -> None:
    assert imported.steps() == EXPECTED["steps"]
    assert imported.workers() == EXPECTED["workers"]
    expected_names = {tensortap_name(n, collections_of(n)) for n in EXPECTED["tensors"]}
    assert set(imported.tensor_names()) == expected_names
    for smd_name, steps in EXPECTED["tensors"].items():
        tensor = imported.tensor(tensortap_name(smd_name, collections_of(smd_name)))
        assert tensor.steps() == sorted(int(s) for s in steps), smd_name
        for step_text, entry in steps.items():
            step = int(step_text)
            assert imported.mode_step(step) == (Mode[entry["mode"]], entry["mode_step"])
            value = tensor.value(step)
            assert list(value.shape) == entry["shape"] or (value.shape == () and entry["shape"] == [1])
            assert str(value.dtype) == entry["dtype"], smd_name
            np.testing.assert_array_equal(value.astype(np.float64).ravel(), entry["value"])
            for key, expected in entry["reductions"].items():
                if key == "l2" and value.ndim >= 2 and "gradient_norms" not in collections_of(smd_name):
                    # smdebug computes l2 of a raw matrix with np.linalg.norm(ord=2): its spectral norm;
                    # tensortap's l2 is always the element-wise vector norm
                    np.testing.assert_allclose(np.linalg.norm(value.astype(np.float64), 2), expected, rtol=1e-6)
                    expected = float(np.sqrt((value.astype(np.float64) ** 2).sum()))
                np.testing.assert_allclose(tensor.reduction_value(step, key), expected, rtol=1e-6, err_msg=smd_name)


def test_names_and_collections_are_mapped(imported: tensortap.Trial) -> None:
    assert imported.tensor_names(collection="losses") == ["losses/MSELoss_output_0"]
    assert imported.tensor_names(collection="weights") == ["Sequential_0.weight", "Sequential_2.weight"]
    assert imported.tensor_names(collection="biases") == ["Sequential_0.bias", "Sequential_2.bias"]
    assert imported.tensor_names(collection="metrics") == ["metrics/lr"]
    assert imported.tensor_names(collection="gradient_norms") == [
        "gradients/Sequential_2.bias",
        "gradients/Sequential_2.weight",
    ]
    # the reductions smdebug stored (not recomputed): abs_max is only in smdebug's files
    grad = imported.tensor("gradients/Sequential_2.bias")
    assert set(grad.available_reductions(0)) >= {"mean", "max", "l2", "abs_max"}
    assert imported.end_reasons() == {"worker_0": "closed"}


def test_cli_imports_and_refuses_a_full_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["import-smdebug", str(DATA / "trial"), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 6 and "losses/MSELoss_output_0" in report["tensors"]
    assert main(["import-smdebug", str(DATA / "trial"), str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["import-smdebug", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"no smdebug trial at {tmp_path / 'missing'}: nothing exists there" in err
    assert "tensortap trial" not in err  # what is missing is an smdebug trial


def test_cli_to_an_out_dir_that_cannot_be_written_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OUT_DIR below a regular file (a folder that cannot be made, for root too) was reported as
    ``unexpected error: RuntimeError(...)`` (kind ``unexpected``): the writer wraps its OSError."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    assert main(["import-smdebug", str(DATA / "trial"), str(out), "--json"]) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]
    assert error["kind"] == "input", error
    assert error["message"] == f"cannot write the trial at {out}: [Errno 20] Not a directory: '{out}'"
    assert captured.err == f"tensortap import-smdebug: {error['message']}\n"
    with pytest.raises(NotADirectoryError, match="cannot write the trial at"):
        import_smdebug(DATA / "trial", out)
    assert main(["import-smdebug", str(DATA / "trial"), str(tmp_path / "afile")]) == 2  # OUT_DIR is a file
    assert capsys.readouterr().err == (
        f"tensortap import-smdebug: {tmp_path / 'afile'}: is a file; import into a new directory\n"
    )


def test_cli_on_the_folder_above_smdebug_trials_names_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``import-smdebug`` given the folder that holds an smdebug trial (a job's output folder, its trial one
    level down) said only "no smdebug event files there": now it names the trials in the folders below."""
    parent = tmp_path / "jobs"
    shutil.copytree(DATA / "trial", parent / "job1")
    shutil.copytree(DATA / "trial", parent / "group" / "job2")
    (parent / "notes").mkdir()
    out = tmp_path / "out"
    assert main(["import-smdebug", str(parent), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tensortap import-smdebug: no smdebug trial at {parent}: no smdebug event files there "
        "(events/<step>/*.tfevents); trials found below it: group/job2, job1\n"
    )
    assert not out.exists()
    assert main(["import-smdebug", str(parent / "job1"), str(out)]) == 0  # the folder it named


def record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


def test_records_are_checked() -> None:
    assert [bytes(r) for r in read_records(record(b"abc") + record(b""), "t")] == [b"abc", b""]
    good = record(b"abcdef")
    with pytest.raises(SmdebugFormatError, match="truncated"):
        list(read_records(good[:5], "t"))
    with pytest.raises(SmdebugFormatError, match="claims"):
        list(read_records(good[:-6], "t"))
    flipped = bytearray(good)
    flipped[13] ^= 1
    with pytest.raises(SmdebugFormatError, match="corrupted record at"):
        list(read_records(bytes(flipped), "t"))
    huge = struct.pack("<Q", 1 << 60)
    with pytest.raises(SmdebugFormatError, match="claims"):
        list(read_records(huge + struct.pack("<I", masked_crc32c(huge)) + b"\0" * 8, "t"))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x2a\xff\xff\xff\xff\x0f",  # a summary field claiming 4 GB
        b"\x2a\x04\x0a\x02\x42\x05",  # a value whose tensor is cut
        b"\x2a\x0c\x0a\x0a\x0a\x02\x68\x69\x42\x04\x08\x01\x22\x01",  # tensor content cut short
        b"\x2a\x03\x0a\x01\x0f",  # wire type 7
        b"\x10" + b"\xff" * 11,  # a varint longer than 64 bits
    ],
)
def test_malformed_events_are_refused(tmp_path: Path, payload: bytes) -> None:
    trial = tmp_path / "smd"
    shutil.copytree(DATA / "trial", trial)
    event = trial / "events" / "000000000004" / "000000000004_worker_0.tfevents"
    event.write_bytes(record(payload))
    with pytest.raises(SmdebugFormatError):
        import_smdebug(trial, tmp_path / "out")
    assert main(["import-smdebug", str(trial), str(tmp_path / "out2")]) == 2


def test_tensor_content_must_match_its_shape(tmp_path: Path) -> None:
    # Event{summary{value{tag "t", tensor{dtype DT_FLOAT, shape [3], content 8 bytes}}}}
    dim = b"\x08\x03"
    tensor = b"\x08\x01" + b"\x12" + bytes([len(dim) + 2]) + b"\x12" + bytes([len(dim)]) + dim + b"\x22\x08" + b"\0" * 8
    value = b"\x0a\x01t" + b"\x42" + bytes([len(tensor)]) + tensor
    summary = b"\x0a" + bytes([len(value)]) + value
    event = b"\x2a" + bytes([len(summary)]) + summary
    trial = tmp_path / "smd" / "events" / "000000000000"
    trial.mkdir(parents=True)
    (trial / "000000000000_worker_0.tfevents").write_bytes(record(event))
    with pytest.raises(SmdebugFormatError, match="8 bytes for a float32 tensor of shape \\(3,\\)"):
        import_smdebug(tmp_path / "smd", tmp_path / "out")


def test_workers_and_urls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each smdebug worker becomes a tensortap worker; a trial is read from any fsspec URL."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    root = f"/smd-{tmp_path.name}"
    for path in (DATA / "trial").rglob("*"):
        if path.is_file():
            rel = path.relative_to(DATA / "trial").as_posix()
            memory.pipe(f"{root}/{rel}", path.read_bytes())
            if rel.endswith("_worker_0.tfevents"):  # the same steps from two more workers
                memory.pipe(f"{root}/{rel.replace('_worker_0', '_worker_3')}", path.read_bytes())
                memory.pipe(f"{root}/{rel.replace('_worker_0', '_algo-2')}", path.read_bytes())
    summary = import_smdebug(f"memory://{root}", tmp_path / "out")
    assert summary.workers == ["worker_0", "worker_1", "worker_3"]
    assert "smdebug worker 'algo-2' is imported as worker_1" in caplog.text
    trial = tensortap.create_trial(tmp_path / "out")
    weight = trial.tensor("Sequential_0.weight")
    for worker in summary.workers:
        np.testing.assert_array_equal(weight.value(2, worker=worker), weight.value(2, worker="worker_0"))
    memory.rm(root, recursive=True)


def test_symbolic_links_are_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trial = tmp_path / "smd"
    shutil.copytree(DATA / "trial", trial)
    outside = tmp_path / "outside.tfevents"
    outside.write_bytes(b"secret")
    (trial / "events" / "000000000012").mkdir()
    (trial / "events" / "000000000012" / "000000000012_worker_0.tfevents").symlink_to(outside)
    summary = import_smdebug(trial, tmp_path / "out")
    assert summary.steps == 6 and "a symbolic link; not imported" in caplog.text


# ------------------------------------------------------- hostile trials (docs/reliability.md)
def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    out = b""
    while n > 0x7F:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def protobuf_field(number: int, wire: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint (wire 0) or length-delimited bytes (wire 2)."""
    if isinstance(value, int):
        return varint(number << 3 | wire) + varint(value)
    return varint(number << 3 | wire) + varint(len(value)) + value


def tensor_proto(dtype: int, dims: tuple[int, ...], field: int, packed: bytes) -> bytes:
    """A TensorProto of TensorFlow type ``dtype`` and shape ``dims`` whose values are the packed field ``field``."""
    shape = b"".join(protobuf_field(2, 2, protobuf_field(1, 0, d)) for d in dims)
    return protobuf_field(1, 0, dtype) + protobuf_field(2, 2, shape) + protobuf_field(field, 2, packed)


def summary_value(tag: str, tensor: bytes, **plugins: str) -> bytes:
    """A Summary.Value: ``tag``, the TensorProto ``tensor`` and smdebug's metadata (``mode="1"``)."""
    meta = b"".join(
        protobuf_field(1, 2, protobuf_field(1, 2, name.encode()) + protobuf_field(2, 2, content.encode()))
        for name, content in plugins.items()
    )
    value = protobuf_field(1, 2, tag.encode()) + protobuf_field(8, 2, tensor)
    return value + protobuf_field(9, 2, meta) if meta else value


def event_of(*values: bytes) -> bytes:
    """An event file of one Event whose Summary holds ``values`` (Summary.Values)."""
    return record(protobuf_field(5, 2, b"".join(protobuf_field(1, 2, v) for v in values)))


def event_file(dims: tuple[int, ...], values: tuple[float, ...], tags: tuple[str, ...] = ("t",)) -> bytes:
    """An event file of one step whose tensors ``tags`` are float32 of shape ``dims`` stored as ``float_val``."""
    tensor = tensor_proto(1, dims, 5, struct.pack(f"<{len(values)}f", *values))
    return event_of(*(summary_value(t, tensor) for t in tags))


def one_event_trial(root: Path, data: bytes) -> Path:
    """An smdebug trial of one event file (step 0, worker_0) holding ``data``; returns that file."""
    (root / "events" / "000000000000").mkdir(parents=True)
    path = root / "events" / "000000000000" / "000000000000_worker_0.tfevents"
    path.write_bytes(data)
    return path


@pytest.mark.timeout(60)
def test_fifos_are_not_opened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO named like an event file or a collections file made the import wait for ever in its read."""
    trial = tmp_path / "smd"
    shutil.copytree(DATA / "trial", trial)
    (trial / "events" / "000000000012").mkdir()
    event = trial / "events" / "000000000012" / "000000000012_worker_0.tfevents"
    os.mkfifo(event)
    collections = next((trial / "collections").rglob("*.json")).parent / "z.json"
    os.mkfifo(collections)
    summary = import_smdebug(trial, tmp_path / "out")
    assert summary.steps == 6
    assert f"{event}: not a regular file; not imported" in caplog.text
    assert f"{collections}: not a regular file; not imported" in caplog.text
    assert main(["import-smdebug", str(trial), str(tmp_path / "out2")]) == 0


def test_links_to_folders_and_collection_files_are_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """``events/`` linked to another smdebug trial was imported, and a collections file linked to a file
    outside was read: no link below the folder given is followed (that folder may be one)."""
    other = tmp_path / "other"
    shutil.copytree(DATA / "trial", other)
    (other / "secret.json").write_text(json.dumps({"collections": {"SECRET": {"tensor_names": ["x"]}}}))
    trial = tmp_path / "smd"
    shutil.copytree(DATA / "trial", trial)
    (trial / "events" / "000000000012").symlink_to(other / "events" / "000000000004")
    collections = next((trial / "collections").rglob("*.json")).parent
    (collections / "z.json").symlink_to(other / "secret.json")
    (tmp_path / "given").symlink_to(trial)  # the folder given may be a link
    summary = import_smdebug(tmp_path / "given", tmp_path / "out")
    assert summary.steps == 6
    assert "SECRET" not in tensortap.create_trial(tmp_path / "out").collections()
    assert "000000000012: a symbolic link; not imported" in caplog.text
    assert "z.json: a symbolic link; not imported" in caplog.text

    shutil.rmtree(trial / "events")
    (trial / "events").symlink_to(other / "events")
    with pytest.raises(TrialNotFound, match="no smdebug event files there"):
        import_smdebug(trial, tmp_path / "out2")
    assert f"{trial / 'events'}: a symbolic link; not imported" in caplog.text
    assert main(["import-smdebug", str(trial), str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err
    assert "no smdebug event files there" in err and "Traceback" not in err and "unexpected" not in err


def test_a_declared_shape_is_bounded_by_the_read_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One value repeated to a declared shape ("TensorFlow repeats the last value") allocated the whole
    shape: a 51-byte file took gigabytes, or gave a raw MemoryError."""
    event = one_event_trial(tmp_path / "huge", event_file((1 << 20, 1 << 20, 1 << 20), (1.0,)))
    with pytest.raises(SmdebugFormatError, match=f"{event}: tensor 't' declares shape .* more than"):
        import_smdebug(tmp_path / "huge", tmp_path / "out")
    assert main(["import-smdebug", str(tmp_path / "huge"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TENSORTAP_MAX_READ_BYTES" in err and "unexpected" not in err

    monkeypatch.setenv("TENSORTAP_MAX_READ_BYTES", "1000")
    one_event_trial(tmp_path / "small", event_file((10, 20), (2.5,)))  # 800 bytes: within the budget
    import_smdebug(tmp_path / "small", tmp_path / "out3")
    np.testing.assert_array_equal(
        tensortap.create_trial(tmp_path / "out3").tensor("t").value(0), np.full((10, 20), 2.5)
    )
    # the budget is one event file's: two such tensors exceed it
    one_event_trial(tmp_path / "two", event_file((10, 20), (2.5,), tags=("t", "u")))
    with pytest.raises(SmdebugFormatError, match="tensor 'u' declares shape \\(10, 20\\)"):
        import_smdebug(tmp_path / "two", tmp_path / "out4")


@pytest.mark.parametrize(
    ("dims", "values", "why"),
    [
        ((3,), (1.0, 2.0), "2 values for a tensor of shape \\(3,\\)"),
        ((3,), (), "0 values for a tensor of shape \\(3,\\)"),
        ((1,) * 70, (1.0,), "not a float32 tensor of shape"),  # more dimensions than NumPy makes
        ((0, 1 << 62, 1 << 62), (), "not a float32 tensor of shape"),  # empty, yet too large for NumPy
    ],
)
def test_values_that_do_not_fill_the_shape_are_refused(
    tmp_path: Path, dims: tuple[int, ...], values: tuple[float, ...], why: str
) -> None:
    event = one_event_trial(tmp_path / "smd", event_file(dims, values))
    with pytest.raises(SmdebugFormatError, match=f"{event}: tensor 't': {why}"):
        import_smdebug(tmp_path / "smd", tmp_path / "out")


def test_packed_integers_are_decoded_within_what_the_file_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 36 H36-1: the packed varints of ``int_val`` were decoded one at a time into a Python list (a
    Python int for each value, then the array): a 32 MB file took 38 s and 616 MB. Now NumPy decodes them,
    in what the values take, and the decoded array (8 bytes for a varint of one byte) counts in the read
    budget."""
    n = 1 << 18
    tensor = tensor_proto(3, (n,), 7, varint(300) * n)  # int32, int_val: 2 bytes a value
    one_event_trial(tmp_path / "smd", event_of(summary_value("w", tensor)))
    tracemalloc.start()
    try:
        import_smdebug(tmp_path / "smd", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the file (2 bytes a value), the decoded uint64 and the int32 array; before: 13 times the int32 array
    assert peak < 6 * 4 * n, peak
    np.testing.assert_array_equal(tensortap.create_trial(tmp_path / "out").tensor("w").value(0), np.full(n, 300))

    # every integer type reads as protobuf reads it: two's complement of 10 bytes for a negative int32,
    # uint64 beyond int64, bool_val; a value split over the decoder's chunks of 65,536 bytes
    cases = {
        "i": (3, 7, [-1, 2**31 - 1, -(2**31)], [2**64 - 1, 2**31 - 1, 2**64 - 2**31]),
        "u": (23, 17, [2**64 - 1, 0], [2**64 - 1, 0]),
        "b": (10, 11, [True, False, True], [1, 0, 2]),
        "long": (9, 10, [2**62] * 10_000, [2**62] * 10_000),  # 9 bytes a value: 90,000 bytes
    }
    for name, (dtype, field, expected, encoded) in cases.items():
        tensor = tensor_proto(dtype, (len(expected),), field, b"".join(map(varint, encoded)))
        one_event_trial(tmp_path / name, event_of(summary_value("v", tensor)))
        import_smdebug(tmp_path / name, tmp_path / f"out-{name}")
        value = tensortap.create_trial(tmp_path / f"out-{name}").tensor("v").value(0)
        assert value.tolist() == expected, name
    for encoded, why in (([2**31], "a value beyond the range of int32"), ([1 << 70], "malformed varint")):
        packed = b"".join(map(varint, encoded))
        one_event_trial(tmp_path / why, event_of(summary_value("v", tensor_proto(3, (1,), 7, packed))))
        with pytest.raises(SmdebugFormatError, match=why):
            import_smdebug(tmp_path / why, tmp_path / f"out-{why}")

    monkeypatch.setenv("TENSORTAP_MAX_READ_BYTES", str(8 * n - 1))
    assert main(["import-smdebug", str(tmp_path / "smd"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'smd'}/events/000000000000/000000000000_worker_0.tfevents: tensor 'w' holds {n} " in err
    assert "TENSORTAP_MAX_READ_BYTES" in err and "unexpected" not in err


def test_crc32c_is_bit_exact() -> None:
    """hunt 36 H36-2: the payload's CRC-32C was computed a byte at a time in Python (about 5 MB/s, paid by
    every import of a file whose records carry their real CRC); long data is now computed in NumPy lanes
    (about 20 times the speed; measured, not asserted). The same CRC as RFC 3720's vectors, a bitwise
    reference, and the records smdebug wrote with its checksums (``write_checksum=True``)."""
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA and crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E

    def bitwise(data: bytes) -> int:
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        return crc ^ 0xFFFFFFFF

    rng = np.random.default_rng(0)
    for n in (4095, 4096, 4097, 65_537, 100_003):  # both sides of the byte loop's limit, lanes padded
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == bitwise(data) == crc32c(memoryview(data)), n
    data = (SHAPES / "checksummed.tfrecord").read_bytes()
    assert [len(r) for r in read_records(data, "t")] == [9, 20480]
    flipped = bytearray(data)
    flipped[-100] ^= 1  # in the long record's payload
    with pytest.raises(SmdebugFormatError, match="corrupted record at byte 25"):
        list(read_records(bytes(flipped), "t"))


def test_workers_of_one_rank_and_two_files_of_one_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 36 H36-3: smdebug workers ``worker_0`` and ``worker_00`` both became rank 0, and two event files of
    one step of a worker both step 0: the import stopped half-way ("if_exists=" options the command lacks;
    "0 is not greater than the last step" naming no file) and left a half trial that ``check`` called ok.
    Now ``worker_00`` is another worker (a free rank, with a warning), and two files of one step are refused
    before anything is written, naming both."""
    smd = tmp_path / "smd"
    for worker, values in (("worker_0", (1.0, 2.0)), ("worker_00", (10.0, 20.0))):
        path = smd / "events" / "000000000000" / f"000000000000_{worker}.tfevents"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(event_file((2,), values, tags=("w",)))
    summary = import_smdebug(smd, tmp_path / "out")
    assert summary.workers == ["worker_0", "worker_1"]
    assert "smdebug worker 'worker_00' is imported as worker_1" in caplog.text
    w = tensortap.create_trial(tmp_path / "out").tensor("w")
    assert w.value(0, worker="worker_0").tolist() == [1, 2] and w.value(0, worker="worker_1").tolist() == [10, 20]

    first = one_event_trial(tmp_path / "two", event_file((2,), (1.0, 2.0)))
    second = tmp_path / "two" / "events" / "000000000001" / "0_worker_0.tfevents"
    second.parent.mkdir()
    second.write_bytes(event_file((2,), (5.0, 6.0)))
    assert main(["import-smdebug", str(tmp_path / "two"), str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err == (
        f"tensortap import-smdebug: {first} and {second}: two files of step 0 of worker 'worker_0'\n"
    )
    assert not (tmp_path / "out2").exists()


class _Unremovable(LocalFileSystem):
    """A local folder (``unremovable://``) from which nothing can be removed, as a store that refuses deletes."""

    protocol = "unremovable"

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        raise PermissionError(errno.EACCES, "deletes refused", str(path))


def test_an_import_that_fails_midway_keeps_nothing_and_check_reports_one_that_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 36 H36-3 (rest): an import that met a damaged event file after some steps were written left them in
    OUT_DIR (end marker "import failed"), which ``check`` called ok and ``ls`` listed as a trial. Now what it
    wrote is removed (a folder it made too; an empty one given stays, empty) and the error says so, or says what
    is left where the removal fails; and ``check`` reports a worker whose end marker says "import failed"."""
    smd = tmp_path / "smd"
    shutil.copytree(DATA / "trial", smd)
    event = smd / "events" / "000000000002" / "000000000002_worker_0.tfevents"  # the second step's
    damaged = bytearray(event.read_bytes())
    damaged[-1] ^= 1  # the last record's payload CRC
    event.write_bytes(damaged)
    out = tmp_path / "out"
    assert main(["import-smdebug", str(smd), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tensortap import-smdebug: {event}: corrupted record at byte ")
    assert err.endswith(f" (nothing was kept: what it had written to {out} was removed)\n")
    assert not out.exists()
    out.mkdir()  # given empty: it stays, empty
    with pytest.raises(SmdebugFormatError, match="nothing was kept"):
        import_smdebug(smd, out)
    assert list(out.iterdir()) == []

    fsspec.register_implementation(_Unremovable.protocol, _Unremovable, clobber=True)
    left = tmp_path / "left"
    with pytest.raises(SmdebugFormatError) as failed:
        import_smdebug(smd, f"unremovable://{left}")
    assert str(failed.value).endswith(
        f"(unremovable://{left} may still hold part of the trial: removing what was written failed "
        f"([Errno 13] deletes refused: \"['{left}']\"))"
    )
    assert tensortap.create_trial(left).end_reasons() == {"worker_0": "import failed"}
    problem = (
        "end/worker_0.json: tensortap import-smdebug failed midway ('import failed'): the trial holds part of the "
        "smdebug trial; import it again into an empty folder"
    )
    assert main(["check", str(left)]) == 1
    assert capsys.readouterr().out == f"{problem}\n"
    assert main(["check", str(left), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"] == [problem]


def test_an_import_that_fails_removes_the_folders_it_made_above_out_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 57 A57-6: an import into ``new/a/b/out`` (``new`` absent) that failed removed ``out`` but left the
    empty ``new/a/b`` it had made for it. Now the folders it made are removed too, and only those: a folder that
    existed stays, and so does one that holds anything (with the folders above it)."""
    smd = tmp_path / "smd"
    shutil.copytree(DATA / "trial", smd)
    event = smd / "events" / "000000000002" / "000000000002_worker_0.tfevents"
    damaged = bytearray(event.read_bytes())
    damaged[-1] ^= 1  # the second step's file: the import fails after writing the first step
    event.write_bytes(damaged)
    assert main(["import-smdebug", str(smd), str(tmp_path / "new" / "a" / "b" / "out")]) == 2
    assert "nothing was kept" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(SmdebugFormatError, match="nothing was kept"):
        import_smdebug(smd, tmp_path / "kept" / "a" / "out")
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "old" / "a").mkdir(parents=True)
    (tmp_path / "old" / "a" / "theirs.txt").write_text("not the import's")
    with pytest.raises(SmdebugFormatError, match="nothing was kept"):
        import_smdebug(smd, tmp_path / "old" / "a" / "b" / "out")
    assert [p.name for p in (tmp_path / "old" / "a").iterdir()] == ["theirs.txt"]


def test_an_import_whose_writer_cannot_claim_out_dir_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """review 56 F6: another process wrote a trial into OUT_DIR after the import found it empty (two imports, or
    an import and a training, started into one folder); the import's writer refused to claim worker_0, and the
    import's cleanup then removed everything in OUT_DIR, the other process's trial included. Now nothing is
    removed where no writer of the import opened. The other process writes where the import reads the
    collections file (after the emptiness check, before its first write)."""
    out = tmp_path / "out"
    read_collections = smdebug_importer._read_collections

    def racing(fs: object, root: str) -> object:
        with Writer(out) as writer, writer.stepping():
            writer.save("theirs", np.float32(1.0), ["metrics"])
        return read_collections(fs, root)

    monkeypatch.setattr(smdebug_importer, "_read_collections", racing)
    with pytest.raises(tensortap.TrialExistsError, match="already holds data of worker_0") as refused:
        import_smdebug(DATA / "trial", out)
    assert "nothing was kept" not in str(refused.value)
    trial = tensortap.create_trial(out)
    assert trial.tensor_names() == ["theirs"]
    assert trial.tensor("theirs").value(0) == 1.0


@pytest.mark.parametrize(
    ("mode_step", "why"),
    [
        (str(2**70), f"mode_step {2**70} out of range"),
        ("\u00b2", "mode_step '\u00b2' is not a number"),  # str.isdigit() takes it, int() does not
        ("-1", "mode_step -1 out of range"),  # with no index file to give the step's mode
    ],
)
def test_a_mode_step_that_is_no_step_is_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode_step: str, why: str
) -> None:
    """hunt 36 H36-4: a mode step beyond int64 gave "unexpected error: RuntimeError(... Python int too large
    ...)" blaming the output folder, and wrote an end marker every reader refuses; "²" a raw int() error
    naming no file."""
    tensor = tensor_proto(1, (1,), 5, struct.pack("<f", 1.0))
    event = one_event_trial(tmp_path / "smd", event_of(summary_value("t", tensor, mode="1", mode_step=mode_step)))
    out = tmp_path / "out"
    assert main(["import-smdebug", str(tmp_path / "smd"), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"tensortap import-smdebug: {event}: {why} (nothing was kept: what it had written to {out} was removed)\n"
    )
    assert not out.exists()


SHAPES = Path(__file__).parents[1] / "data" / "smdebug-scalar-shapes"


def test_the_mode_of_a_step_is_its_index_files_and_shapes_alone_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 37 F1: smdebug writes a ``save_scalar`` value of the last TRAIN step before an EVAL step into that
    TRAIN step's event file tagged ``mode=EVAL, mode_step=-1``: the import of such a trial (written by smdebug
    1.0.34, tests/data/make_smdebug_scalar_shapes_trial.py) exited 2 with "mode_step '-1' is not a number".
    Each step's mode is now its index file's, as smdebug's trial reads it. F3: shapes saved with
    ``save_shape=True`` (in the index files only) were dropped without a word, a tensor saved as its shape
    alone not even in ``skipped``: a tensortap trial holds no shape without values, so they are listed there."""
    expected = json.loads((SHAPES / "expected.json").read_text())
    assert main(["import-smdebug", str(SHAPES / "trial"), str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == {
        name: "its shape alone (save_shape): a tensortap trial holds a shape only with its values"
        for name in expected["shapes"]
    }
    trial = tensortap.create_trial(tmp_path / "out")
    assert {str(s): [m.name, ms] for s, (m, ms) in ((s, trial.mode_step(s)) for s in trial.steps())} == expected[
        "steps"
    ]
    lr = trial.tensor("metrics/lr")
    assert {str(s): lr.value(s).item() for s in lr.steps()} == expected["scalar"]
    mean = trial.tensor("Sequential_0.weight")
    assert {str(s): mean.reduction_value(s, "mean") for s in (0, 1)} == pytest.approx(expected["means"])
    assert "Sequential_2.weight" not in trial.tensor_names()

    # an index file that gives no mode step is refused, naming it
    smd = tmp_path / "smd"
    shutil.copytree(SHAPES / "trial", smd)
    index = smd / "index" / "000000000" / "000000000001_worker_0.json"
    content = json.loads(index.read_text())
    for mode_step, why in ((2**70, f"meta mode_step {2**70} out of range"), ("1", "meta mode_step '1' is not")):
        content["meta"]["mode_step"] = mode_step
        index.write_text(json.dumps(content))
        with pytest.raises(SmdebugFormatError, match=f"^{index}: {why}"):
            import_smdebug(smd, tmp_path / f"out-{mode_step}")


REGEX_DATA = Path(__file__).parents[1] / "data" / "smdebug-regex"  # made by tests/data/make_smdebug_regex_trials.py


@pytest.mark.parametrize("kind", ["torch", "xgboost"])
def test_collections_are_what_smdebug_reads_include_regex_too(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 37 F2: the importer read only each collection's ``tensor_names`` and ignored its ``include_regex``,
    which smdebug's trial uses too: ``gradients`` (saved through a regex collection of reductions), a
    collection filled by ``save_tensor`` and XGBoost's ``losses`` came out empty (``act_h`` in ``custom``), so
    vanishing_gradient, loss_not_decreasing and overfit found none of their inputs (exit 2)."""
    expected = json.loads((REGEX_DATA / "expected.json").read_text())[kind]
    out = tmp_path / "out"
    import_smdebug(REGEX_DATA / kind, out)
    trial = tensortap.create_trial(out)
    for collection, members in expected.items():
        if collection in ("all", "default"):
            continue
        names = sorted(tensortap_name(n, [c for c, m in expected.items() if n in m]) for n in members)
        # smdebug's text columns of XGBoost trees are not imported (skipped)
        imported = [n for n in names if n in trial.tensor_names()]
        assert trial.tensor_names(collection=collection) == imported, collection
    assert trial.tensor_names(collection="custom") == []
    if kind == "torch":
        assert trial.tensor_names(collection="acts") == ["act_h"]
        assert len(trial.tensor_names(collection="gradients")) == 4
        rules = ["vanishing_gradient"]
    else:
        assert trial.tensor_names(collection="losses") == [
            "losses/train-error",
            "losses/train-logloss",
            "losses/validation-error",
            "losses/validation-logloss",
        ]
        # two rounds: a check is num_steps=1 apart (hunt 44 F5: none at 10 is not a pass); errors stay at 0
        rules = ["loss_not_decreasing:num_steps=1,diff_percent=-1", "overfit"]
    for rule in rules:
        assert main(["rules", str(out), "--rule", rule]) == 0, rule
        assert "did not fire" in capsys.readouterr().out


def test_tree_depth_says_it_lacks_the_text_columns_smdebug_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 37 F4: smdebug stores ``trees/Yes`` and ``trees/No`` as text, which the import skips; tree_depth
    then said "did not fire" (exit 0, a passing gate) on a trial it could not read at all."""
    out = tmp_path / "out"
    summary = import_smdebug(REGEX_DATA / "xgboost", out)
    assert summary.skipped["trees/Yes"] == summary.skipped["trees/No"] == "not numeric"
    assert main(["rules", str(out), "--rule", "tree_depth"]) == 2
    assert "TreeDepth: found none of its inputs" in capsys.readouterr().out
    rule = TreeDepth(tensortap.create_trial(out))
    with pytest.raises(RuleInputsMissing, match="trees/No, trees/Yes not saved"):
        invoke_rule(rule)


def collections_file(root: Path, text: str) -> Path:
    """An smdebug trial at ``root`` (the test trial's events) whose collections file holds ``text``."""
    shutil.copytree(DATA / "trial", root)
    path = next((root / "collections").rglob("*.json"))
    path.write_text(text)
    return path


def collection(name: str = "c", **spec: object) -> str:
    return json.dumps({"collections": {name: {"tensor_names": [], **spec}}})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON \\(nested too deeply\\)"),
        (json.dumps({"collections": {"evil\ud800": {}}}), "'evil\\\\ud800' is not a collection name"),
        (collection(""), "'' is not a collection name"),
        (collection(reduction_config={"reductions": "max", "save_raw_tensor": "no"}), "'save_raw_tensor'"),
        (collection(reduction_config={"reductions": ["max"]}), "'reductions'"),
        (collection(reduction_config="max"), "'reduction_config' is not an object"),
        (collection(include_regex="^a"), "'include_regex' is not a list of strings"),
        (collection(include_regex=["(unclosed"]), "include_regex '\\(unclosed' is not a pattern"),
        (collection(include_regex=["(a|ab)*c"]), "include_regex '\\(a\\|ab\\)\\*c' could take too long"),
        (json.dumps({"collections": {"c": []}}), "collection 'c': not an object"),
    ],
)
def test_crafted_collections_files_are_refused_naming_them(
    tmp_path: Path, text: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """hunt 36 H36-7: collections JSON nested 100,000 deep gave "unexpected error: RecursionError"; a collection
    named with a lone surrogate an "unexpected" RuntimeError blaming the output folder (leaving a trial
    ``check`` called ok); an empty name a message naming no file; ``"save_raw_tensor": "no"`` was read as true.
    A regex matching could take hours on (``(a|ab)*c``) is refused before it is tried."""
    path = collections_file(tmp_path / "smd", text)
    with pytest.raises(SmdebugFormatError, match=f"^{path}: .*{why}"):
        import_smdebug(tmp_path / "smd", tmp_path / "out")
    assert main(["import-smdebug", str(tmp_path / "smd"), str(tmp_path / "out2"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["kind"] == "input"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_matching_include_regex_is_bounded_by_the_names(tmp_path: Path) -> None:
    """hunt 37 F2 (its fix): ``include_regex`` comes from a stranger's file and is matched by a backtracking
    engine: ``a*a*a*a*x`` against a name of 4,000 characters would take hours; it is refused naming the file,
    while the same pattern is matched against short names."""
    smd = tmp_path / "smd"
    one_event_trial(smd, event_file((1,), (1.0,), ("a" * 4000, "ab")))
    (smd / "collections" / "000000000").mkdir(parents=True)
    path = smd / "collections" / "000000000" / "worker_0_collections.json"
    path.write_text(collection("slow", include_regex=["a*a*a*a*x"]))
    with pytest.raises(SmdebugFormatError, match=f"^{path}: collection 'slow': .* one of 4000 characters"):
        import_smdebug(smd, tmp_path / "out")
    (smd / "events" / "000000000000" / "000000000000_worker_0.tfevents").write_bytes(
        event_file((1,), (1.0,), ("a" * 30 + "x", "ab"))
    )
    import_smdebug(smd, tmp_path / "out2")
    assert tensortap.create_trial(tmp_path / "out2").tensor_names(collection="slow") == ["a" * 30 + "x"]
    # review 55: a usual pattern of several repeats was refused after 42 names of 104 characters (the bounds of
    # all matches were summed); each is bounded on its own, and all of them together by the time they take
    names = [
        f"gradients/model/encoder/layer{i}/attention/self/query/{k}_grad/" + "x" * 40
        for i in range(24)
        for k in ("weight", "bias", "kernel", "beta")
    ]
    smd3 = tmp_path / "smd3"
    one_event_trial(smd3, event_file((1,), (1.0,), tuple(names)))
    (smd3 / "collections" / "000000000").mkdir(parents=True)
    (smd3 / "collections" / "000000000" / "worker_0_collections.json").write_text(
        collection("layers", include_regex=[r".*layer\d+.*(weight|bias)"])
    )
    import_smdebug(smd3, tmp_path / "out3")
    assert len(tensortap.create_trial(tmp_path / "out3").tensor_names(collection="layers")) == 48
