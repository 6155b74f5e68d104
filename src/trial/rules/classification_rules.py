"""Rules on labels and predictions: class imbalance, confusion."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .base import Requirement, Rule, check_bool, check_number
from .reading import Selection, judged_workers, raw_at


def as_classes(values: np.ndarray, argmax: bool) -> np.ndarray:
    """Class numbers: ``argmax`` over the last axis if asked (or for 2-d scores), else rounded values."""
    v = np.asarray(values)
    if v.ndim >= 2 and (argmax or v.shape[-1] > 1):
        return np.argmax(v, axis=-1).reshape(-1)
    return np.rint(v.astype(np.float64)).astype(np.int64).reshape(-1)


def _named(name: str | None, collection: str) -> Selection:
    """The tensor called ``name``, else the tensors of ``collection``."""
    return Selection((collection,), None, ()) if name is None else Selection(None, f"^{re.escape(name)}$", ())


class _LabelsPredictions(Rule):
    """Reads a labels tensor and a predictions tensor saved at the same step.

    On a trial of several workers, each rank saved the labels of its own share
    of the samples: the rules pool those of every worker that saved them at the
    step (:meth:`read`, :meth:`pooled`, :func:`predicted`).
    """

    def __init__(self, base_trial: Any, labels: Selection, predictions: Selection) -> None:
        super().__init__(base_trial)
        self.labels, self.predictions = labels, predictions
        self.no_classes: str | None = None  # a labels tensor that held values that are not whole numbers

    def required_captures(self) -> list[Requirement]:
        return [*self.labels.requirements(raw=True), *self.predictions.requirements(raw=True)]

    def read(self, step: int, selection: Selection, need: bool) -> tuple[str, dict[str | None, np.ndarray]] | None:
        """The first tensor of ``selection`` saved at ``step`` and its raw value from each worker that saved it
        (:func:`~tensortap.trial.rules.reading.judged_workers`), by worker; None when one lacks it."""
        names = selection.names(self.base_trial, step)
        if not names:
            if need and not selection.names(self.base_trial):
                req = (selection.requirements(raw=True) or [Requirement("labels", (), True)])[0]
                self.need(step, req, f"no tensor of {selection.describe()} in the trial")
            return None
        req = (selection.requirements(raw=True) or [Requirement("custom", (), True)])[0]
        values = {}
        for worker in judged_workers(self.base_trial, names[0], step):
            value = raw_at(self, self.base_trial, names[0], step, req, worker)
            if value is None:
                return None
            values[worker] = value
        return names[0], values

    def pooled(
        self, name: str, labels: dict[str | None, np.ndarray], argmax: bool
    ) -> dict[str | None, np.ndarray] | None:
        """The class numbers of labels tensor ``name`` (:meth:`classes`) by worker; None when they are no classes."""
        classes = {}
        for worker, value in labels.items():
            c = self.classes(name, value, argmax)
            if c is None:
                return None
            classes[worker] = c
        return classes

    def paired(
        self,
        step: int,
        labels: tuple[str, dict[str | None, np.ndarray]],
        predictions: tuple[str, dict[str | None, np.ndarray]],
        argmax: bool,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The class numbers of the labels (``labels``: the tensor's name and its classes by worker, from
        :meth:`pooled`) and of the predictions (as :func:`as_classes`; ``predictions``: as :meth:`read` gives
        them) of the workers that saved as many of both at ``step``, pooled in worker order.

        The workers left out (those that saved one of the two, or not as many of each) are recorded with
        :meth:`Rule.need`, which does not let the step count as judged where no worker is left (None).
        """
        p = {w: as_classes(v, argmax) for w, v in predictions[1].items()}
        both = [w for w, c in labels[1].items() if w in p and p[w].size == c.size]
        left = [w for w in dict.fromkeys([*labels[1], *p]) if w not in both]
        if left:
            on = "" if None in left else f" on {', '.join(str(w) for w in left)}"
            req = (self.predictions.requirements(raw=True) or [Requirement("predictions", (), True)])[0]
            detail = f"{labels[0]!r} and {predictions[0]!r} of as many samples{on}"
            self.need(step, req, detail, partial=bool(both))
        if not both:
            return None
        return np.concatenate([labels[1][w] for w in both]), np.concatenate([p[w] for w in both])

    def classes(self, name: str, labels: np.ndarray, argmax: bool) -> np.ndarray | None:
        """The class numbers of labels tensor ``name`` (as :func:`as_classes`).

        None when they are values that are not whole numbers (a regression's
        targets), which have no classes: :meth:`not_judged` then says so.
        """
        v = np.asarray(labels)
        if not (v.ndim >= 2 and (argmax or v.shape[-1] > 1)) and not np.all(np.mod(v, 1) == 0):
            self.no_classes = name
            return None
        return as_classes(v, argmax)

    def not_judged(self) -> str | None:
        """Class labels, while a labels tensor held values that are not whole numbers."""
        if self.no_classes is None:
            return None
        return (
            f"labels that are classes: {self.no_classes} holds values that are not whole numbers (a regression's "
            "targets?); give class numbers, or one-hot or score rows with argmax"
        )


