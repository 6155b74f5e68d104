"""Rules on the values of individual tensors: vanishing, exploding, zero, unchanged, variance, updates, runs."""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ... import reductions as red
from ...exceptions import TrialNotFound
from .base import check_bool, check_number, check_regexes, logger
from .reading import (
    TRAINING_MODES,
    ModeSeries,
    PerTensorRule,
    Selection,
    StepRead,
    on_worker,
    raw_at,
    reduction_at,
    untrained_weights,
)

# XGBoost's tree table (trees_to_dataframe) writes NaN for "none": the split of a leaf,
# the children of a leaf, the category of a numeric split
NAN_ENCODED_REGEX = r"^trees/(Split|Category|Yes|No|Missing)$"
# the mask arguments of a module's inputs (``inputs/<module>/<argument>``): additive attention masks hold -inf
INF_ENCODED_REGEX = r"(?i)^inputs/.+/[^/]*mask[^/]*$"
# the gradient of a bias: the last part of the name mentions bias, as the capture files collection biases
# (a parametrized one: fc.parametrizations.bias.original)
BIAS_GRADIENT_REGEX = r"bias[^./]*(\.original\d*)?$"
BIAS_GRADIENT = re.compile(BIAS_GRADIENT_REGEX)


class VanishingGradient(PerTensorRule):
    """Fires when a gradient becomes vanishingly small.

    Formula: for every tensor ``g`` of collection ``gradients`` saved at the step
    but the gradients of biases, ``m = mean(|g|)`` (the saved ``abs_mean``
    reduction, or computed from the raw tensor). Fires when ``m < threshold``
    for at least one gradient. A NaN mean does not fire (see
    :class:`ExplodingTensor`).

    The gradient of a bias is left out: it is 0 by design when a normalization
    follows the layer (``Conv2d`` or ``Dense`` with their default bias, then a
    batch, group or instance norm, which subtracts the mean the bias adds), in
    healthy models. A gradient is a bias's when the last part of its name
    contains ``bias``, as the capture files collection ``biases``
    (``gradients/conv.bias``, ``gradients/dense/bias``,
    ``gradients/lstm.bias_hh_l0``: :data:`BIAS_GRADIENT_REGEX`). Gradients
    that vanish do in the weight matrices and kernels of the same layers, and
    those are judged.

    Needs: collection ``gradients`` with reduction ``abs_mean`` (or raw gradients).

    Parameters
    ----------
    base_trial
        The trial to inspect (None inside ``Hook(rules=[...])``).
    threshold
        Mean absolute gradient below which a gradient has vanished. Default ``1e-7``.
    """

    def __init__(self, base_trial: Any = None, threshold: float = 1e-7) -> None:
        super().__init__(base_trial)
        self.threshold = check_number("threshold", threshold, 0)
        self.selection = Selection(("gradients",), None, ())

    def capture(self) -> tuple[tuple[str, ...], bool]:
        return ("abs_mean",), False

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        if BIAS_GRADIENT.search(name):
            return None
        m = reduction_at(self, self.base_trial, name, step, "abs_mean", self.requirement(), worker)
        if m is not None and m < self.threshold:
            return f"{name}: mean |g| = {m:.3g} < threshold {self.threshold:g}"
        return None


