"""A reload of tensortap's modules while captures are open (a notebook's ``%autoreload 2``, ``importlib.reload``)
forgets no open writer: the exit handler still publishes every step and writes the end markers, and no exit
handler is registered twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tensortap

# Captures a small training into argv[1] (argv[3]: "torch", a PyTorch model trained by hand, or "numpy", the NumPy
# Writer; argv[4]: more arguments of the captures, as JSON), reloads the modules named after argv[6] argv[6] times
# the way argv[5] says ("importlib", or IPython's "autoreload"), captures another into argv[2], prints the weights
# after each step and the number of exit handlers before the reloads and after the second capture started, and
# ends with an uncaught exception, without closing either capture.
RELOAD_THEN_EXIT = """
import atexit, importlib, json, sys
from tensortap import SaveConfig
from tensortap.capture import ShardPolicy, Writer

first, second, framework, options, how, reloads, *modules = sys.argv[1:]
options = json.loads(options)


def policy():  # made anew for each capture, as by a notebook cell: %autoreload moves the objects made before to the
    # classes it makes anew, and tensortap, not reloaded, checks them against the class it imported
    return ShardPolicy(max_seconds=3600, live_seconds=None)  # nothing is published before the exit


def train_torch(out, steps):  # plain SGD by hand: a step is a forward (torch.optim imports torch._dynamo: 10 s)
    import torch
    import tensortap.torch as ttt

    torch.manual_seed(len(out))
    model = torch.nn.Linear(3, 2)
    hook = ttt.capture(model, out, save_config=SaveConfig(save_interval=1), shard_policy=policy(), **options)
    weights = []
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 0.1 * parameter.grad
        weights.append(model.weight.detach().tolist())
    return hook, weights


def train_numpy(out, steps):
    import numpy as np

    writer = Writer(out, shard_policy=policy(), **options)
    weights = []
    for step in range(steps):
        weights.append([[step + 0.5, len(out), -1.0]])
        with writer.stepping():
            writer.save("weight", np.asarray(weights[-1], dtype=np.float32), collections=["weights"])
    return writer, weights


train = train_torch if framework == "torch" else train_numpy
capture1, weights1 = train(first, 3)  # the capture stays open, as in a notebook
handlers = atexit._ncallbacks()
if how == "autoreload":  # what %autoreload 2 runs: it empties the module's namespace, then runs it again
    from IPython.extensions.autoreload import superreload as reload
else:
    reload = importlib.reload
for _ in range(int(reloads)):
    for name in modules:
        reload(importlib.import_module(name))
capture2, weights2 = train(second, 2)  # a capture started after the reload
print(json.dumps({"weights": [weights1, weights2], "handlers": [handlers, atexit._ncallbacks()]}))
raise RuntimeError("the end")  # uncaught: the exit handlers close both captures, whose end markers say why
"""


def _reload_then_exit(
    tmp_path: Path,
    outs: tuple[str, str],
    framework: str,
    how: str,
    modules: list[str],
    options: dict[str, Any],
    reloads: int = 1,
) -> list[Any]:
    """Run :data:`RELOAD_THEN_EXIT` in a child with its own empty ``TMPDIR``; check how it ended and return the
    weights it printed."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    args = [*outs, framework, json.dumps(options), how, str(reloads), *modules]
    done = subprocess.run(
        [sys.executable, "-c", RELOAD_THEN_EXIT, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("RuntimeError: the end") == 1, done.stderr  # sys.excepthook once, no recursion
    assert "Error in sys.excepthook" not in done.stderr and "tensortap" not in done.stderr, done.stderr
    assert [p.name for p in tmp.iterdir() if p.name.startswith("tensortap")] == []  # temporary folders removed
    printed = json.loads(done.stdout)
    handlers_before, handlers_after = printed["handlers"]
    assert handlers_after == handlers_before  # the reload and the capture after it registered no exit handler
    weights: list[Any] = printed["weights"]
    return weights


def _check(trial: tensortap.Trial, weights: list[Any]) -> None:
    """Every step is there with the weights the child trained, and the end marker says the program raised."""
    assert trial.steps() == list(range(len(weights)))
    for step, value in enumerate(weights):
        np.testing.assert_array_equal(trial.tensor("weight").value(step), np.asarray(value, dtype=np.float32))
    assert trial.end_reasons() == {"worker_0": "exception"}


@pytest.mark.torch
@pytest.mark.slow  # the child imports torch
@pytest.mark.parametrize("how", ["importlib", "autoreload"])
def test_a_reload_of_the_writer_module_before_exit_loses_no_step(tmp_path: Path, how: str) -> None:
    """Reloaded, the module made a new, empty set of open writers (and of hooks to close at exit): the exit
    handler closed none of those opened before, whose steps were lost, and a capture started after the reload
    registered the exit handlers again; ``sys.excepthook`` then called itself (RecursionError)."""
    pytest.importorskip("torch")
    if how == "autoreload":
        pytest.importorskip("IPython.extensions.autoreload")
    outs = (str(tmp_path / "first"), str(tmp_path / "second"))
    weights = _reload_then_exit(tmp_path, outs, "torch", how, ["tensortap.capture.writer"], {})
    for out, trained in zip(outs, weights, strict=True):
        _check(tensortap.create_trial(out), trained)


@pytest.mark.s3
def test_a_reload_of_the_storage_module_before_exit_loses_no_step_and_leaves_no_files(
    tmp_path: Path, s3_url: str, s3_options: dict[str, Any]
) -> None:
    """Reloaded, ``tensortap.backends.storage`` forgot its object-store trials, whose temporary folders were
    then left behind at exit, and registered its exit handler again, to run before the writers close."""
    outs = (f"{s3_url}/first", f"{s3_url}/second")
    modules = ["tensortap.backends.storage", "tensortap.capture.writer"]
    weights = _reload_then_exit(tmp_path, outs, "numpy", "importlib", modules, {"storage_options": s3_options})
    for url, trained in zip(outs, weights, strict=True):
        _check(tensortap.create_trial(url, **s3_options), trained)


@pytest.mark.parametrize("how", ["importlib", "autoreload"])
def test_the_writer_thread_goes_on_while_the_module_is_reloaded_again_and_again(tmp_path: Path, how: str) -> None:
    """IPython's ``%autoreload`` empties the module's namespace, then runs it again, while the writer thread polls
    the open captures (each poll looks at the buffered steps): a poll in between met a NameError, which ended the
    thread, and every publish after it (at exit: the last shard and the end marker) waited for it in vain. The
    thread lets such an error go and publishes at the next poll."""
    if how == "autoreload":
        pytest.importorskip("IPython.extensions.autoreload")
    outs = (str(tmp_path / "first"), str(tmp_path / "second"))
    weights = _reload_then_exit(tmp_path, outs, "numpy", how, ["tensortap.capture.writer"], {}, reloads=30)
    for out, trained in zip(outs, weights, strict=True):
        _check(tensortap.create_trial(out), trained)
