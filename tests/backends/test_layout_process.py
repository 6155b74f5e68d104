"""Shards laid out in the layout process (``shard.Layouts``): the same file, and every failure of
the process falls back to the writer's own layout, said once, with nothing lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers.trials import logged_warnings

import tensortap
from tensortap.backends import shard
from tensortap.capture import Writer
from tensortap.reductions import Histogram


@pytest.fixture()
def layouts(monkeypatch: pytest.MonkeyPatch) -> Iterator[shard.Layouts]:
    """A fresh layout process for the test, started, in place of the process's own."""
    fresh = shard.Layouts()
    fresh.enabled = True
    monkeypatch.setattr(shard, "LAYOUTS", fresh)
    assert fresh.lay_out("unused", []) is None  # the first shard is laid out here; the process starts
    deadline = time.monotonic() + 120
    while not fresh.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fresh.running
    yield fresh
    fresh.close()


def _asks(monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts) -> list[str]:
    """The paths the layout process is asked to lay out, from now on."""
    asked: list[str] = []
    real = layouts.child.ask

    def ask(path: str, ops: list[Any]) -> Any:
        asked.append(path)
        return real(path, ops)

    monkeypatch.setattr(layouts.child, "ask", ask)
    return asked


def _buffer() -> shard.ShardBuffer:
    """Two steps of every kind of content a shard holds."""
    buffer = shard.ShardBuffer()
    edges = np.linspace(-1, 1, 5)
    for step in range(2):
        buffer.stage(step, "w", ["weights"], np.arange(6, dtype=np.float32).reshape(2, 3) + step, {"mean": step}, None)
        buffer.stage(step, "big", ["weights"], np.arange(4, dtype=">f8"), {}, None)
        buffer.stage(step, "flags", ["custom"], np.array([True, step == 1]), {}, None)
        buffer.stage(step, "c", ["custom"], np.array([1 + 2j], dtype=np.complex64), {}, None)
        buffer.stage(step, "half", ["custom"], np.ones(3, dtype=np.float32), {}, "bfloat16")
        buffer.stage(step, "ragged", ["custom"], np.arange(step + 2, dtype=np.int16), {}, None)
        buffer.stage(step, "g", ["gradients"], None, {"l2": 0.5 * step}, None, Histogram(edges, np.arange(4) + step))
        buffer.commit(step, 1, step)
    return buffer


