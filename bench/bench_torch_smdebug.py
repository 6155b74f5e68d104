"""The cases of :mod:`bench.bench_torch`, timed with smdebug 1.0.34 instead of tensortap.

smdebug needs its own environment (NumPy < 2.3, protobuf <= 3.20.3)::

    python -m venv /work/smdebug-venv
    /work/smdebug-venv/bin/pip install smdebug==1.0.34 "numpy==2.2.*" "protobuf<=3.20.3" \\
        torch==2.13.0 requests pandas psutil
    /work/smdebug-venv/bin/python -m bench.bench_torch_smdebug [RESULTS.json]

``nox -s bench`` does this in ``.nox/smdebug`` and merges the rows into the torch table.

smdebug captures gradients with backward hooks and writes one TFRecord event
file per step; its losses come from the registered loss module, as ours do.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.bench_torch import measure, show


def _smdebug_hook(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    out_dir: str,
    interval: int,
    collections: Sequence[str],
) -> Any:
    import smdebug.pytorch as smd

    # smdebug's "outputs" collection only holds modules added to it by hand; every layer's outputs are a regex
    hook = smd.Hook(
        out_dir=out_dir,
        save_config=smd.SaveConfig(save_interval=interval),
        include_collections=[c for c in collections if c != "outputs"],
        include_regex=[r".*_output_\d+$"] if "outputs" in collections else None,
    )
    hook.register_module(model)
    hook.register_loss(loss_fn)
    return hook


def run() -> list[dict[str, Any]]:
    """Measure and return one row per case (run with smdebug's environment)."""
    return measure(_smdebug_hook, "smdebug")


if __name__ == "__main__":
    rows = run()
    show(rows)
    if len(sys.argv) > 1:  # a JSON file for `python -m bench` to merge into docs/performance.md
        Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
        Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