class ExplodingTensor(PerTensorRule):
    """Fires when a tensor holds NaN (or, unless ``only_nan``, infinite) values.

    Formula: for every selected tensor saved at the step, ``n = nan_count`` and
    ``i = inf_count`` (saved health counts, or counted on the raw tensor). Fires
    when ``n > 0``, or when ``i > 0`` and ``only_nan`` is False. In tensors whose
    name matches ``nan_encoded_regex`` a NaN is an encoding, not a failure, and
    ``n`` is taken as 0: by default the columns of XGBoost's tree table where
    ``trees_to_dataframe`` writes NaN for "none" (``trees/Split``,
    ``trees/Category``, and ``trees/Yes``, ``trees/No``, ``trees/Missing`` of
    leaves). Their infinite values still count, and so does every NaN of the
    other tree columns (``trees/Gain``, ``trees/Cover``).

    Likewise, in tensors whose name matches ``inf_encoded_regex`` an infinite
    value is an encoding and ``i`` is taken as 0: by default the mask
    arguments of a module's captured inputs (``inputs/<module>/<argument>``
    whose argument name holds ``mask``, in any case), such as the -inf above
    the diagonal of PyTorch's ``generate_square_subsequent_mask`` given to a
    ``TransformerEncoderLayer`` (``inputs/block.self_attn/attn_mask``,
    ``inputs/block/src_mask``) or an additive padding mask. Their NaNs still
    count.

    Mixed precision: a loss scaler skips a step whose scaled gradients
    overflow (it applies no update, lowers its scale and goes on), which healthy
    fp16 trainings do, mostly in their first steps. Such a step has no gradients
    in the trial (PyTorch's ``torch.amp.GradScaler``, Keras's
    ``LossScaleOptimizer``: none was applied; one warning names the first), so
    the rule does not fire there.

    Needs: the selected collections with reductions ``nan_count`` and
    ``inf_count`` (or raw tensors). In-process, a hook captures ``weights``,
    ``biases``, ``gradients`` and ``losses`` when no collection is named.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    collection_names
        Collections to inspect. With neither this nor ``tensor_regex``: every tensor.
    tensor_regex
        Regexes (``re.search``) of tensor names to inspect, in addition.
    only_nan
        Ignore infinite values. Default False.
    nan_encoded_regex
        Tensors whose NaN values are not counted; None counts every NaN.
        Default ``NAN_ENCODED_REGEX``, the XGBoost tree columns above.
    inf_encoded_regex
        Tensors whose infinite values are not counted; None counts every infinity.
        Default ``INF_ENCODED_REGEX``, the mask inputs above.
    """

    def __init__(
        self,
        base_trial: Any = None,
        collection_names: str | Sequence[str] | None = None,
        tensor_regex: str | Sequence[str] | None = None,
        only_nan: bool = False,
        nan_encoded_regex: str | None = NAN_ENCODED_REGEX,
        inf_encoded_regex: str | None = INF_ENCODED_REGEX,
    ) -> None:
        super().__init__(base_trial)
        self.only_nan = check_bool("only_nan", only_nan)
        self.selection = Selection(collection_names, tensor_regex, ())
        self.nan_encoded = encoding_regex("nan_encoded_regex", nan_encoded_regex)
        self.inf_encoded = encoding_regex("inf_encoded_regex", inf_encoded_regex)

    def capture(self) -> tuple[tuple[str, ...], bool]:
        return ("nan_count",) if self.only_nan else ("nan_count", "inf_count"), False

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        req = self.requirement(name)
        nan_encoded = self.nan_encoded is not None and self.nan_encoded.search(name) is not None
        inf_encoded = self.inf_encoded is not None and self.inf_encoded.search(name) is not None
        if nan_encoded and (inf_encoded or self.only_nan):
            return None
        trial = self.base_trial
        nan = 0.0 if nan_encoded else reduction_at(self, trial, name, step, "nan_count", req, worker)
        inf = 0.0 if inf_encoded or self.only_nan else reduction_at(self, trial, name, step, "inf_count", req, worker)
        if nan is None or inf is None or nan == inf == 0:
            return None
        if nan_encoded:
            return f"{name}: {int(inf)} infinite value(s) (its NaNs encode missing values and are not counted)"
        if self.only_nan:
            return f"{name}: {int(nan)} NaN"
        if inf_encoded:
            return f"{name}: {int(nan)} NaN (its infinite values encode masked positions and are not counted)"
        return f"{name}: {int(nan)} NaN and {int(inf)} infinite value(s)"


def encoding_regex(parameter: str, regex: str | None) -> re.Pattern[str] | None:
    """``regex`` of parameter ``parameter`` compiled (None: None), or a ``ValueError`` naming it."""
    if regex is None:
        return None
    check_regexes(parameter, [regex])
    return re.compile(regex)