class ClassImbalance(_LabelsPredictions):
    """Fires when the classes of the labels are too imbalanced, or a class is mostly mispredicted.

    Formula: the labels saved at every step so far are accumulated (class =
    argmax over the last axis with ``argmax=True`` or for 2-d scores, else the
    rounded value); ``n_c`` counts class ``c``. Once ``sum(n_c) >= samples``
    (until then it judges nothing, and a run that ends with fewer labels lacks
    inputs, :meth:`~tensortap.rules.Rule.not_judged`: not a pass):

    - fires when ``max(n_c) / min(n_c) > threshold_imbalance`` (over the classes seen);
    - else, with predictions saved at the same steps (same length), ``m_c`` =
      fraction of the samples of class ``c`` predicted as another class; fires
      when ``m_c > threshold_misprediction`` for a class, saying
      ``labels, predictions: class 1: 100% (250 of 250) of its samples
      mispredicted > threshold_misprediction 0.7``.

    Labels that are not whole numbers (one value a sample) are no classes (a
    regression's targets): the rule then lacks inputs and says so.

    Needs: collections ``labels`` and ``predictions`` as raw tensors.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    threshold_imbalance
        Largest tolerated ratio of the largest to the smallest class. Default ``10``.
    threshold_misprediction
        Largest tolerated misprediction fraction of a class. Default ``0.7``.
    samples
        Labels to accumulate before judging. Default 500.
    argmax
        Take the argmax over the last axis of labels and predictions. Default False.
    labels_regex
        Regex of the labels tensor, besides collection ``labels``. Default ``".*labels"``.
    predictions_regex
        Regex of the predictions tensor, besides collection ``predictions``. Default ``".*predictions"``.
    """

    state_attrs = ("counts", "wrong", "predicted", "no_classes")

    def __init__(
        self,
        base_trial: Any = None,
        threshold_imbalance: float = 10.0,
        threshold_misprediction: float = 0.7,
        samples: int = 500,
        argmax: bool = False,
        labels_regex: str = ".*labels",
        predictions_regex: str = ".*predictions",
    ) -> None:
        super().__init__(
            base_trial, Selection(("labels",), labels_regex, ()), Selection(("predictions",), predictions_regex, ())
        )
        self.threshold_imbalance = check_number("threshold_imbalance", threshold_imbalance, 1)
        self.threshold_misprediction = check_number("threshold_misprediction", threshold_misprediction, 0, 1)
        self.samples = check_number("samples", samples, 1, integer=True)
        self.argmax = check_bool("argmax", argmax)
        self.counts: dict[str, int] = {}
        self.wrong: dict[str, int] = {}
        self.predicted: dict[str, int] = {}

    def not_judged(self) -> str | None:
        """``samples`` labels while fewer were read (none read: the missing labels are reported instead)."""
        total = sum(self.counts.values())
        if self.no_classes is not None or not total or total >= self.samples:
            return super().not_judged()
        return (
            f"{self.samples} labels to judge (parameter samples): only {total} were saved; "
            "lower samples, or save labels more often"
        )

    def invoke_at_step(self, step: int) -> bool:
        found = self.read(step, self.labels, need=True)
        if found is None:
            return False
        lname, classes = found[0], self.pooled(found[0], found[1], self.argmax)
        if classes is None:
            return False
        labels = np.concatenate(list(classes.values()))
        for c, n in zip(*np.unique(labels, return_counts=True), strict=True):
            self.counts[str(c)] = self.counts.get(str(c), 0) + int(n)
        preds = self.read(step, self.predictions, need=False)
        tensors = [lname]
        pairs = None if preds is None else self.paired(step, (lname, classes), preds, self.argmax)
        if preds is not None and pairs is not None:
            tensors.append(preds[0])
            y, p = pairs
            for c in np.unique(y):
                mask = y == c
                self.predicted[str(c)] = self.predicted.get(str(c), 0) + int(mask.sum())
                self.wrong[str(c)] = self.wrong.get(str(c), 0) + int((p[mask] != c).sum())
        total = sum(self.counts.values())
        if total < self.samples:
            return False
        big, small = max(self.counts, key=self.counts.__getitem__), min(self.counts, key=self.counts.__getitem__)
        ratio = self.counts[big] / self.counts[small]
        if ratio > self.threshold_imbalance:
            return self.fire(
                step,
                f"{lname}: class {big} has {self.counts[big]} samples, class {small} "
                f"{self.counts[small]}: ratio {ratio:.3g} > threshold_imbalance "
                f"{self.threshold_imbalance:g} (over {total} labels) at step {step}",
                tensors,
            )
        for c, n in self.predicted.items():
            frac = self.wrong[c] / n
            if frac > self.threshold_misprediction:
                return self.fire(
                    step,
                    f"{', '.join(tensors)}: class {c}: {100 * frac:.3g}% ({self.wrong[c]} of {n}) of its samples "
                    f"mispredicted > threshold_misprediction {self.threshold_misprediction:g} at step {step}",
                    tensors,
                )
        return False


