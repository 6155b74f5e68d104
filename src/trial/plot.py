"""Plots of tensors across steps (matplotlib, from the ``notebook`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import TensorUnavailableForStep
from ..modes import Mode
from ..reductions import split_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .trial import Trial


def series(trial: Trial, name: str, reduction: str | None = None, mode: Mode | str | None = None) -> dict[int, float]:
    """One number per saved step: the value of a scalar tensor, else ``reduction`` (default ``"mean"``).

    ``reduction`` is a reduction key such as ``"mean"``, ``"abs_max"`` or ``"l2"``.
    """
    tensor = trial.tensor(name)
    out: dict[int, float] = {}
    for step in tensor.steps(mode):
        try:
            if reduction is None and tensor.has_raw(step, mode):
                value = tensor.value(step, mode)
                if value.size == 1:
                    out[step] = float(value.reshape(()))
                    continue
            key, absolute = split_key(reduction or "mean")
            out[step] = tensor.reduction_value(step, key, abs=absolute, mode=mode)
        except TensorUnavailableForStep:
            continue
    return out


def plot_tensors(
    trial: Trial,
    names: Sequence[str],
    reduction: str | None = None,
    mode: Mode | str | None = None,
    ax: Axes | None = None,
    logy: bool = False,
) -> Axes:
    """Plot each tensor's :func:`series` against the step; return the matplotlib Axes.

    Raises
    ------
    ImportError
        If matplotlib is missing (``pip install "tensortap[notebook]"``).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('plots need matplotlib: pip install "tensortap[notebook]"') from exc
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        data = series(trial, name, reduction, mode)
        ax.plot(list(data), list(data.values()), marker="." if len(data) < 50 else None, label=name)
    what = reduction or "value (scalars) / mean"
    ax.set(xlabel=f"{Mode.parse(mode).name.lower()} step" if mode else "step", ylabel=what)
    if logy:
        ax.set_yscale("log")
    ax.set_title(trial.path, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def save_plot(ax: Any, path: str) -> None:
    """Write the figure of ``ax`` to ``path`` (PNG, SVG or PDF by suffix)."""
    fig = ax.get_figure()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
