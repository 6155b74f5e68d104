"""Where each file of a trial lives, and the JSON records (format version 1).

See ``docs/format.md`` for the normative description.
"""

from __future__ import annotations

FORMAT_VERSION = 1
# Additions within a version that older readers ignore safely: 1 = per-step wall time and histograms.
FORMAT_MINOR = 1

SHARDS = "shards"
INDEX = "index"
WORKERS = "workers"
ENDS = "end"
STOP_REQUEST = "control/stop.json"


def shard_key(worker: str, seq: int) -> str:
    """Key of a worker's ``seq``-th shard."""
    return f"{SHARDS}/{worker}/{seq:010d}.h5"


def index_key(worker: str, seq: int) -> str:
    """Key of the index record of a worker's ``seq``-th shard."""
    return f"{INDEX}/{worker}/{seq:010d}.json"


def worker_key(worker: str) -> str:
    """Key of the record a worker writes when it starts."""
    return f"{WORKERS}/{worker}.json"


def end_key(worker: str) -> str:
    """Key of the end-of-training marker of a worker."""
    return f"{ENDS}/{worker}.json"


def worker_name(rank: int) -> str:
    """``worker_<rank>``."""
    return f"worker_{rank}"
