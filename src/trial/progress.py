"""Progress bars for long offline work: a tqdm bar on a terminal or in a notebook, nothing otherwise."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

T = TypeVar("T")
#: In a notebook a bar shows once the work has taken this long: quick work leaves no empty error output there.
SHOW_AFTER_SECONDS = 0.5


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enable: bool | None = None) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on standard error when it is a terminal, or in a Jupyter notebook
    (a widget where ipywidgets is installed).

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
        or this runs in a Jupyter kernel (and tqdm is installed), and there is
        more than one item.
    """
    count = total if total is not None else len(items) if isinstance(items, Sized) else None
    if enable is False or (enable is None and count is not None and count <= 1):
        yield from items
        return
    notebook = in_notebook()
    if (enable or notebook or sys.stderr.isatty()) and importlib.util.find_spec("tqdm") is not None:
        widget = notebook and importlib.util.find_spec("ipywidgets") is not None
        if widget:
            from tqdm.notebook import tqdm
        else:
            from tqdm import tqdm
        # a text bar in a notebook stays: taken back, it would leave an empty error output under the cell
        leave = notebook and not widget
        delay = SHOW_AFTER_SECONDS if notebook else 0
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=leave, delay=delay)
        return
    yield from items


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (a notebook, JupyterLab, Colab), whose standard error is no terminal."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config