# values for which zero is a value, not a fault: a hyperparameter (alpha=0), an error
# rate reached 0, XGBoost's tree table (tree index 0), labels of class 0
NOT_MODEL_TENSORS = ("hyperparameters", "losses", "metrics", "trees", "labels")
# values that stay the same in a healthy training, besides those: the importance (and mean |SHAP|) of a feature
# no new tree splits on; an optimizer's learning rate at a constant schedule (Keras holds it as a variable)
CONSTANT_BY_DESIGN = (*NOT_MODEL_TENSORS, "feature_importance", "average_shap", "optimizer_variables")


class AllZero(PerTensorRule):
    """Fires when at least ``threshold`` percent of a tensor's values are zero.

    Formula: ``z = 100 * count(v == 0) / size(v)`` on the raw tensor; fires when
    ``z >= threshold`` (``threshold`` in [0, 100]). With ``threshold=100``
    saved reductions suffice: the tensor is all zero when its ``abs_max`` (or
    ``l1`` or ``l2``) is 0. Empty tensors never fire. With neither ``collection_names`` nor ``tensor_regex``
    it inspects every tensor but those of collections ``hyperparameters``,
    ``losses``, ``metrics``, ``trees`` and ``labels``, where zero is a value,
    not a fault (``alpha=0``, a training error of 0, the index of tree 0).

    Needs: the selected collections as raw tensors (for ``threshold=100``,
    reduction ``abs_max`` is enough).

    Parameters
    ----------
    base_trial
        The trial to inspect.
    collection_names
        Collections to inspect. With neither this nor ``tensor_regex``: every tensor
        but those of ``hyperparameters``, ``losses``, ``metrics``, ``trees``, ``labels``.
    tensor_regex
        Regexes of tensor names to inspect, in addition.
    threshold
        Percentage of zero values that fires. Default ``100``.
    """

    def __init__(
        self,
        base_trial: Any = None,
        collection_names: str | Sequence[str] | None = None,
        tensor_regex: str | Sequence[str] | None = None,
        threshold: float = 100.0,
    ) -> None:
        super().__init__(base_trial)
        self.threshold = check_number("threshold", threshold, 0, 100)
        self.selection = Selection(collection_names, tensor_regex, (), NOT_MODEL_TENSORS)

    def capture(self) -> tuple[tuple[str, ...], bool]:
        return (("abs_max",), False) if self.threshold >= 100 else ((), True)

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        read = StepRead(self.base_trial, name, step, worker)
        if not read.raw and self.threshold >= 100:
            saved = [k for k in ("abs_max", "l1", "l2") if k in read.reductions]
            if saved:
                value = read.reduction_for(self, saved[0], self.requirement(name))
                return f"{name}: all values are zero ({saved[0]} = 0)" if value == 0 else None
        v = read.value_for(self, self.requirement(name))
        if v is None or v.size == 0:
            return None
        percent = 100.0 * np.count_nonzero(v == 0) / v.size
        if percent >= self.threshold:
            return f"{name}: {percent:.4g}% of its {v.size} values are zero (threshold {self.threshold:g}%)"
        return None


