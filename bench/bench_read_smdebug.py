"""smdebug's side of :mod:`bench.bench_read`, run in smdebug's own environment.

``python -m bench.bench_read_smdebug write DIR [STEPS]`` trains :mod:`bench.read_workload`
with smdebug's hook into ``DIR``; ``python -m bench.bench_read_smdebug read DIR`` prints,
as JSON, the seconds smdebug's trial API takes to read the loss and the 1.6 MB weight over
every saved step, each from a freshly created trial.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench import read_workload


def _hook(model: Any, opt: Any, loss_fn: Any) -> Any:
    import smdebug.pytorch as smd

    hook = smd.Hook(
        out_dir=sys.argv[2],
        save_config=smd.SaveConfig(save_interval=1),
        include_collections=["weights", "losses"],
    )
    hook.register_module(model)
    hook.register_loss(loss_fn)
    return hook


def _read(path: str, collection: str) -> float:
    from smdebug.trials import create_trial

    t0 = time.perf_counter()
    trial = create_trial(path)
    name = trial.tensor_names(collection=collection)[0]
    tensor = trial.tensor(name)
    n = sum(1 for s in tensor.steps() if tensor.value(s) is not None)
    elapsed = time.perf_counter() - t0
    assert n >= 10, (name, n)
    return elapsed


def main() -> None:
    """Write or read, as the command line says."""
    if sys.argv[1] == "write":
        read_workload.train(_hook, int(sys.argv[3]) if len(sys.argv) > 3 else read_workload.STEPS)
    else:
        print(json.dumps({"small": _read(sys.argv[2], "losses"), "big": _read(sys.argv[2], "weights")}))


if __name__ == "__main__":
    main()
