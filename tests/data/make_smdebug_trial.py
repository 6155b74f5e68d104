"""Write tests/data/smdebug-trial with smdebug 1.0.34 itself, and what smdebug's own trial API reads back.

Run in smdebug's environment (see bench/bench_torch_smdebug.py)::

    /work/smdebug-venv/bin/python tests/data/make_smdebug_trial.py tests/data/smdebug-trial

It writes ``<out>/trial`` (the smdebug trial) and ``<out>/expected.json``
(every tensor at every step, as ``smdebug.trials.create_trial`` reads it).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import smdebug.pytorch as smd
import torch
from smdebug.trials import create_trial
from torch import nn


def train(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = smd.Hook(
        out_dir=str(out_dir),
        save_config=smd.SaveConfig(save_interval=2),
        include_collections=["weights", "biases", "gradients", "losses", "gradient_norms"],
    )
    norms = hook.get_collection("gradient_norms")  # reductions only, no raw tensor
    norms.include(r"^gradient/Sequential_2\.")
    norms.reduction_config = smd.ReductionConfig(reductions=["mean", "max"], abs_reductions=["max"], norms=["l2"])
    hook.register_module(model)
    hook.register_loss(loss_fn)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g)
    for _epoch in range(2):
        hook.set_mode(smd.modes.TRAIN)
        model.train()
        for i in range(0, 32, 8):
            opt.zero_grad()
            loss = loss_fn(model(x[i : i + 8]), y[i : i + 8])
            loss.backward()
            opt.step()
            hook.save_scalar("lr", 0.1)
        hook.set_mode(smd.modes.EVAL)
        model.eval()
        with torch.no_grad():
            for i in range(32, 40, 4):
                loss_fn(model(x[i : i + 4]), y[i : i + 4])
    hook.close()


def read_back(out_dir: Path) -> dict[str, object]:
    trial = create_trial(str(out_dir))
    tensors: dict[str, object] = {}
    for name in trial.tensor_names():
        t = trial.tensor(name)
        values = {}
        for step in t.steps():
            mode, mode_step = trial.mode_modestep(step)
            value = t.value(step)
            entry = {"mode": mode.name, "mode_step": int(mode_step), "shape": list(np.shape(value))}
            entry["value"] = np.asarray(value, dtype=np.float64).ravel().tolist()
            entry["dtype"] = str(np.asarray(value).dtype)
            reductions = {}
            for red in ("mean", "max"):
                try:
                    reductions[red] = float(t.reduction_value(step, red, abs=False))
                except Exception:
                    pass
            try:
                reductions["l2"] = float(t.reduction_value(step, "l2", abs=False))
            except Exception:
                pass
            entry["reductions"] = reductions
            values[str(step)] = entry
        tensors[name] = values
    return {
        "steps": [int(s) for s in trial.steps()],
        "workers": sorted(trial.workers()),
        "collections": {c: sorted(trial.tensor_names(collection=c)) for c in trial.collections()},
        "tensors": tensors,
    }


if __name__ == "__main__":
    root = Path(sys.argv[1])
    shutil.rmtree(root / "trial", ignore_errors=True)
    train(root / "trial")
    (root / "expected.json").write_text(json.dumps(read_back(root / "trial"), indent=1, sort_keys=True) + "\n")
