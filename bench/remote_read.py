"""Open a trial on S3 and read its tensors, with each request delayed as a distant bucket would.

Not part of ``python -m bench`` (it needs moto, a test dependency):
``python -m bench.remote_read [seconds a request]`` (default 0.02). A moto S3 server on
127.0.0.1 holds a trial of 200 steps in 20 shards (three 64 x 64 float32 weights and the
loss); every request s3fs makes waits ``seconds`` first. Prints the seconds and the
requests of opening the trial (``tensor_names()``), of reading every tensor's
``values()`` (then again, alternately within ``trial.frozen()``), of ``to_pandas`` of
their means and of ``tensortap check`` of it; then of one refresh of a trial of
:data:`WORKERS` workers, which looks for new data (bench/profiles/read.md, "A trial on
object storage").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

REQUESTS = ("_info", "_cat_file", "_get_file", "_lsdir", "_find", "_exists")
"""The s3fs coroutines delayed and counted: every request a reader makes goes through one of them."""
WORKERS = 8
"""Workers of the trial whose refresh is timed (a torchrun of 8 processes)."""
REFRESHES = 5


def _delayed(counts: collections.Counter[str], delay: list[float]) -> None:
    """Make each of :data:`REQUESTS` wait ``delay[0]`` seconds first and count its calls in ``counts``."""
    import s3fs

    def wrap(name: str, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def request(self: Any, *args: Any, **kwargs: Any) -> Any:
            if delay[0]:
                counts[name] += 1
                await asyncio.sleep(delay[0])
            return await original(self, *args, **kwargs)

        return request

    for name in REQUESTS:
        setattr(s3fs.S3FileSystem, name, wrap(name, getattr(s3fs.S3FileSystem, name)))


def main(seconds: float) -> None:
    """Write the trial without delay, then open and read it with ``seconds`` a request."""
    import s3fs
    from moto.server import ThreadedMotoServer

    counts: collections.Counter[str] = collections.Counter()
    delay = [0.0]
    _delayed(counts, delay)  # before any filesystem is made: fsspec binds its sync methods then
    import tensortap
    from tensortap.capture import ShardPolicy, Writer
    from tensortap.trial.check import find_problems

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    cache = tempfile.mkdtemp(prefix="tensortap-bench-")
    os.environ["TENSORTAP_CACHE_DIR"] = cache  # the shard cache: read when a storage is made
    try:
        host, port = server.get_host_and_port()
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("tensortap-bench")
        url = f"s3://tensortap-bench/{uuid.uuid4().hex}"
        rng = np.random.default_rng(0)
        with Writer(url, storage_options=options, shard_policy=ShardPolicy(max_steps=10)) as writer:
            for step in range(200):
                with writer.stepping():
                    for i in range(3):
                        writer.save(f"dense{i}/kernel", rng.normal(size=(64, 64)).astype(np.float32), ["weights"])
                    writer.save("losses/loss", np.float32(1.0 / (step + 1)), collections=["losses"])
        delay[0] = seconds
        start = time.perf_counter()
        trial = tensortap.create_trial(url, **options)
        names = sorted(trial.tensor_names())
        opened, opening = time.perf_counter() - start, dict(counts)
        counts.clear()
        start = time.perf_counter()
        for name in names:
            assert len(trial.tensor(name).values()) == 200
        read = time.perf_counter() - start
        print(f"{seconds * 1e3:.0f} ms a request; open: {opened:.2f} s, requests {opening}")
        print(f"values() of {len(names)} tensors over 20 shards: {read:.2f} s, requests {dict(counts)}")
        for frozen in (False, True, False, True):  # the same range reads: the listings and HEADs differ
            counts.clear()
            start = time.perf_counter()
            with trial.frozen() if frozen else contextlib.nullcontext():
                for name in names:
                    assert len(trial.tensor(name).values()) == 200
            again = time.perf_counter() - start
            how = "within trial.frozen()" if frozen else "again"
            print(f"values() of the {len(names)} tensors {how}: {again:.2f} s, requests {dict(counts)}")
        import pandas  # noqa: F401  (imported before the clock starts: 1.5 s the first time)

        counts.clear()
        start = time.perf_counter()
        assert len(trial.to_pandas(reductions=["mean"])) == 4 * 200
        framed = time.perf_counter() - start
        print(f"to_pandas(reductions=['mean']) of the {len(names)} tensors: {framed:.2f} s, requests {dict(counts)}")
        counts.clear()
        start = time.perf_counter()
        assert find_problems(url, options, show_progress=False) == []
        checked = time.perf_counter() - start
        print(f"check of its 20 shards (downloaded): {checked:.2f} s, requests {dict(counts)}")
        delay[0] = 0.0
        url = f"s3://tensortap-bench/{uuid.uuid4().hex}"
        for rank in range(WORKERS):
            with Writer(url, storage_options=options, rank=rank, include_workers="all") as writer:
                for step in range(10):
                    with writer.stepping():
                        writer.save("losses/loss", np.float32(1.0 / (step + 1)), collections=["losses"])
        trial = tensortap.create_trial(url, **options)
        assert len(trial.workers()) == WORKERS
        delay[0] = seconds
        counts.clear()
        start = time.perf_counter()
        for _ in range(REFRESHES):
            trial.refresh()
        refreshed = (time.perf_counter() - start) / REFRESHES
        print(f"refresh of a trial of {WORKERS} workers: {refreshed:.2f} s, requests {dict(counts)} in {REFRESHES}")
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.02)
