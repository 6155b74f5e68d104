"""smdebug's side of :mod:`bench.bench_read`, run in smdebug's own environment.

``python -m bench.bench_read_smdebug write DIR STEPS`` trains :mod:`bench.read_workload`
with smdebug's hook into ``DIR``; ``python -m bench.bench_read_smdebug read DIR KIND N``
prints the seconds smdebug's trial API takes for ``N`` reads of the tensor of ``KIND``
(:data:`bench.read_workload.KINDS`) over every saved step, each from a freshly created
trial (``value(step)`` for every step: its only way to read values).
"""

from __future__ import annotations

from typing import Any

import smdebug.pytorch as smd
from smdebug.trials import create_trial

from bench import read_workload


def _hook(model: Any, opt: Any, loss_fn: Any, out_dir: str) -> Any:
    hook = smd.Hook(
        out_dir=out_dir,
        save_config=smd.SaveConfig(save_interval=1),
        include_collections=["weights", "losses"],
    )
    hook.register_module(model)
    hook.register_loss(loss_fn)
    return hook


def _read(path: str, collection: str, keep: bool) -> int:
    trial = create_trial(path)
    tensor = trial.tensor(trial.tensor_names(collection=collection)[0])
    if keep:
        return len([tensor.value(s) for s in tensor.steps()])
    return sum(1 for s in tensor.steps() if tensor.value(s) is not None)


if __name__ == "__main__":
    read_workload.main(_hook, _read)
