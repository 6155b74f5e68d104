"""The Python blocks of the README and of the docs pages (quickstarts, trial, rules, format) run against the code.

Each block runs as written, in a namespace that holds small real objects for the names it takes
from the reader's script (``model``, ``optimizer``, ``loader``, ``dtrain``...), with its ``/tmp/...``
paths moved under the test's folder. A name, argument or tensor name the code no longer has fails
here. Every block of a page has a setup below or a reason it does not run here, so that a new
block cannot go untested unnoticed. The Lightning and Transformers quickstarts run in their own
test files (tests/integrations), beside those frameworks' fixtures.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.docs import ROOT, commands, python_blocks, run_block

Setup = Callable[[Path], dict[str, Any]]


# ---------------------------------------------------------------- PyTorch
def torch_imports() -> dict[str, Any]:
    """The imports of the pages' first PyTorch block, which the later ones use."""
    torch = pytest.importorskip("torch")
    import tensortap
    import tensortap.torch as ttt

    return {"tensortap": tensortap, "ttt": ttt, "torch": torch}


def torch_script() -> dict[str, Any]:
    """What a PyTorch training script has when it reaches the page's lines: a model with ``fc1``."""
    imports = torch_imports()
    torch = imports["torch"]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 8)
            self.fc2 = torch.nn.Linear(8, 3)

        def forward(self, x: Any) -> Any:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(12)]

    def train() -> None:
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

    return imports | {"model": model, "optimizer": optimizer, "loss_fn": loss_fn, "loader": loader, "train": train}


def torch_untrained(tmp: Path) -> dict[str, Any]:
    """The script, before its training (the block runs it)."""
    return torch_script()


def torch_trained(tmp: Path) -> dict[str, Any]:
    """The script above, after a training of 50 steps captured to ``run`` and another to ``run2``."""
    script = torch_script()
    tensortap, ttt = script["tensortap"], script["ttt"]
    for run in ("run", "run2"):
        with ttt.capture(
            script["model"],
            tmp / run,
            optimizer=script["optimizer"],
            loss=script["loss_fn"],
            save_config=tensortap.SaveConfig(save_interval=10),
        ):
            for _ in range(5):
                script["train"]()
    return script | {"trial": tensortap.create_trial(tmp / "run")}


def torch_trial_folder(tmp: Path) -> dict[str, Any]:
    """A training captured to ``trial`` in the working folder, whose first shard the format page opens."""
    script = torch_script()
    with script["ttt"].capture(script["model"], tmp / "trial", optimizer=script["optimizer"]):
        script["train"]()
    return {}


def torch_custom_loop(tmp: Path) -> dict[str, Any]:
    """A loop of micro-batches and a hand-written update, as the ``explicit_steps`` block assumes."""
    script = torch_script()
    torch, loss_fn = script["torch"], script["loss_fn"]

    def compute_loss(model: Any, batch: tuple[Any, Any]) -> Any:
        return loss_fn(model(batch[0]), batch[1])

    def update(model: Any) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None

    def split(batch: tuple[Any, Any]) -> list[tuple[Any, Any]]:
        return list(zip(batch[0].split(4), batch[1].split(4), strict=True))

    return script | {
        "out_dir": str(tmp / "run"),
        "compute_loss": compute_loss,
        "update": update,
        "split": split,
        "lr": 0.1,
    }


def torch_hook_api(tmp: Path) -> dict[str, Any]:
    """The script, and a tensor and an extra loss to save by hand."""
    script = torch_script()
    torch = script["torch"]
    return script | {"t": torch.arange(6.0).reshape(2, 3), "aux_loss": torch.tensor(0.25)}


def torch_gan(tmp: Path) -> dict[str, Any]:
    """Two networks with a ``main`` Sequential and an optimizer each (pytorch/examples dcgan's names)."""
    imports = torch_imports()
    torch = imports["torch"]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = torch.nn.Sequential(torch.nn.Linear(4, 4))

    net_g, net_d = Net(), Net()
    return imports | {
        "out_dir": str(tmp / "run"),
        "netG": net_g,
        "netD": net_d,
        "optimizerG": torch.optim.Adam(net_g.parameters()),
        "optimizerD": torch.optim.Adam(net_d.parameters()),
        "loader": [(torch.randn(2, 4), None)],
    }


