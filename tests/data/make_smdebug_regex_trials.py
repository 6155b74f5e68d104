"""Write tests/data/smdebug-regex with smdebug 1.0.34 itself: trials whose collections hold members as
``include_regex`` only, and the collections smdebug's own trial API reads back.

Run in smdebug's environment (with xgboost-cpu; smdebug.xgboost imports ``pkg_resources``)::

    /work/smd2/bin/python tests/data/make_smdebug_regex_trials.py tests/data/smdebug-regex

It writes ``<out>/torch`` (PyTorch: the ``gradients`` collection saved through a collection of reductions
filled by a regex, a tensor saved by ``save_tensor`` into a regex collection), ``<out>/xgboost`` (XGBoost with
training and validation data: ``losses`` and ``metrics`` are regexes; ``trees/*`` holds string columns) and
``<out>/expected.json``: ``{trial: {collection: [smdebug tensor names]}}`` as ``smdebug.trials.create_trial``
reads them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pkg_resources

_distribution = pkg_resources.get_distribution
# smdebug asks for the distribution "xgboost"; xgboost-cpu installs the same module under another name
pkg_resources.get_distribution = lambda n: _distribution("xgboost-cpu" if n == "xgboost" else n)

import smdebug.pytorch as smd  # noqa: E402
import torch  # noqa: E402
import xgboost  # noqa: E402
from smdebug import SaveConfig  # noqa: E402
from smdebug.trials import create_trial  # noqa: E402
from smdebug.xgboost import Hook as XGBoostHook  # noqa: E402
from torch import nn  # noqa: E402


def train_torch(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = smd.Hook(
        out_dir=str(out_dir),
        save_config=smd.SaveConfig(save_interval=1),
        include_collections=["losses", "gnorms", "acts"],
    )
    norms = hook.get_collection("gnorms")  # the gradients, as reductions only: "gradients" is not saved itself
    norms.include("^gradient/")
    norms.reduction_config = smd.ReductionConfig(reductions=["mean"], abs_reductions=["mean"], norms=["l2"])
    hook.get_collection("acts").include("^act_")
    hook.register_module(model)
    hook.register_loss(loss_fn)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    hook.set_mode(smd.modes.TRAIN)
    for i in range(0, 16, 8):
        opt.zero_grad()
        loss_fn(model(x[i : i + 8]), y[i : i + 8]).backward()
        hook.save_tensor("act_h", model[0](x[i : i + 8]).detach(), collections_to_write="acts")
        opt.step()
    hook.close()


def train_xgboost(out_dir: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] > 0).astype(float)
    train, validation = xgboost.DMatrix(x[:30], label=y[:30]), xgboost.DMatrix(x[30:], label=y[30:])
    hook = XGBoostHook(
        out_dir=str(out_dir),
        train_data=train,
        validation_data=validation,
        save_config=SaveConfig(save_interval=1),
        include_collections=["metrics", "losses", "trees"],
    )
    params = {"objective": "binary:logistic", "max_depth": 2, "eval_metric": ["logloss", "error"]}
    xgboost.train(
        params, train, num_boost_round=2, evals=[(train, "train"), (validation, "validation")], callbacks=[hook]
    )


def collections(trial_dir: Path) -> dict[str, list[str]]:
    trial = create_trial(str(trial_dir))
    return {c: sorted(trial.tensor_names(collection=c)) for c in trial.collections()}


if __name__ == "__main__":
    root = Path(sys.argv[1])
    expected = {}
    for name, train in (("torch", train_torch), ("xgboost", train_xgboost)):
        shutil.rmtree(root / name, ignore_errors=True)
        train(root / name)
        expected[name] = collections(root / name)
    (root / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
