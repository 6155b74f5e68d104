"""SPEC section 9 on S3 (the moto server): keys from a trial are validated, nothing is written outside."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.trials import logged_warnings

import tensortap
from tensortap.backends import UnsafeKey, get_storage
from tensortap.capture import Writer

pytestmark = pytest.mark.s3


def test_traversal_in_a_record_writes_nothing_outside(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path, shard_cache: Path
) -> None:
    with Writer(s3_url, storage_options=s3_options) as w:
        with w.stepping():
            w.save("x", np.arange(3, dtype=np.float32))
    storage = get_storage(s3_url, **s3_options)
    escape = "../" * 12 + str(tmp_path / "escaped" / "file").lstrip("/")
    record = storage.read_json("index/worker_0/0000000000.json")
    storage.write_json("index/worker_0/0000000001.json", {**record, "seq": 1, "shard": escape})
    with logged_warnings() as warned:
        trial = tensortap.create_trial(s3_url, **s3_options)
        np.testing.assert_array_equal(trial.tensor("x").value(0), np.arange(3, dtype=np.float32))
    assert len(warned) == 1 and "index/worker_0/0000000001.json" in warned[0] and "'shard'" in warned[0]
    assert not (tmp_path / "escaped").exists()
    assert all(len(name) == 64 for name in os.listdir(shard_cache))  # cached under hashed names only
    with pytest.raises(UnsafeKey):
        storage.local_path(escape)
    with pytest.raises(UnsafeKey):
        storage.read_bytes(escape)
