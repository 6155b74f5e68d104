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