class TensorVariance(PerTensorRule):
    """Fires when a tensor's variance leaves the band ``[min_threshold, max_threshold]``.

    Formula: ``var = mean((v - mean(v))**2)`` over all elements (the saved
    ``variance`` reduction, or computed from the raw tensor). Fires when
    ``var > max_threshold`` or ``var < min_threshold``; a bound left as None is
    not checked, but at least one must be given.

    Needs: the selected collections with reduction ``variance`` (or raw tensors).

    Parameters
    ----------
    base_trial
        The trial to inspect.
    collection_names
        Collections to inspect. Default (with no ``tensor_regex``): ``weights`` and ``gradients``.
    tensor_regex
        Regexes of tensor names to inspect, in addition.
    max_threshold
        Upper bound of the variance. Default None.
    min_threshold
        Lower bound of the variance. Default None.
    """

    def __init__(
        self,
        base_trial: Any = None,
        collection_names: str | Sequence[str] | None = None,
        tensor_regex: str | Sequence[str] | None = None,
        max_threshold: float | None = None,
        min_threshold: float | None = None,
    ) -> None:
        super().__init__(base_trial)
        if max_threshold is None and min_threshold is None:
            raise ValueError("TensorVariance: give max_threshold and/or min_threshold (both are None)")
        if max_threshold is not None:
            max_threshold = check_number("max_threshold", max_threshold)
        if min_threshold is not None:
            min_threshold = check_number("min_threshold", min_threshold)
        if max_threshold is not None and min_threshold is not None and min_threshold > max_threshold:
            raise ValueError(
                f"TensorVariance: min_threshold {min_threshold:g} > max_threshold {max_threshold:g}: "
                "the band is empty and every tensor would fire"
            )
        self.max_threshold = max_threshold
        self.min_threshold = min_threshold
        self.selection = Selection(collection_names, tensor_regex, ("weights", "gradients"))

    def capture(self) -> tuple[tuple[str, ...], bool]:
        return ("variance",), False

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        var = reduction_at(self, self.base_trial, name, step, "variance", self.requirement(name), worker)
        if var is None:
            return None
        if self.max_threshold is not None and var > self.max_threshold:
            return f"{name}: variance {var:.4g} > max_threshold {self.max_threshold:g}"
        if self.min_threshold is not None and var < self.min_threshold:
            return f"{name}: variance {var:.4g} < min_threshold {self.min_threshold:g}"
        return None


class TrainedOnlyRule(PerTensorRule):
    """A per-tensor rule on how tensors change, which leaves out the weights that were not trained.

    A weight or bias with no gradient in the trial while other weights have one
    (:func:`~tensortap.trial.rules.reading.untrained_weights`: a frozen layer)
    does not change by design; :meth:`check` is not called for it, and a
    warning names the weights left out, once.
    """

    def __init__(self, base_trial: Any = None) -> None:
        super().__init__(base_trial)
        self.untrained: set[str] = set()

    def invoke_at_step(self, step: int) -> bool:
        """Judge the selected tensors of ``step`` but the untrained weights."""
        untrained = untrained_weights(self.base_trial)
        if untrained - self.untrained:
            shown = sorted(untrained)
            logger.warning(
                "tensortap: %s leaves out %d weight(s) with no gradient in the trial (frozen layers, or left out "
                "of the optimizer: not trained): %s",
                self.name,
                len(shown),
                ", ".join(shown[:5]) + (", ..." if len(shown) > 5 else ""),
            )
        self.untrained = untrained
        return super().invoke_at_step(step)