def torch_stop_poll(tmp: Path) -> dict[str, Any]:
    """A hook capturing the script's training, whose ``should_stop`` the block polls."""
    script = torch_script()
    return script | {"hook": script["ttt"].capture(script["model"], tmp / "run", optimizer=script["optimizer"])}


def torch_raise_on_stop(tmp: Path) -> dict[str, Any]:
    """The script, with a ``train()`` and a folder for the block's trial."""
    return torch_script() | {"out_dir": str(tmp / "run")}


def torch_folds(tmp: Path) -> dict[str, Any]:
    """Rows to split, a model per fold and a training of a fold, as the KFold block assumes."""
    kfold = pytest.importorskip("sklearn.model_selection").KFold
    script = torch_script()
    torch, net, loss_fn = script["torch"], type(script["model"]), script["loss_fn"]
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))

    def train(model: Any, rows: Any) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in np.array_split(rows, 2):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()

    return script | {"KFold": kfold, "X": x.numpy(), "model_for_fold": lambda k: net(), "train": train}


def torch_trained_rules(tmp: Path) -> dict[str, Any]:
    """The trained script, with the rules the page's blocks take from the one before, and ``opt``."""
    from tensortap.rules import ExplodingTensor, StopTraining, invoke_rule

    script = torch_trained(tmp)
    rule = ExplodingTensor(script["trial"])
    names = {"ExplodingTensor": ExplodingTensor, "StopTraining": StopTraining, "invoke_rule": invoke_rule}
    return script | names | {"rule": rule, "opt": script["optimizer"]}


# ---------------------------------------------------------------- Keras
def keras_script(tmp: Path) -> dict[str, Any]:
    """A Keras model whose first ``Dense`` layer is ``dense``, and arrays to fit it on (4 batches an epoch)."""
    keras = pytest.importorskip("keras")
    import tensortap
    import tensortap.keras as ttk

    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="dense"), keras.layers.Dense(2, name="head")]
    )
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = rng.normal(size=(128, 4)).astype("float32"), rng.integers(0, 2, 128)
    return {"tensortap": tensortap, "ttk": ttk, "model": model, "x": x, "y": y, "xv": x[:32], "yv": y[:32]}


def keras_tape_loop(tmp: Path) -> dict[str, Any]:
    """A GradientTape loop's objects (TensorFlow only: the block uses ``tf.function``)."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        pytest.skip("the block is TensorFlow code")
    tf = pytest.importorskip("tensorflow")
    script = keras_script(tmp)
    keras = pytest.importorskip("keras")
    dataset = tf.data.Dataset.from_tensor_slices((script["x"], script["y"])).batch(32)
    return script | {
        "tf": tf,
        "optimizer": keras.optimizers.SGD(),
        "loss_fn": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "dataset": dataset,
    }


# ---------------------------------------------------------------- XGBoost
def xgboost_script(tmp: Path) -> dict[str, Any]:
    """Binary classification data, as DMatrix and as arrays, and the parameters of ``binary:logistic``."""
    xgb = pytest.importorskip("xgboost")
    import tensortap
    import tensortap.xgboost as ttx

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    (tmp / "tensortap.json").write_text(json.dumps({"out_dir": str(tmp / "from-json")}))
    return {
        "tensortap": tensortap,
        "ttx": ttx,
        "xgb": xgb,
        "XGBClassifier": xgb.XGBClassifier,
        "params": {"objective": "binary:logistic", "max_depth": 2},
        "dtrain": xgb.DMatrix(x[:150], label=y[:150]),
        "dval": xgb.DMatrix(x[150:], label=y[150:]),
        "X": x[:150],
        "y": y[:150],
        "Xv": x[150:],
        "yv": y[150:],
        "out_dir": str(tmp / "run"),
    }


# ---------------------------------------------------------------- Lightning, Transformers (README)
def lightning_imported(tmp: Path) -> dict[str, Any]:
    """``L``, as the README's Lightning line assumes."""
    return {"L": pytest.importorskip("lightning.pytorch")}