def _dump(path: Path) -> dict[str, Any]:
    """Every object of an HDF5 file: each dataset's type, shape and bytes, and every attribute."""
    objects: dict[str, Any] = {"/": {k: v.tobytes() for k, v in h5py.File(path, "r").attrs.items()}}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            attrs = {k: np.asarray(v).tobytes() for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                objects[name] = (obj.dtype.str, obj.shape, obj[()].tobytes(), attrs)
            else:
                objects[name] = attrs

        f.visititems(visit)
    return objects


def test_a_shard_laid_out_in_the_process_holds_what_one_laid_out_here_holds(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, tmp_path: Path
) -> None:
    asked = _asks(monkeypatch, layouts)
    there, here, buffer = tmp_path / "there.h5", tmp_path / "here.h5", _buffer()
    record_there = shard.prepare_shard(str(there), "worker_0", 0, buffer, "k").write()
    assert asked == [str(there)]
    layouts.enabled = False
    record_here = shard.prepare_shard(str(here), "worker_0", 0, buffer, "k").write()
    assert asked == [str(there)]
    assert _dump(there) == _dump(here)
    assert record_there == {**record_here, "bytes": record_there["bytes"]}
    reader = shard.ShardReader(str(there))
    reader.validate()
    assert reader.values("w")[1].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert reader.values("big")[0].dtype.str == ">f8"
    assert reader.histograms("g")[1].counts.tolist() == [1, 2, 3, 4]
    reader.close()


def test_a_compressed_shard_is_laid_out_here(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, tmp_path: Path
) -> None:
    """HDF5 writes compressed data itself: the layout process is not asked."""
    asked = _asks(monkeypatch, layouts)
    path = tmp_path / "gzip.h5"
    shard.prepare_shard(str(path), "worker_0", 0, _buffer(), "k", compression="gzip").write()
    assert asked == []
    with h5py.File(path, "r") as f:
        tid = json.loads(f["names"][()].tobytes()).index("w")
        assert f[f"tensors/{tid}/data"].compression == "gzip"


def test_a_layout_process_that_dies_is_said_once_and_every_step_is_kept(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, tmp_path: Path
) -> None:
    asked = _asks(monkeypatch, layouts)
    with logged_warnings() as warnings, Writer(tmp_path) as w:
        for step in range(6):
            with w.stepping():
                w.save("w", np.full(3, step, dtype=np.float32))
            w.flush()
            if step == 1:
                assert asked, "the layout process laid out no shard"
                proc = layouts.child._proc
                assert proc is not None
                proc.kill()
                proc.wait()
    failures = [m for m in warnings if "layout process failed" in m]
    assert len(failures) == 1 and not layouts.running
    assert warnings == failures
    values = tensortap.create_trial(tmp_path).tensor("w").values()
    assert {s: v.tolist() for s, v in values.items()} == {s: [s] * 3 for s in range(6)}


def test_an_error_in_the_layout_process_is_raised_by_the_writers_own_layout(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, tmp_path: Path
) -> None:
    """A shard the process cannot create (here: its folder is gone) is laid out here, which raises
    the error itself; the process keeps running for the next shard."""
    asked = _asks(monkeypatch, layouts)
    missing = tmp_path / "gone" / "x.h5"
    with pytest.raises(OSError):
        shard.prepare_shard(str(missing), "worker_0", 0, _buffer(), "k").write()
    assert asked == [str(missing)] and layouts.running
    shard.prepare_shard(str(tmp_path / "next.h5"), "worker_0", 1, _buffer(), "k").write()
    assert asked[-1] == str(tmp_path / "next.h5")


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system of 1 MiB, filled but for two pages (a tmpfs: needs the right to mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"no tmpfs could be mounted: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.ftruncate(fd, os.fstat(fd).st_size - 2 * 4096)
        os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_met_by_the_layout_process_is_raised_by_the_writers_own_layout(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, full_disk: Path, tmp_path: Path
) -> None:
    """HDF5 raises a RuntimeError when a full disk fails its last flush: it ended the layout process, and the
    writer warned that "reading it killed the process that read it". It is answered as an error now: the
    shard is laid out here, which raises it, and the process lays out the next shard."""
    asked = _asks(monkeypatch, layouts)
    with pytest.raises((OSError, RuntimeError)):
        shard.prepare_shard(str(full_disk / "x.h5"), "worker_0", 0, _buffer(), "k").write()
    assert asked == [str(full_disk / "x.h5")] and layouts.running
    shard.prepare_shard(str(tmp_path / "next.h5"), "worker_0", 1, _buffer(), "k").write()
    assert asked[-1] == str(tmp_path / "next.h5") and layouts.running


@pytest.mark.parametrize("why", ["variable", "frozen"])
def test_the_layout_process_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, why: str) -> None:
    """By the variable, and in a frozen application, whose executable is the application."""
    if why == "variable":
        monkeypatch.setenv("TENSORTAP_LAYOUT_PROCESS", "0")
    else:
        monkeypatch.setattr("sys.frozen", True, raising=False)
    off = shard.Layouts()
    monkeypatch.setattr(shard, "LAYOUTS", off)
    for seq in range(2):
        shard.prepare_shard(str(tmp_path / f"{seq}.h5"), "worker_0", seq, _buffer(), "k").write()
    assert off.child._proc is None and not off.running


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_process_starts_its_own_layout_process(layouts: shard.Layouts, tmp_path: Path) -> None:
    """The parent's process is the parent's: a forked child lays its first shard out itself and
    never writes to the parent's pipe."""
    parent_proc = layouts.child._proc
    pid = os.fork()
    if pid == 0:  # the forked child
        code = 1
        try:
            if not layouts.running and layouts.child._proc is None:
                shard.prepare_shard(str(tmp_path / "child.h5"), "worker_0", 0, _buffer(), "k").write()
                code = 0 if shard.ShardReader(str(tmp_path / "child.h5")).values("w") else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert layouts.running and layouts.child._proc is parent_proc and parent_proc.poll() is None
    shard.prepare_shard(str(tmp_path / "parent.h5"), "worker_0", 0, _buffer(), "k").write()


def test_a_relative_path_is_laid_out_where_the_writer_is_now(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, tmp_path: Path
) -> None:
    """The layout process keeps the directory it started in; the writer's may have changed since."""
    asked = _asks(monkeypatch, layouts)
    monkeypatch.chdir(tmp_path)
    shard.prepare_shard("relative.h5", "worker_0", 0, _buffer(), "k").write()
    assert asked == [str(tmp_path / "relative.h5")]
    reader = shard.ShardReader(str(tmp_path / "relative.h5"))
    reader.validate()
    assert reader.values("w")[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    reader.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_layout_process_outlives_a_ctrl_c_or_sigterm_sent_to_every_process(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, tmp_path: Path, sig: int
) -> None:
    """A terminal's Ctrl-C (or a job's SIGTERM) reaches every process of the group: the training may
    catch it and go on, and its shards are still laid out by the process, without a warning."""
    asked = _asks(monkeypatch, layouts)
    pid = layouts.child.pid
    assert pid is not None
    os.kill(pid, sig)
    time.sleep(0.2)  # time for a signal that would end it to do so
    with logged_warnings() as warnings:
        shard.prepare_shard(str(tmp_path / "after.h5"), "worker_0", 0, _buffer(), "k").write()
    assert asked == [str(tmp_path / "after.h5")] and layouts.running and not warnings


def test_closing_does_not_wait_for_a_layout_stuck_on_the_disk(
    monkeypatch: pytest.MonkeyPatch, layouts: shard.Layouts, tmp_path: Path
) -> None:
    """At exit the helper is closed: a layout in flight that does not end (here the helper is
    stopped, as one stuck on a disk that does not answer) is waited for a moment, then the helper is
    killed and the shard is laid out in the writer's process, without a warning."""
    monkeypatch.setattr(shard, "CLOSE_SECONDS", 0.5)
    asked = _asks(monkeypatch, layouts)
    pid = layouts.child.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    path = tmp_path / "stuck.h5"
    writing = threading.Thread(target=lambda: shard.prepare_shard(str(path), "worker_0", 0, _buffer(), "k").write())
    with logged_warnings() as warnings:
        writing.start()
        while not asked:
            time.sleep(0.01)
        layouts.close()
        writing.join(60)
    assert not writing.is_alive() and not warnings and layouts.child.pid is None
    reader = shard.ShardReader(str(path))
    reader.validate()
    reader.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="flock: POSIX")
def test_a_shard_is_laid_out_without_a_file_lock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HDF5's file lock is not taken while a shard is laid out: a process that forks meanwhile (the
    layout helper starting while the first shard is laid out here: seen failing under load in CI; a
    DataLoader worker) would keep it, and a reader could not open the published shard ("unable to
    lock file"). Checked from another descriptor while the file is open in HDF5."""
    import fcntl

    path = tmp_path / "plain.h5"
    locked: list[bool] = []
    allocated = shard._allocated

    def allocated_and_checked(*args: Any) -> Any:
        if not locked:
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked.append(False)
            except BlockingIOError:
                locked.append(True)
            finally:
                os.close(fd)
        return allocated(*args)

    monkeypatch.setattr(shard, "_allocated", allocated_and_checked)
    monkeypatch.setattr(shard.LAYOUTS, "enabled", False)  # laid out in this process, where it is watched
    shard.prepare_shard(str(path), "worker_0", 0, _buffer(), "k").write()
    assert locked == [False]
    reader = shard.ShardReader(str(path))
    reader.validate()
    reader.close()


def test_without_pwritev_the_values_are_written_piece_by_piece(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``os.pwritev`` is missing on macOS before 11: each piece of a run is written on its own."""
    monkeypatch.delattr(shard.os, "pwritev")
    path, buffer = tmp_path / "plain.h5", _buffer()
    shard.prepare_shard(str(path), "worker_0", 0, buffer, "k").write()
    reader = shard.ShardReader(str(path))
    reader.validate()
    assert reader.values("w")[1].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert reader.values("ragged")[1].tolist() == [0, 1, 2]
    reader.close()


def test_a_users_module_named_like_a_standard_one_does_not_stop_the_helper_processes(tmp_path: Path) -> None:
    """A training script whose folder (here also the working directory) holds a ``types.py`` of the
    user's: Python imported the standard ``types`` before the script's folder was on its path, so
    the script runs, and the helper processes (layout, ``check``, format-1 vetting) must start too.

    Python imports ``types`` at startup only where something run then needs it (on 3.11, the finder
    of an editable install, a ``.pth`` file of site-packages); on 3.13 nothing does, and there the
    script itself could not start (tensortap's ``import re`` reaches ``types`` through ``enum``). So
    the script imports the standard ``types`` first, its folder off the path for that one import, as
    such a startup does, on every Python and install. The helper is a fresh interpreter whose imports
    reach ``types`` too, and would find the user's one if its path put the script's folder first."""
    (tmp_path / "types.py").write_text("raise ImportError('the types.py beside the script was imported')\n")
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import sys
            here = sys.path.pop(0)  # the script's folder, as Python put it first on the path
            import types  # the standard one, as Python imported it at startup before 3.13
            sys.path.insert(0, here)
            from tensortap.backends import isolated
            child = isolated.ShardChild("tensortap.backends.shard:lay_out_or_error", 60)
            child.start()
            print("started" if child.alive else "not started")
            child.close()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "started", done.stderr


def test_a_ctrl_c_while_the_layout_process_starts_does_not_end_it(tmp_path: Path) -> None:
    """A notebook's "interrupt" (SIGINT to the kernel's process group) that comes while the helper is
    still importing: the helper ignored SIGINT only once its imports were done, so it died (exit status
    -2) and shards were laid out in the training process for the rest of the session."""
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import os, signal, threading
            from tensortap.backends import isolated
            signal.signal(signal.SIGINT, lambda *_: print("caught"))  # the kernel catches it and goes on
            child = isolated.ShardChild("tensortap.backends.shard:lay_out_or_error", 60, keep_on_signals=True)
            threading.Timer(0.05, os.killpg, (os.getpgrp(), signal.SIGINT)).start()  # while the child imports
            child.start()
            print("started" if child.alive else "not started")
            child.close()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "train.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        start_new_session=True,  # its own group: the SIGINT reaches it and its children, not pytest
    )
    assert done.returncode == 0 and done.stdout.split() == ["caught", "started"], (done.stdout, done.stderr)