class UnchangedTensor(TrainedOnlyRule):
    """Fires when a tensor has stopped changing over its last ``num_steps`` saved steps.

    Formula: at step ``s``, take the last ``num_steps`` saved steps of the tensor
    up to and including ``s``: ``s_1 < ... < s_n = s``. Fires when
    ``n == num_steps`` and ``numpy.allclose(v(s_i), v(s), rtol, atol, equal_nan)``
    holds for every ``i``. So identical values at steps 0, 1, 2 fire at step 2
    with ``num_steps=3``, and not before. The steps are those of the tensor's
    TRAIN mode, and (a series of their own) of its GLOBAL mode (steps saved
    without a mode); EVAL and PREDICT steps are not judged: weights saved while
    evaluating do not change (a sanity-check validation before the training).
    A run of an ended training where no tensor had ``num_steps`` such steps
    lacks inputs and says so (:meth:`~tensortap.rules.Rule.not_judged`): not a
    pass (while the training runs, more steps may come). With neither
    ``collection_names`` nor ``tensor_regex`` it inspects every tensor but those of collections
    ``hyperparameters``, ``losses``, ``metrics``, ``trees``, ``labels``,
    ``feature_importance``, ``average_shap`` and ``optimizer_variables``,
    which stay the same in a healthy training (the labels of an evaluation
    set, an error rate at 0, the importance of a feature no new tree splits
    on, a Keras optimizer's ``learning_rate`` at a constant schedule); a loss
    that stops falling is ``LossNotDecreasing``'s. Weights and biases that
    have no gradient in the trial while others have one are left out whatever
    the selection (see :class:`WeightUpdateRatio`).

    Needs: the selected collections as raw tensors.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    collection_names
        Collections to inspect. With neither this nor ``tensor_regex``: every tensor
        but those of ``hyperparameters``, ``losses``, ``metrics``, ``trees``, ``labels``,
        ``feature_importance``, ``average_shap``, ``optimizer_variables``.
    tensor_regex
        Regexes of tensor names to inspect, in addition.
    num_steps
        Number of saved steps (the current one included) that must be all close. Default 3.
    rtol, atol, equal_nan
        As in ``numpy.allclose``. Defaults ``1e-05``, ``1e-08``, False.
    """

    state_attrs = ("judged", "most")
    state_version = 2  # judged, most (hunt 56): no state before

    def __init__(
        self,
        base_trial: Any = None,
        collection_names: str | Sequence[str] | None = None,
        tensor_regex: str | Sequence[str] | None = None,
        num_steps: int = 3,
        rtol: float = 1e-05,
        atol: float = 1e-08,
        equal_nan: bool = False,
    ) -> None:
        super().__init__(base_trial)
        self.num_steps = check_number("num_steps", num_steps, 2, integer=True)
        self.rtol, self.atol = check_number("rtol", rtol, 0), check_number("atol", atol, 0)
        self.equal_nan = check_bool("equal_nan", equal_nan)
        self.history = self.num_steps
        self.selection = Selection(collection_names, tensor_regex, (), CONSTANT_BY_DESIGN)
        self.series = ModeSeries(TRAINING_MODES)
        # raw values of the last window, by tensor and worker (reading.on_worker)
        self._recent: dict[str, dict[int, np.ndarray]] = {}
        self.judged = False  # a tensor's last num_steps saved steps were compared
        self.most = 0  # the most saved steps of a judged mode a tensor had

    def not_judged(self) -> str | None:
        """``num_steps`` saved steps of a tensor, while no tensor had as many by the end of the training."""
        if self.judged or not self.base_trial.training_ended or self.most >= self.num_steps:
            return None
        return (
            f"a tensor saved at {self.num_steps} TRAIN (or GLOBAL) steps to judge (parameter num_steps): "
            f"{self.most} at most; lower num_steps, or save more steps"
        )

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        found = None if name in self.untrained else self.series.at(self.base_trial, name, step, worker)
        if found is not None:
            self.most = max(self.most, found[3] + 1)
        if found is None or found[3] + 1 < self.num_steps:
            return None
        _, _, series, i = found
        steps = [g for _, g in series[i + 1 - self.num_steps : i + 1]]
        key = on_worker(name, worker)
        recent = {g: v for g, v in self._recent.get(key, {}).items() if g >= steps[0]}
        for g in steps:
            if g not in recent:
                v = raw_at(self, self.base_trial, name, g, self.requirement(name), worker)
                if v is None:
                    return None
                recent[g] = v
        self._recent[key] = recent
        self.judged = True
        values = [recent[g] for g in steps]
        current = values[-1]
        for v in values[:-1]:
            if v.shape != current.shape or not np.allclose(v, current, self.rtol, self.atol, self.equal_nan):
                return None
        return (
            f"{name}: unchanged over its last {self.num_steps} saved steps "
            f"({', '.join(map(str, steps))}; rtol={self.rtol:g}, atol={self.atol:g})"
        )