class Confusion(_LabelsPredictions):
    """Fires when the confusion matrix of a step's labels and predictions is poor.

    Formula: at each step with both tensors (classes as in :class:`ClassImbalance`),
    ``C[i][j]`` counts samples of label ``i`` predicted as ``j`` (size
    ``category_no``, default the largest class seen + 1). For every predicted
    class ``j`` with ``S_j = sum_i C[i][j] > 0``: fires when
    ``C[j][j] / S_j < min_diag`` or ``C[i][j] / S_j > max_off_diag`` for some
    ``i != j``. (smdebug's documentation writes the diagonal denominator as
    ``sum_j C[j][j]``, which two balanced classes could never bring to 0.9; the
    column sum is used for both checks.)

    Needs: collections ``labels`` and ``predictions`` as raw tensors.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    category_no
        Number of classes. Default: largest class seen + 1.
    labels
        Name of the labels tensor. Default: the first of ``labels_collection``.
    predictions
        Name of the predictions tensor. Default: the first of ``predictions_collection``.
    labels_collection, predictions_collection
        Collections searched when no name is given. Defaults ``"labels"``, ``"predictions"``.
    min_diag
        Least share of correct predictions of a predicted class. Default ``0.9``.
    max_off_diag
        Largest share of one wrong label among a predicted class. Default ``0.1``.
    """

    state_attrs = ("no_classes",)

    def __init__(
        self,
        base_trial: Any = None,
        category_no: int | None = None,
        labels: str | None = None,
        predictions: str | None = None,
        labels_collection: str = "labels",
        predictions_collection: str = "predictions",
        min_diag: float = 0.9,
        max_off_diag: float = 0.1,
    ) -> None:
        super().__init__(base_trial, _named(labels, labels_collection), _named(predictions, predictions_collection))
        self.category_no = None if category_no is None else check_number("category_no", category_no, 2, integer=True)
        self.min_diag = check_number("min_diag", min_diag, 0, 1)
        self.max_off_diag = check_number("max_off_diag", max_off_diag, 0, 1)

    def invoke_at_step(self, step: int) -> bool:
        lab, pred = self.read(step, self.labels, need=True), self.read(step, self.predictions, need=True)
        if lab is None or pred is None:
            return False
        classes = self.pooled(lab[0], lab[1], False)
        pairs = None if classes is None else self.paired(step, (lab[0], classes), pred, False)
        if pairs is None or pairs[1].size == 0:
            return False
        y, p = pairs
        k = self.category_no or int(max(y.max(), p.max())) + 1
        keep = (y >= 0) & (y < k) & (p >= 0) & (p < k)
        c = np.zeros((k, k), dtype=np.int64)
        np.add.at(c, (y[keep], p[keep]), 1)
        for j in range(k):
            col = c[:, j].sum()
            if col == 0:
                continue
            if c[j, j] / col < self.min_diag:
                return self.fire(
                    step,
                    f"predicted class {j}: {c[j, j] / col:.3g} correct < min_diag {self.min_diag:g} at step {step}",
                    [lab[0], pred[0]],
                )
            off = [i for i in range(k) if i != j and c[i, j] / col > self.max_off_diag]
            if off:
                return self.fire(
                    step,
                    f"predicted class {j}: {c[off[0], j] / col:.3g} of it is label {off[0]} > "
                    f"max_off_diag {self.max_off_diag:g} at step {step}",
                    [lab[0], pred[0]],
                )
        return False
