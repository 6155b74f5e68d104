"""Runs side by side: ``tensortap.compare([trial_a, trial_b]).plot("losses/")``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..exceptions import TensorUnavailable, suggest
from ..modes import Mode
from .trial import Trial, create_trial, resolve_names

if TYPE_CHECKING:
    import pandas
    from matplotlib.axes import Axes

    from .plot import XAxis


def _labels(trials: Sequence[Trial]) -> list[str]:
    """Each trial's last path component, or its whole path where those collide."""
    short = [t.path.rstrip("/").rsplit("/", 1)[-1] or t.path for t in trials]
    return short if len(set(short)) == len(short) else [t.path for t in trials]


def _paths(trials: Sequence[Trial]) -> str:
    """How errors name ``trials``: their paths as given (``runs2/known``, as ``show`` names a trial), not
    the plot's labels (``known``)."""
    return ", ".join(trial.path for trial in trials)


def check_names(trials: Sequence[Trial], names: Sequence[str]) -> None:
    """Check that each of ``names`` is saved in one of ``trials`` at least.

    Raises
    ------
    TensorUnavailable
        One of ``names`` is saved in none of them (the message names the trials' paths, and
        suggests the closest names).
    """
    known = {n for trial in trials for n in trial.tensor_names()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TensorUnavailable(f"no tensor named {unknown[0]!r} in {_paths(trials)}{suggest(unknown[0], known)}")


class Comparison:
    """Several trials, queried and plotted together.

    Parameters
    ----------
    trials
        Trials, or paths/URLs to open.
    labels
        One label per trial (default: the last component of each path).
    """

    def __init__(self, trials: Sequence[Trial | str | os.PathLike[str]], labels: Sequence[str] | None = None) -> None:
        if not trials:
            raise ValueError("trials: expected at least one trial")
        self.trials = [t if isinstance(t, Trial) else create_trial(t) for t in trials]
        self.labels = list(labels) if labels is not None else _labels(self.trials)
        if len(self.labels) != len(self.trials):
            raise ValueError(f"labels: expected {len(self.trials)} labels, got {len(self.labels)}")

    def __repr__(self) -> str:
        return f"<Comparison of {len(self.trials)} trials: {', '.join(self.labels)}>"

    def tensor_names(self, regex: str | Sequence[str] | None = None) -> list[str]:
        """Names saved in any of the trials (matching ``regex``), sorted."""
        return sorted({n for t in self.trials for n in t.tensor_names(regex=regex)})

    def _resolve(self, names_or_regex: str | Sequence[str]) -> list[str]:
        return resolve_names(names_or_regex, self.tensor_names(), self.tensor_names, _paths(self.trials))

    def plot(
        self,
        names_or_regex: str | Sequence[str],
        reduction: str | None = None,
        mode: Mode | str | None = None,
        x: XAxis | None = None,
        ax: Axes | None = None,
        logy: bool = False,
    ) -> Axes:
        """One line per trial, tensor and mode (labelled ``<run>: <tensor>``); see :meth:`Trial.plot`."""
        from .plot import plot_tensors

        names = self._resolve(names_or_regex)
        return plot_tensors(self.trials, names, reduction, mode, ax=ax, logy=logy, x=x, labels=self.labels)

    def to_pandas(
        self, names: str | Sequence[str] | None = None, reductions: Sequence[str] | None = None
    ) -> pandas.DataFrame:
        """:meth:`Trial.to_pandas` of every trial, with a first column ``run`` (the label).

        ``names``: as in :meth:`plot` (a name or a regular expression, or a list of names);
        :class:`TensorUnavailable` for a name that none of the trials saved.
        """
        import pandas as pd

        selected = None if names is None else self._resolve(names)
        if selected is not None:
            check_names(self.trials, selected)
        frames = []
        for label, trial in zip(self.labels, self.trials, strict=True):
            wanted = None if selected is None else [n for n in selected if n in trial.tensor_names()]
            df = trial.to_pandas(wanted, reductions=reductions)
            df.insert(0, "run", label)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)


def compare(trials: Sequence[Trial | str | os.PathLike[str]], labels: Sequence[str] | None = None) -> Comparison:
    """Put trials side by side: ``compare([a, b]).plot("losses/loss")``."""
    return Comparison(trials, labels)
