"""In-process helpers to write small trials with the NumPy :class:`~tensortap.capture.Writer`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tensortap.capture import Writer


def default_value(name: str, step: int) -> np.ndarray:
    """A small float32 tensor that differs per name and step."""
    return np.arange(3, dtype=np.float32) * (step + 1) + len(name)


def run_steps(
    w: Writer,
    n: int,
    names: Sequence[str] = ("a",),
    mode: str | None = None,
    value: Callable[[str, int], Any] = default_value,
    collections: Sequence[str] = ("custom",),
) -> None:
    """Run ``n`` steps of ``w`` in ``mode``, offering every name at every step."""
    for _ in range(n):
        with w.stepping(mode=mode):
            for name in names:
                w.save(name, value(name, w.step), collections)


def write_trial(out_dir: Path | str, n: int, names: Sequence[str] = ("a",), **kwargs: Any) -> None:
    """Write a closed trial of ``n`` steps with a fresh Writer built from ``kwargs``."""
    with Writer(out_dir, **kwargs) as w:
        run_steps(w, n, names)


@contextlib.contextmanager
def logged_warnings() -> Iterator[list[str]]:
    """The messages the ``tensortap`` logger warns (or worse) with inside the block, in order."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("tensortap")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def torch_train_and_eval(out: Path, x: Any, y: Any, epochs: int = 2, lr: float = 0.01, **hook_kw: Any) -> Any:
    """A PyTorch ``Linear`` regression captured every step into ``out``: each epoch two TRAIN steps on ``x, y``,
    then one EVAL step (no backward: no gradient saved); returns the closed hook."""
    import torch

    import tensortap.torch as ttt
    from tensortap import SaveConfig

    model = torch.nn.Linear(x.shape[1], 1)
    opt, loss_fn = torch.optim.SGD(model.parameters(), lr=lr), torch.nn.MSELoss()
    hook = ttt.capture(model, out, optimizer=opt, loss=loss_fn, save_config=SaveConfig(save_interval=1), **hook_kw)
    for _ in range(epochs):
        model.train()
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            loss_fn(model(x), y)
    hook.close()
    return hook