def transformers_script(tmp: Path) -> dict[str, Any]:
    """A model, training arguments and a data set, as the README's Trainer line assumes."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    args = transformers.TrainingArguments(str(tmp / "hf"), report_to=[], use_cpu=True)
    train = torch.utils.data.TensorDataset(torch.randn(8, 4))
    return {"Trainer": transformers.Trainer, "model": torch.nn.Linear(4, 1), "args": args, "train": train}


def a_loss(tmp: Path) -> dict[str, Any]:
    """A loss to save, as the README's ``Writer`` block assumes."""
    return {"loss": 0.5}


SKIP_DASK = "dask and S3: tests/capture/test_xgboost.py::test_dask_two_workers_each_write_their_shards"

PAGES: dict[str, list[Setup | str]] = {
    "README.md": [
        torch_untrained,
        keras_script,
        xgboost_script,
        lightning_imported,
        transformers_script,
        a_loss,
        torch_trained,
        torch_trained,
    ],
    "docs/quickstart-pytorch.md": [
        torch_untrained,
        torch_hook_api,
        torch_custom_loop,
        torch_gan,
        torch_stop_poll,
        torch_raise_on_stop,
    ],
    "docs/quickstart-keras.md": [keras_script, keras_tape_loop],
    "docs/trial.md": [torch_trained, torch_folds],
    "docs/format.md": [torch_trial_folder],
    "docs/storage.md": [
        "an S3 server of the reader's (the same calls run against one in tests/backends/test_s3.py)",
        "a sketch of a plugin's class",
    ],
    "docs/rules.md": [
        torch_trained,
        "a signature, not code",
        torch_trained_rules,
        torch_trained_rules,
        torch_trained_rules,
    ],
    "docs/quickstart-xgboost.md": [xgboost_script, xgboost_script, SKIP_DASK, xgboost_script],
}


def test_every_block_of_the_pages_has_a_setup() -> None:
    for page, setups in PAGES.items():
        assert len(python_blocks(ROOT / page)) == len(setups), f"{page}: a block was added or removed"


@pytest.mark.parametrize(
    ("page", "index"), [(page, i) for page, setups in PAGES.items() for i in range(len(setups))], ids=str
)
def test_the_block_runs(page: str, index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    setup = PAGES[page][index]
    if isinstance(setup, str):
        pytest.skip(setup)
    monkeypatch.chdir(tmp_path)
    namespace = setup(tmp_path) | {"__name__": "docs"}
    try:
        run_block(ROOT / page, index, python_blocks(ROOT / page)[index], namespace, tmp_path)
    finally:
        hook = namespace.get("hook")
        if hook is not None:
            hook.close()


def test_the_readme_commands_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's ``tensortap`` lines, on the trials of a real training: each does its work without an error."""
    from tensortap.cli import main

    torch_trained(tmp_path)
    monkeypatch.chdir(tmp_path)
    lines = commands(ROOT / "README.md", "tensortap")
    assert len(lines) >= 10
    for line in lines:
        argv = [word.replace("/tmp", tmp_path.as_posix()) for word in line]  # "/tmp/run", and the folder "/tmp"
        status = main(argv)
        err = capsys.readouterr().err
        assert status in ((0, 1) if argv[0] == "rules" else (0,)), f"tensortap {shlex.join(line)}: exit {status}\n{err}"
        assert "Traceback" not in err
    for written in ("grads.png", "losses.png", "run.parquet", "report.html", "tb"):
        assert (tmp_path / written).exists(), written


# resolves each name given on the command line, in a process of its own (it imports every framework adapter)
_RESOLVE = """
import importlib, sys
for name in sys.argv[1:]:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):  # the longest prefix that is a module, then its attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        break
    for attr in parts[i:]:
        if not hasattr(obj, attr):
            print(name)
            break
        obj = getattr(obj, attr)
"""


def test_every_tensortap_name_the_docs_give_exists() -> None:
    """`tensortap.rules.NAN_ENCODED_REGEX`, `tensortap.keras.Callback`, ...: a name a user copies from a page."""
    pytest.importorskip("torch")
    pytest.importorskip("keras")
    pytest.importorskip("xgboost")
    dotted = re.compile(r"`(tensortap(?:\.[A-Za-z_]\w*)+)")
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    names = sorted({name for page in pages for name in dotted.findall(page.read_text())})
    assert len(names) > 50
    result = subprocess.run([sys.executable, "-c", _RESOLVE, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", f"names in the docs that do not exist: {result.stdout.split()}"
