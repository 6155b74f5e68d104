"""Write tests/data/smdebug-scalar-shapes with smdebug 1.0.34 itself, and what smdebug's own trial API reads back.

Two cases tests/data/smdebug-trial lacks (hunt 37 F1, F3): ``save_scalar`` at the last saved TRAIN step before
an EVAL step (smdebug writes that scalar into the TRAIN step's event file tagged ``mode=EVAL, mode_step=-1``;
its index file says TRAIN), and shapes saved with ``save_shape=True`` (only in the index files): one tensor
with a reduction, one as its shape alone. Also ``checksummed.tfrecord``: records whose payload CRC-32C smdebug
computed (its trials store a constant instead; hunt 36 H36-2). Run in smdebug's environment (see
bench/bench_torch_smdebug.py)::

    /work/smdebug-venv/bin/python tests/data/make_smdebug_scalar_shapes_trial.py tests/data/smdebug-scalar-shapes

It writes ``<out>/trial`` (the smdebug trial), ``<out>/expected.json`` and ``<out>/checksummed.tfrecord``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import smdebug.pytorch as smd
import torch
from smdebug.core.tfrecord.record_writer import RecordWriter
from smdebug.trials import create_trial
from torch import nn


def train(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = smd.Hook(
        out_dir=str(out_dir),
        save_config=smd.SaveConfig(save_interval=1),
        include_collections=["losses", "wshape", "onlyshape"],
    )
    with_mean = hook.get_collection("wshape")
    with_mean.include(r"^Sequential_0\.weight$")
    with_mean.reduction_config = smd.ReductionConfig(reductions=["mean"], save_shape=True, save_raw_tensor=False)
    only_shape = hook.get_collection("onlyshape")
    only_shape.include(r"^Sequential_2\.weight$")
    only_shape.reduction_config = smd.ReductionConfig(save_shape=True, save_raw_tensor=False)
    hook.register_module(model)
    hook.register_loss(loss_fn)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    hook.set_mode(smd.modes.TRAIN)
    for i in range(0, 16, 8):
        opt.zero_grad()
        loss_fn(model(x[i : i + 8]), y[i : i + 8]).backward()
        opt.step()
        hook.save_scalar("lr", 0.1)
    hook.set_mode(smd.modes.EVAL)
    with torch.no_grad():
        loss_fn(model(x[:8]), y[:8])
    hook.close()


def read_back(out_dir: Path) -> dict[str, object]:
    trial = create_trial(str(out_dir))
    return {
        "steps": {str(s): [trial.mode(s).name, int(trial.mode_step(s))] for s in trial.steps()},
        "tensors": {name: [int(s) for s in trial.tensor(name).steps()] for name in trial.tensor_names()},
        "shapes": {name: list(trial.tensor(name).shape(0)) for name in ("Sequential_0.weight", "Sequential_2.weight")},
        "means": {str(s): float(trial.tensor("Sequential_0.weight").reduction_value(s, "mean")) for s in (0, 1)},
        "scalar": {str(s): float(trial.tensor("scalar/lr").value(s).item()) for s in trial.tensor("scalar/lr").steps()},
    }


def checksummed(path: Path) -> None:
    """Records whose payload CRCs smdebug computed (``write_checksum=True``): a short one, a long one."""
    writer = RecordWriter(str(path), write_checksum=True)
    writer.write_record(b"123456789")
    writer.write_record(bytes(range(256)) * 80)  # 20,480 bytes: past the importer's byte-at-a-time loop
    writer.close()


if __name__ == "__main__":
    root = Path(sys.argv[1])
    shutil.rmtree(root / "trial", ignore_errors=True)
    train(root / "trial")
    checksummed(root / "checksummed.tfrecord")
    (root / "expected.json").write_text(json.dumps(read_back(root / "trial"), indent=1, sort_keys=True) + "\n")
