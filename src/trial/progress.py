"""Progress bars for long offline work: a tqdm bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enable: bool | None = None) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on standard error when it is a terminal.

    Parameters
    ----------
    items
        What to iterate.
    total
        Number of items, when ``len(items)`` does not tell.
    desc
        Label of the bar.
    enable
        Force the bar on or off; default: only when standard error is a terminal
        (and tqdm is installed).
    """
    if enable is None:
        enable = sys.stderr.isatty()
    if enable:
        try:
            from tqdm import tqdm
        except ImportError:
            enable = False
        else:
            yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)
            return
    yield from items
