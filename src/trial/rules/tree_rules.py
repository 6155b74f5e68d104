"""Rules on gradient-boosted trees (XGBoost): feature importance overweight, tree depth."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Requirement, Rule, check_number
from .reading import Selection, raw_at, scalar_at

if TYPE_CHECKING:
    from ..trial import Trial

# XGBoost's distributed training builds one model, whose trees and feature importance every rank saves alike:
# these rules read the first worker that saved them (the reading helpers without ``worker``)
NUM_FEATURE = "hyperparameters/num_feature"  # the XGBoost adapter saves the booster's learner parameters
MAX_DEPTH = "hyperparameters/max_depth"


def saved_count(trial: Any, name: str, step: int | None = None) -> int:
    """Hyperparameter ``name`` as a count: its value saved last at or before ``step`` (None: first saved), or 0
    when it was not saved (yet) or is no count (a trial may come from a stranger: NaN, infinite, negative, not
    one value, above 2**31)."""
    if name not in trial.tensor_names(regex=f"^{re.escape(name)}$"):
        return 0
    t = trial.tensor(name)
    steps = t.steps()
    before = [s for s in steps if step is None or s <= step]
    at = before[-1 if step is not None else 0] if before else (steps[0] if steps else None)
    value = np.asarray(t.value(at)) if at is not None else np.empty(0)
    if value.size != 1 or value.dtype.kind not in "iuf":
        return 0
    n = float(value.reshape(()))
    return int(n) if 0 <= n < 2**31 else 0


class FeatureImportanceOverweight(Rule):
    """Fires when a few features hold too much of the model's feature importance.

    Formula: at each step, ``v_f`` = the importance of each tensor matching
    ``tensor_regex`` (one per feature): the sum of its absolute values, so the
    signed coefficients of ``booster="gblinear"`` (one per class) count by
    their magnitude; with ``r_f = v_f / sum(v)``, fires when
    the model has more than ``nfeatures`` features and the sum of the
    ``nfeatures`` largest ``r_f`` exceeds ``threshold``. XGBoost saves the
    importance of the features used in a split only: the features of the model
    are counted from ``hyperparameters/num_feature`` when it is saved (the
    unused ones have importance 0, so a model that splits on one leaked feature
    of eight fires), else from the features saved.

    Needs: collection ``feature_importance`` (the XGBoost adapter saves
    ``feature_importance/<type>/<feature>`` for five importance types), and
    ``hyperparameters`` for the number of features.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    threshold
        Largest tolerated share of the top features. Default ``0.8``.
    nfeatures
        How many of the largest features are summed. Default 3.
    tensor_regex
        Which importance tensors (one type). Default ``".*feature_importance/weight"``.
    """

    def __init__(
        self,
        base_trial: Any = None,
        threshold: float = 0.8,
        nfeatures: int = 3,
        tensor_regex: str | Sequence[str] = ".*feature_importance/weight",
    ) -> None:
        super().__init__(base_trial)
        self.threshold = check_number("threshold", threshold, 0, 1)
        self.nfeatures = check_number("nfeatures", nfeatures, 1, integer=True)
        self.selection = Selection(None, tensor_regex, ())
        self._features = 0  # model_features once found: saved once, it does not change

    def required_captures(self) -> list[Requirement]:
        return [Requirement("feature_importance"), Requirement("hyperparameters")]

    def model_features(self) -> int:
        """``hyperparameters/num_feature`` (XGBoost's number of features), or 0 when it was not saved (yet) or
        is no count (:func:`saved_count`). Read until found, not at every step."""
        if not self._features:
            self._features = saved_count(self.base_trial, NUM_FEATURE)
        return self._features

    def magnitude(self, name: str, step: int) -> float | None:
        """The importance of feature tensor ``name`` at ``step``: the sum of its absolute values (gblinear's
        signed coefficients, one per class), or the absolute value of its saved ``mean``."""
        t = self.base_trial.tensor(name)
        if t.has_raw(step):
            self.found_input()
            return float(np.abs(np.asarray(t.value(step), dtype=np.float64)).sum())
        v = scalar_at(self, self.base_trial, name, step, Requirement("feature_importance"))
        return None if v is None else abs(v)

    def invoke_at_step(self, step: int) -> bool:
        names = self.selection.names(self.base_trial, step)
        if not names:
            if not self.selection.names(self.base_trial):
                self.need(step, Requirement("feature_importance"), f"no tensor of {self.selection.describe()}")
            return False
        values = {n: self.magnitude(n, step) for n in names}
        clean = {n: v for n, v in values.items() if v is not None and np.isfinite(v)}
        total = sum(clean.values())
        features = max(len(clean), self.model_features())
        if features <= self.nfeatures or total <= 0:
            return False
        top = sorted(clean, key=clean.__getitem__, reverse=True)[: self.nfeatures]
        share = sum(clean[n] for n in top) / total
        if share > self.threshold:
            used = f", {len(clean)} used in a split" if len(clean) < features else ""
            return self.fire(
                step,
                f"the {len(top)} most important of {features} features{used} "
                f"({', '.join(top)}) hold {share:.3g} of the importance > threshold "
                f"{self.threshold:g} at step {step}",
                top,
            )
        return False


def tree_depths(tree: np.ndarray, node: np.ndarray, yes: np.ndarray, no: np.ndarray) -> dict[int, int]:
    """Depth of every tree (edges from the root to the deepest leaf) from ``trees_to_dataframe`` columns."""
    depths: dict[int, int] = {}
    for t in np.unique(tree):
        rows = tree == t
        children = {
            int(n): [int(c) for c in (y, m) if np.isfinite(c)]
            for n, y, m in zip(node[rows], yes[rows], no[rows], strict=True)
        }
        level, frontier = 0, [0] if 0 in children else []
        while frontier:
            nxt = [c for n in frontier for c in children.get(n, [])]
            if not nxt:
                break
            level, frontier = level + 1, nxt
        depths[int(t)] = level
    return depths


def _treeless(trial: Trial) -> str:
    """Why the model of ``trial`` has no tree XGBoost dumps, in words: its booster, from the parameters the
    workers recorded (``workers/worker_<rank>.json``, key ``"hyperparameters"``); both kinds where no worker
    recorded one (a trial from elsewhere)."""
    for worker in trial._index.workers.values():
        params = worker.info.get("hyperparameters")
        if not isinstance(params, dict):
            continue
        if params.get("multi_strategy") == "multi_output_tree":
            return 'the model has multi-target trees (multi_strategy="multi_output_tree"), which XGBoost cannot dump'
        if params.get("booster") == "gblinear":
            return 'the model is a linear booster (booster="gblinear"), which has no trees'
    return (
        'the model has none of the kind XGBoost dumps (a linear booster, booster="gblinear", or multi-target '
        'trees, multi_strategy="multi_output_tree")'
    )


class TreeDepth(Rule):
    """Fires when the trees of a boosted model are shallower than ``depth`` (or than their ``max_depth``).

    Formula: from the ``trees`` collection (``trees/Tree``, ``trees/Node``,
    ``trees/Yes``, ``trees/No``: the ``trees_to_dataframe`` columns the XGBoost
    adapter saves), the depth of each tree is the number of edges from its root
    to its deepest leaf. With ``m`` = ``hyperparameters/max_depth`` (the value
    saved last at or before the step; XGBoost's default 6 is saved too), the
    least depth expected is ``d = min(depth, m)``, or ``depth`` when ``m`` is
    0 (no limit, ``grow_policy="lossguide"``) or was not saved. Fires when the
    deepest tree at the step has depth ``< d``: XGBoost rejected the splits
    that would have made it as deep as it may grow (``min_split_loss``,
    ``min_child_weight``, ``max_leaves``, a learning rate of 0, no signal in
    the features): the model is not learning, or is regularized more than
    intended. A model with ``max_depth=3`` whose trees reach depth 3 does not
    fire; where ``hyperparameters/max_depth`` is not in the trial (collection
    ``hyperparameters`` left out), ``depth`` is expected, and the reason says so.

    Needs: collection ``trees`` as raw tensors (it needs pandas at capture
    time); ``hyperparameters`` (saved by default) for ``max_depth``.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    depth
        Least depth the deepest tree should reach, when ``max_depth`` allows it. Default 4.
    """

    columns = ("Tree", "Node", "Yes", "No")

    def __init__(self, base_trial: Any = None, depth: int = 4) -> None:
        super().__init__(base_trial)
        self.depth = check_number("depth", depth, 1, integer=True)

    def required_captures(self) -> list[Requirement]:
        return [Requirement("trees", (), True)]

    def invoke_at_step(self, step: int) -> bool:
        trial = self.base_trial
        trees = Selection(("trees",), None, ())
        saved = set(trees.names(trial, step))
        names = [n for n in (f"trees/{c}" for c in self.columns) if n in saved]
        if len(names) < len(self.columns):
            if not trees.names(trial):
                self._need_trees(step)
            elif saved:  # trees of this step, without a column the depths are read from
                lacking = ", ".join(sorted({f"trees/{c}" for c in self.columns} - saved))
                why = f"{lacking} not saved (import-smdebug skips them: smdebug stores them as text)"
                self.need(step, self.required_captures()[0], why)
            return False
        arrays = [raw_at(self, trial, n, step, self.required_captures()[0]) for n in names]
        if any(a is None for a in arrays):
            return False
        depths = tree_depths(*(np.asarray(a, dtype=np.float64) for a in arrays))
        deepest = max(depths.values(), default=0)
        cap = saved_count(trial, MAX_DEPTH, step)
        cap = cap if 0 < cap < self.depth else 0  # 0: no limit below depth
        least = cap or self.depth
        if deepest < least:
            bound = f"{least} (depth {self.depth}, capped by {MAX_DEPTH} {cap})" if cap else f"depth {least}"
            unknown = (
                ""
                if cap or MAX_DEPTH in trial.tensor_names(regex=f"^{re.escape(MAX_DEPTH)}$")
                else f"; {MAX_DEPTH} is not in the trial (collection hyperparameters not captured), so the model's "
                f"max_depth is unknown and depth {self.depth} is expected"
            )
            return self.fire(
                step,
                f"the deepest of {len(depths)} trees has depth {deepest} < {bound} at step {step}{unknown}",
                names,
            )
        return False

    def _need_trees(self, step: int) -> None:
        """Say that the trial holds no tree at all: not asked for, or asked for of a model XGBoost dumps none of
        (the XGBoost callback warned of it at capture). A ReductionConfig is no cause: its trees would be named."""
        if "trees" not in self.base_trial.collections():
            self.need(step, Requirement("trees"), "no tree of the model was saved")
        else:
            self.need(step, Requirement("trees"), f"it was captured but holds no tree: {_treeless(self.base_trial)}")
