"""Plots of tensors across steps and of their distributions (matplotlib, from the ``notebook`` extra).

Every function returns the matplotlib Axes it drew on, so it can be changed
further. The methods :meth:`Trial.plot <tensortap.Trial.plot>`,
:meth:`Tensor.plot <tensortap.Tensor.plot>`, :meth:`Tensor.histogram
<tensortap.Tensor.histogram>`, :meth:`Tensor.plot_histograms
<tensortap.Tensor.plot_histograms>` and :func:`tensortap.compare` call these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..modes import Mode, step_label, step_word
from ..reductions import split_key
from .export import check_output, written_whole
from .progress import progress
from .views import printable, shortened, tensor_workers, waiting_note

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .trial import Tensor, Trial

XAxis = Literal["step", "global_step", "time"]
"""The x axis of a plot over steps: the mode step, the global step, or seconds since the trial's first saved step."""

X_LABELS: Mapping[str, str] = {"step": "step", "global_step": "global step", "time": "time since start (s)"}


def check_x(x: str) -> None:
    """A ValueError naming the valid axes unless ``x`` is one of :data:`X_LABELS` (before anything is drawn)."""
    if x not in X_LABELS:
        raise ValueError(f"x: {x!r} is not valid; valid: {', '.join(X_LABELS)}")


def _text(name: str) -> str:
    """A string from a trial as matplotlib text: control characters and lone surrogates escaped
    (:func:`printable`: a trial's path that is not UTF-8 failed to draw), shortened (:func:`shortened`), and
    ``$`` literal, so that a stranger's name neither starts mathtext (which refuses ``$\\frac{$`` when drawn)
    nor asks the font for glyphs of control characters."""
    return shortened(printable(name, unicode=True)).replace("$", r"\$")


def _line_label(label: str) -> str:
    """``label`` as a line's label: matplotlib leaves one starting with ``_`` out of the legend (its name for
    a line without a label), and a tensor ``_head.weight`` (PyTorch's ``self._head``) was drawn unnamed; a
    leading space keeps it."""
    return f" {label}" if label.startswith("_") else label


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('plots need matplotlib: pip install "tensortap[notebook]"') from exc
    return plt


def _axes(ax: Axes | None, figsize: tuple[float, float] = (8, 4.5)) -> Axes:
    if ax is not None:
        return ax
    _, new = _pyplot().subplots(figsize=figsize)
    return new


def series(
    trial: Trial, name: str, reduction: str | None = None, mode: Mode | str | None = None, worker: str | None = None
) -> dict[int, float]:
    """One number per saved step (mode step if ``mode``): the value of a scalar tensor, else ``reduction``.

    ``reduction`` is a reduction key such as ``"mean"`` (the default for
    non-scalar tensors), ``"abs_max"`` or ``"l2"``. ``worker``: that worker's
    values only (default: each step's first worker, as :meth:`Tensor.to_series`).
    """
    tensor = trial.tensor(name)
    shape = tensor.summary()["shape"]
    if reduction is None and shape is not None and int(np.prod(shape)) == 1:
        return dict(tensor.to_series(None, mode=mode, worker=worker).items())
    key, absolute = split_key(reduction or "mean")
    return tensor.reduction_values(key, absolute, mode, worker)


def _why_no_line(tensor: Tensor, reduction: str | None, mode: Mode | str | None) -> str:
    """``"; 'g' has no 'mean' ..."``: why :func:`series` of ``tensor`` is empty, where it can tell."""
    steps = tensor.steps(mode)
    if not steps:
        return f"; {waiting_note(tensor, mode) or f'{tensor.name!r} has no {step_word(mode)}'}"
    key = reduction or "mean"
    saved = tensor.available_reductions(steps[-1], mode)
    if tensor.has_raw(steps[-1], mode) or key in saved:
        return ""  # its values could not be read: the reader warned, naming the shards
    return f"; {tensor.name!r} has no {key!r} and no raw tensor to compute it from (saved: {', '.join(saved)})"


def mode_lines(
    tensor: Tensor, reduction: str | None, mode: Mode | str | None, x: XAxis = "step", worker: str | None = None
) -> dict[Mode, tuple[list[float], list[float]]]:
    """``{mode: (xs, ys)}``: :func:`series` (of ``worker``) split by mode, on the x axis ``x``.

    Raises
    ------
    ValueError
        ``x="time"`` on a trial written before wall times were recorded, or an unknown ``x`` (:func:`check_x`).
    """
    check_x(x)
    trial = tensor.trial
    data = series(trial, tensor.name, reduction, worker=worker)  # by global step
    steps = trial._index.steps
    times = trial.wall_times() if x == "time" else {}
    if x == "time" and not times:
        raise ValueError(f"{trial.path} has no wall times (written before format 1.1): use x='step'")
    start = min(times.values()) if times else 0.0
    wanted = None if mode is None else Mode.parse(mode)
    out: dict[Mode, tuple[list[float], list[float]]] = {}
    for gstep, value in sorted(data.items()):
        m, mstep = steps.get(gstep, (Mode.GLOBAL, gstep))
        if wanted is not None and m is not wanted:
            continue
        if x == "time":
            if gstep not in times:
                continue
            where: float = times[gstep] - start
        else:
            where = mstep if x == "step" else gstep
        xs, ys = out.setdefault(m, ([], []))
        xs.append(where)
        ys.append(value)
    return dict(sorted(out.items()))