class WeightUpdateRatio(TrainedOnlyRule):
    """Fires when the update of a weight is too large or too small relative to the weight.

    Formula: for each tensor ``w`` of collection ``weights`` saved at step ``s``,
    with ``p`` the previous saved step of ``w`` (``num_steps=None``), or the
    earliest saved step with ``s - num_steps <= p < s``:
    ``ratio = ||w(s) - w(p)||_2 / (||w(p)||_2 + epsilon)``. Fires when
    ``ratio > large_threshold`` or ``ratio < small_threshold``. Steps (and
    ``num_steps``) are counted in the tensor's TRAIN mode, and (a series of
    their own) in its GLOBAL mode (steps saved without a mode); EVAL and
    PREDICT steps are not judged: weights saved during evaluation do not
    change. A run of an ended training that computed no ratio (each weight
    saved at one step, or never twice within ``num_steps`` steps) lacks inputs
    and says so (:meth:`~tensortap.rules.Rule.not_judged`): not a pass (while
    the training runs, more steps may come).

    A weight with no gradient in the trial while other weights have one
    (``gradients/<weight>``) was not trained and is left out: a frozen layer
    (PyTorch ``requires_grad=False``, Keras ``trainable=False``, Keras's
    batch-norm statistics) does not change by design. The PyTorch hook saves
    the gradients an optimizer applies, so a layer left out of the optimizer
    by mistake is left out too: a warning names the weights left out. With no
    gradient in the trial every weight is judged.

    A weight initialised at zero (LoRA's ``B`` matrix, a zero-initialised head)
    grows from nothing in its first steps: its ratio is large by design there,
    and the rule fires. Judge such runs from a later step (``start_step``).

    Needs: collection ``weights`` as raw tensors, saved at consecutive (or close)
    steps; collection ``gradients`` tells the weights that were trained.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    num_steps
        Largest distance between the two steps compared; None: the previous saved step.
    large_threshold
        Ratio above which the update is too large. Default ``10.0``.
    small_threshold
        Ratio below which the update is too small. Default ``1e-8``.
    epsilon
        Added to the denominator. Default ``1e-9``.
    """

    history = 2
    state_attrs = ("judged", "closest")
    state_version = 2  # judged, closest (hunt 56): no state before

    def __init__(
        self,
        base_trial: Any = None,
        num_steps: int | None = None,
        large_threshold: float = 10.0,
        small_threshold: float = 1e-8,
        epsilon: float = 1e-9,
    ) -> None:
        super().__init__(base_trial)
        if num_steps is not None:
            num_steps = check_number("num_steps", num_steps, 1, integer=True)
            self.history = num_steps + 1
        large_threshold = check_number("large_threshold", large_threshold, 0)
        small_threshold = check_number("small_threshold", small_threshold, 0)
        epsilon = check_number("epsilon", epsilon, 0)
        if small_threshold >= large_threshold:
            raise ValueError(
                f"WeightUpdateRatio: small_threshold {small_threshold:g} >= large_threshold {large_threshold:g}: "
                "the band of healthy ratios is empty and every weight would fire"
            )
        self.num_steps = num_steps
        self.large_threshold, self.small_threshold, self.epsilon = large_threshold, small_threshold, epsilon
        self.selection = Selection(("weights",), None, ())
        self.series = ModeSeries(TRAINING_MODES)
        self.judged = False  # a ratio was computed
        self.closest: int | None = None  # the fewest steps between two saved steps of a weight (None: no two)

    def not_judged(self) -> str | None:
        """Two saved steps of a weight close enough to compare, while no ratio was computed by the end of the
        training."""
        if self.judged or not self.base_trial.training_ended:
            return None
        if self.closest is None:
            return "a weight saved at two TRAIN (or GLOBAL) steps to compare: each was saved at one at most"
        if self.num_steps is not None and self.closest > self.num_steps:
            return (
                f"weights saved at most num_steps={self.num_steps} steps apart (parameter num_steps): saved "
                f"{self.closest} steps apart at the closest; raise num_steps, or save weights more often"
            )
        return None

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        trial = self.base_trial
        found = None if name in self.untrained else self.series.at(trial, name, step, worker)
        if found is None or found[3] == 0:
            return None
        _, now, series, i = found
        gap = now - series[i - 1][0]
        self.closest = gap if self.closest is None else min(self.closest, gap)
        if self.num_steps is None:
            prev_step = series[i - 1][1]
        else:
            first = bisect.bisect_left(series, (now - self.num_steps, -1))
            if first >= i:
                return None
            prev_step = series[first][1]
        w, w_prev = (
            raw_at(self, trial, name, step, self.requirement(), worker),
            raw_at(self, trial, name, prev_step, self.requirement(), worker),
        )
        if w is None or w_prev is None or w.shape != w_prev.shape:
            return None
        self.judged = True
        w64, p64 = w.astype(np.float64), w_prev.astype(np.float64)
        # the l2 reduction, not np.linalg.norm: its BLAS dot wakes OpenBLAS's threads on the training thread
        # (in-process), which slowed a training 6x on a busy 2-core host
        ratio = red.compute(w64 - p64, "l2") / (red.compute(p64, "l2") + self.epsilon)
        if ratio > self.large_threshold:
            return (
                f"{name}: update/weight ratio {ratio:.3g} (steps {prev_step}->{step}) > large_threshold "
                f"{self.large_threshold:g}"
            )
        if ratio < self.small_threshold:
            return (
                f"{name}: update/weight ratio {ratio:.3g} (steps {prev_step}->{step}) < small_threshold "
                f"{self.small_threshold:g}"
            )
        return None


