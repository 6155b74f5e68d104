"""The cases of :mod:`bench.bench_torch`, timed with smdebug 1.0.34 instead of tensortap.

smdebug needs its own environment (NumPy < 2.3, protobuf <= 3.20.3)::

    python -m venv /work/smdebug-venv
    /work/smdebug-venv/bin/pip install smdebug==1.0.34 "numpy==2.2.*" "protobuf<=3.20.3" \\
        torch==2.13.0 requests pandas psutil
    TENSORTAP_SMDEBUG_PYTHON=/work/smdebug-venv/bin/python python -m bench torch

``nox -s bench`` builds it in ``.nox/smdebug``. Each smdebug arm is a process of that
environment (:class:`bench.harness.Remote`) that keeps its model and hook for the whole
run and is interleaved, block by block, with the arms of :mod:`bench.bench_torch`.

smdebug captures gradients with backward hooks and writes one TFRecord event
file per step; its losses come from the registered loss module, as ours do.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bench import harness
from bench.bench_torch import CASES, DEEP_ARM, TrainArm


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


class SyncedArm(TrainArm):
    """An smdebug arm whose settle writes the files of its block to disk (``os.sync``), as a tensortap
    arm's settle publishes and fsyncs its shards: otherwise the kernel writes them back later (30 s,
    ``vm.dirty_expire_centisecs``), in other arms' blocks, and bills those arms for it."""

    def settle(self) -> None:
        super().settle()
        os.sync()

    def discard(self) -> None:
        """Remove the trial, and keep smdebug from writing its end-of-job file into it again at exit
        (its hook registers its clean-up with :mod:`atexit`, which would make the folder anew)."""
        if self.hook is not None:
            atexit.unregister(self.hook._cleanup)
        super().discard()


if __name__ == "__main__":  # python -m bench.bench_torch_smdebug CASE [deep]: serve that case of CASES as an arm
    torch.set_num_threads(1)
    _, interval, collections = CASES[int(sys.argv[1])]
    model = DEEP_ARM if sys.argv[2:] == ["deep"] else {}  # "deep": the per-tensor table's model
    harness.serve(lambda: SyncedArm(_smdebug_hook, interval, collections, **model))