def curves_axis(runs: Sequence[Trial], names: Sequence[str], mode: Mode | str | None = None) -> XAxis:
    """The x axis for curves of ``names`` of ``runs`` a person looks at: the global step where the curves
    hold several modes (a validation loss then sits where it was computed in the training, not at its own
    mode step on the axis of the training's), else the mode step."""
    if mode is not None:
        return "step"
    modes = {m for r in runs for n in names if n in r._index.tensors for m in Mode if r.tensor(n).steps(m)}
    return "global_step" if len(modes) > 1 else "step"


def plot_tensors(
    trials: Trial | Sequence[Trial],
    names: Sequence[str],
    reduction: str | None = None,
    mode: Mode | str | None = None,
    ax: Axes | None = None,
    logy: bool = False,
    x: XAxis | None = None,
    labels: Sequence[str] | None = None,
) -> Axes:
    """Plot each tensor of each trial across steps, one line per mode (and per worker, where several
    saved it: ``name [worker_1]``; a line never joins two workers' values); return the matplotlib Axes.

    Parameters
    ----------
    trials
        One trial, or several (runs side by side: lines are labelled with ``labels``).
    names
        Tensor names; a trial that lacks one is skipped for it (it must exist in at least one:
        else :class:`~tensortap.TensorUnavailable`, with the closest names).
    reduction
        Reduction key; default: the value of scalar tensors, the mean of others.
    mode
        Only this mode (default: each mode as its own line).
    ax, logy
        Axes to draw into (default: a new figure); logarithmic y axis.
    x
        ``"step"`` (mode step), ``"global_step"`` or ``"time"``; default :func:`curves_axis`: the
        global step where the lines hold several modes, else the mode step.
    labels
        One label per trial (default: their paths, when there are several); drawn as text, like
        tensor names (control characters escaped, ``$`` as itself: no mathtext).

    Raises
    ------
    ImportError
        If matplotlib is missing (``pip install "tensortap[notebook]"``).
    TensorUnavailable
        A name that none of the trials saved, or no line to draw.
    """
    from ..exceptions import TensorUnavailable
    from .compare import check_names

    runs = [trials] if not isinstance(trials, Sequence) else list(trials)
    check_names(runs, names)
    x = curves_axis(runs, names, mode) if x is None else x
    check_x(x)
    run_labels = [_text(label) for label in (labels if labels is not None else [t.path for t in runs])]
    ax = _axes(ax)
    drawn = 0
    work = [(r, label, n) for r, label in zip(runs, run_labels, strict=True) for n in names]
    for run, run_label, name in progress(work, desc="plotting"):
        try:
            tensor = run.tensor(name)
        except TensorUnavailable:
            continue
        workers = tensor_workers(tensor)
        for worker in workers if len(workers) > 1 else [None]:  # several: a line each, never joined
            lines = mode_lines(tensor, reduction, mode, x, worker)
            for m, (xs, ys) in lines.items():
                label = _text(name) if len(runs) == 1 else f"{run_label}: {_text(name)}"
                if len(lines) > 1 or m not in (Mode.TRAIN, Mode.GLOBAL):
                    label += f" ({m.name.lower()})"
                if worker is not None:
                    label += f" [{_text(worker)}]"
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=_line_label(label))
                drawn += 1
    if not drawn:
        first = next((r.tensor(n) for r in runs for n in names if n in r._index.tensors), None)
        why = _why_no_line(first, reduction, mode) if first is not None else ""
        raise TensorUnavailable(f"nothing to plot: none of {', '.join(map(repr, names))} has values{why}")
    scalar_only = reduction is None and all(_is_scalar(r, n) for r in runs for n in names if n in r._index.tensors)
    what = "value" if scalar_only else reduction or "value (scalars) / mean"
    one = _text(names[0])
    ylabel = f"{one} ({what})" if len(names) == 1 and not scalar_only else one if len(names) == 1 else what
    xlabel = X_LABELS[x] if x != "step" or mode is None else step_word(mode)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _whole_steps(ax, x)
    if logy:
        ax.set_yscale("log")
    if len(runs) == 1:
        ax.set_title(_text(runs[0].path), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def _is_scalar(trial: Trial, name: str) -> bool:
    shape = trial.tensor(name).summary()["shape"]
    return shape is not None and int(np.prod(shape)) == 1


def plot_histogram(
    tensor: Tensor,
    step: int,
    mode: Mode | str | None = None,
    bins: int | Sequence[float] = 64,
    ax: Axes | None = None,
) -> Axes:
    """Draw the histogram of ``tensor`` at ``step`` as steps (``ax.stairs``); return the Axes."""
    edges, counts = tensor.histogram_value(step, mode, bins=bins)
    ax = _axes(ax)
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    name = _text(tensor.name)
    ax.set(xlabel=f"{name} (value)", ylabel="count", title=f"{name} at {step_label(step, mode)}")
    ax.grid(alpha=0.3)
    return ax


def _cell_edges(xs: np.ndarray) -> np.ndarray:
    """Cell boundaries around sorted centres ``xs`` (half-way between neighbours)."""
    if len(xs) == 1:
        return np.array([xs[0] - 0.5, xs[0] + 0.5])
    mid = (xs[1:] + xs[:-1]) / 2
    return np.concatenate([[xs[0] - (mid[0] - xs[0])], mid, [xs[-1] + (xs[-1] - mid[-1])]])


def plot_histograms(
    tensor: Tensor,
    mode: Mode | str | None = None,
    bins: int | Sequence[float] = 64,
    x: XAxis = "step",
    ax: Axes | None = None,
    log: bool = True,
    worker: str | None = None,
) -> Axes:
    """Heat map of the distribution over steps: one column per step, one row per bin, colour = count.

    Steps whose bins differ (a histogram captured by another run of the hook)
    are drawn as separate meshes. Returns the Axes; ``ax.collections`` holds
    the meshes (``QuadMesh.get_array()`` is ``counts`` with one row per bin).
    ``log``: counts coloured on a logarithmic scale from 1 (the colour map's lowest colour;
    empty bins white), so that a tail of a few values shows beside a peak of thousands;
    False: a linear scale from 0.
    ``worker``: that worker's values; default: where several workers saved the tensor, the first one's
    (a heat map never joins two workers' values), named in the title (``name: distribution over steps
    [worker_0]``).
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    check_x(x)
    trial = tensor.trial
    saved = tensor._info.locations
    modes = [m for m in Mode if saved.any_in(trial._index.steps_of_mode(m)[0])]
    if mode is None and modes:
        mode = Mode.TRAIN if Mode.TRAIN in modes else modes[0]
    workers = tensor_workers(tensor)
    worker = workers[0] if worker is None and len(workers) > 1 else worker
    hists = tensor.histogram_values(mode, worker, bins=bins)  # by mode step
    if not hists:
        waiting = None if worker is not None else waiting_note(tensor, mode)  # a worker's steps need no other
        raise ValueError(waiting or f"{tensor.name!r}: no histogram and no raw tensor was saved at any step")
    m = Mode.parse(mode) if mode is not None else Mode.GLOBAL
    if x == "step":
        positions = {s: float(s) for s in hists}
    else:
        gsteps = {s: trial.global_step(s, m) for s in hists}
        times = trial.wall_times()
        if x == "time" and not times:
            raise ValueError(f"{trial.path} has no wall times (written before format 1.1): use x='step'")
        start = min(times.values()) if times else 0.0
        positions = {
            s: float(g) if x == "global_step" else times[g] - start
            for s, g in gsteps.items()
            if g is not None and (x == "global_step" or g in times)
        }
    steps = sorted(positions)
    ax = _axes(ax)
    xs = np.array([positions[s] for s in steps])
    cells = _cell_edges(xs)
    vmax = max(float(hists[s].counts.max()) for s in steps) or 1.0
    norm = LogNorm(vmin=1, vmax=max(vmax, 2.0)) if log else Normalize(vmin=0, vmax=vmax)  # 1: the lowest colour
    cmap = colormaps["viridis"].with_extremes(bad="white")  # empty bins, masked on the log scale
    start_i = 0
    mesh = None
    for i in range(1, len(steps) + 1):  # runs of consecutive steps with the same edges
        if i < len(steps) and np.array_equal(hists[steps[i]].edges, hists[steps[start_i]].edges):
            continue
        run = steps[start_i:i]
        counts = np.stack([hists[s].counts for s in run]).T  # [bins, steps]
        shown = np.ma.masked_equal(counts, 0) if log else counts
        mesh = ax.pcolormesh(cells[start_i : i + 1], hists[run[0]].edges, shown, norm=norm, cmap=cmap)
        start_i = i
    if mesh is not None:
        ax.figure.colorbar(mesh, ax=ax, label="count (log scale)" if log else "count")
    xlabel = X_LABELS[x] if x != "step" else f"{m.name.lower()} step" if m is not Mode.GLOBAL else "step"
    name = _text(tensor.name)
    title = f"{name}: distribution over steps" + (f" [{_text(worker)}]" if worker is not None else "")
    ax.set(xlabel=xlabel, ylabel=f"{name} (value)", title=title)
    _whole_steps(ax, x)
    return ax


def _whole_steps(ax: Axes, x: str) -> None:
    """Ticks at whole steps only, where ``x`` is a step (a run of 3 steps had ticks at 0.25, 0.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    if x != "time":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


def save_plot(ax: Any, path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write the figure of ``ax`` to ``path`` (PNG, SVG or PDF by suffix: :data:`IMAGE_SUFFIXES`), whole or not
    at all (:func:`written_whole`; ``storage_options`` for a URL)."""
    suffix = check_output(path, IMAGE_SUFFIXES, storage_options=storage_options).suffix
    fig = ax.get_figure()
    fig.tight_layout()
    with written_whole(path, storage_options) as file:  # a file object: the format is said
        fig.savefig(file, dpi=120, format=suffix[1:])