class SimilarAcrossRuns(PerTensorRule):
    """Fires when a tensor differs between this trial and another run at the same step.

    Formula: for every selected tensor saved at step ``s`` in both trials, fires
    when ``not numpy.allclose(a, b, rtol, atol)`` (or the shapes differ), where
    ``a`` and ``b`` are the raw values of the two runs.

    Needs: the selected collections as raw tensors in both trials.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    other_trials
        The other run: a trial path or URL, or a :class:`~tensortap.trial.Trial`.
    collection_names
        Collections to compare. With neither this nor ``tensor_regex``: every tensor.
    tensor_regex
        Regexes of tensor names to compare, in addition.
    rtol, atol
        As in ``numpy.allclose``. Defaults ``1e-05``, ``1e-08``.

    Raises
    ------
    ValueError
        ``other_trials`` is None, or a path where there is no trial (the message names the parameter and
        says what is there, as :class:`~tensortap.exceptions.TrialNotFound` does).
    """

    def __init__(
        self,
        base_trial: Any = None,
        other_trials: Any = None,
        collection_names: str | Sequence[str] | None = None,
        tensor_regex: str | Sequence[str] | None = None,
        rtol: float = 1e-05,
        atol: float = 1e-08,
    ) -> None:
        super().__init__(base_trial)
        if other_trials is None:
            raise ValueError("other_trials: expected the path of the other run (or a Trial), got None")
        if isinstance(other_trials, str):
            from ..trial import create_trial

            try:
                other_trials = create_trial(other_trials)
            except TrialNotFound as exc:  # a parameter of the rule, not the trial it judges
                raise ValueError(f"other_trials: {exc}") from exc
        self.other_trial = other_trials
        self.rtol, self.atol = check_number("rtol", rtol, 0), check_number("atol", atol, 0)
        self.selection = Selection(collection_names, tensor_regex, ())

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        if name not in self.other_trial.tensor_names():
            return None
        saved = self.other_trial.tensor(name).workers(step)
        if not saved or (worker is not None and worker not in saved):  # each worker against the same worker
            return None
        req = self.requirement(name)
        a = raw_at(self, self.base_trial, name, step, req, worker)
        b = raw_at(self, self.other_trial, name, step, req, worker)
        if a is None or b is None:
            return None
        if a.shape != b.shape:
            return f"{name}: shape {a.shape} here, {b.shape} in the other run"
        if not np.allclose(a, b, self.rtol, self.atol):
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            return f"{name}: differs from the other run (max |a - b| = {diff:.3g})"
        return None
