"""The child process of the shard fuzz test: reads a trial the way users do, reports what came back."""

from __future__ import annotations

import multiprocessing.connection
import traceback
import warnings
from typing import Any

import numpy as np

import tensortap
from tensortap.exceptions import TensortapError
from tensortap.trial.check import inspect_shard


def read_everything(path: str, shard: str, expected_bytes: int) -> dict[str, Any]:
    """Every value and reduction the Trial API returns, what ``check`` says of the shard, or the raw error."""
    values: dict[tuple[str, int], np.ndarray] = {}
    reductions: dict[tuple[str, int], float] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = tensortap.create_trial(path)
            for name in trial.tensor_names():
                t = trial.tensor(name)
                for step in t.steps():
                    try:
                        values[(name, step)] = t.value(step)
                        reductions[(name, step)] = t.reduction_value(step, "l2")
                    except TensortapError:
                        pass
                for step, value in t.values().items():
                    values[(name, -1 - step)] = value
            trial.close()
        problem = inspect_shard(shard, expected_bytes)[0]
    except Exception:  # what the fuzz test hunts: anything but a tensortap error
        return {"raw": traceback.format_exc()}
    return {"values": values, "reductions": reductions, "check_ok": problem is None}


def serve(conn: multiprocessing.connection.Connection) -> None:
    """Answer each ``(trial path, shard path, bytes)`` received with :func:`read_everything`."""
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        conn.send(read_everything(*job))
