"""Rules on activations and initialization: dead ReLUs, saturated tanh/sigmoid, poor initialization."""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .base import Requirement, Rule, check_number, check_regexes, regex_list
from .reading import TRAINING_MODES, ModeSeries, PerTensorRule, Selection, raw_at, reduction_at, scalar_at


def inactive_percent(
    x: np.ndarray, active: Callable[[np.ndarray], np.ndarray], threshold_inactivity: float
) -> tuple[float, int]:
    """Percentage of units active in less than ``threshold_inactivity`` percent of the samples.

    ``x`` is read as ``(samples, units)``: the first axis is the batch, the other
    axes are flattened into units (a 1-d tensor is one sample). Returns the
    percentage and the number of units.
    """
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    if rows.size == 0:
        return 0.0, 0
    activity = 100.0 * np.count_nonzero(active(rows), axis=0) / rows.shape[0]
    return 100.0 * float(np.count_nonzero(activity < threshold_inactivity)) / rows.shape[1], rows.shape[1]


class LayerKindRule(PerTensorRule):
    """A per-tensor rule that judges only the selected tensors of one kind of layer (ReLU, tanh, ...).

    :meth:`check` calls :meth:`not_of_kind` for a tensor of another layer and
    :meth:`of_kind` for one it judges. A step whose selected tensors are all
    of other layers records a missing input (:meth:`Rule.need`, with
    :meth:`kind_missing`): the rule judged nothing there and must not pass.
    """

    def __init__(self, base_trial: Any = None) -> None:
        super().__init__(base_trial)
        self._other: list[str] = []  # tensors of the step from other layers
        self._judged = 0  # tensors of the step judged

    def not_of_kind(self, name: str) -> None:
        """Record that tensor ``name`` is not of the layers this rule judges (once, whatever its workers)."""
        if name not in self._other:
            self._other.append(name)

    def of_kind(self) -> None:
        """Record that the tensor being checked is judged."""
        self._judged += 1

    def kind_missing(self, shown: str) -> str:
        """What was missing, for :meth:`Rule.need`; ``shown`` lists the first tensors of other layers."""
        raise NotImplementedError

    def invoke_at_step(self, step: int) -> bool:
        """Judge the tensors of ``step`` (:meth:`PerTensorRule.invoke_at_step`); say when none was of the kind."""
        self._other, self._judged = [], 0
        fired = super().invoke_at_step(step)
        if self._other and not self._judged:
            shown = ", ".join(self._other[:3]) + (", ..." if len(self._other) > 3 else "")
            self.need(step, self.requirement(), self.kind_missing(shown))
        return fired


class DeadRelu(LayerKindRule):
    """Fires when more than ``threshold_layer`` percent of a layer's ReLUs are dead.

    Formula: each selected output tensor is read as ``(samples, units)`` (first
    axis the batch, the rest flattened). A unit's activity is
    ``100 * count(y[:, u] > 0) / samples``; the unit is dead when its activity is
    below ``threshold_inactivity``. Fires when ``100 * dead / units >
    threshold_layer`` for a tensor.

    A tensor of fewer than ``min_samples`` samples (a validation loop with
    batch size 1, the last batch of an epoch) is not judged: with one sample, a
    unit that is 0 for it is "active in < 1% of samples", and about half the
    units of a healthy ReLU layer are. It records a missing input (partial when
    another tensor of the step is judged), so a run whose every batch is
    smaller raises ``RuleInputsMissing`` instead of passing. The default 16
    leaves a unit active in a quarter of the samples of a healthy layer a 1%
    chance of reading as dead; a unit dead over the data reads as dead at any
    batch size. Judging "active in < 1%" itself would need 100 samples; below
    that, a dead unit is one active in none of the batch's samples.

    Which tensors are ReLU outputs: without ``tensor_regex``, those with no
    negative value and at least one zero at the step (the output of a ReLU, and
    of what keeps it: dropout, pooling). Other tensors are outputs of other
    layers and are not judged: one with a negative value is no ReLU output (a
    linear head whose outputs are all negative is not dead), and one with every
    value positive has no dead unit. A step with none records a missing input
    (:meth:`Rule.need`): the ReLU outputs were not captured (a ``Linear``
    before ``F.relu`` in a forward captures the pre-activation only).
    With ``tensor_regex`` the matching tensors are judged as they are; a
    pre-activation then gives the same verdict as the ReLU after it
    (``relu(x) > 0`` exactly when ``x > 0``). Data that is non-negative with
    zeros itself (word counts, one-hot features, pixels) passed through a
    layer that keeps it (a first ``Dropout``, ``Flatten``) reads as a ReLU
    output too, and a sparse input fires (a bag-of-words model's input dropout:
    56% of 1000 units "dead"); name the ReLU outputs with ``tensor_regex``
    then.

    Needs: collection ``outputs`` (or the selected ones) as raw tensors, holding
    ReLU outputs (``nn.ReLU`` modules, ``Dense(activation="relu")``,
    ``Activation("relu")``), or ``tensor_regex`` naming the pre-activations.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    tensor_regex
        Regexes of tensor names to inspect; default: every tensor of ``collection_names``.
    threshold_inactivity
        Percentage of samples below which a unit counts as dead. Default ``1.0``.
    threshold_layer
        Percentage of dead units above which the rule fires. Default ``50.0``.
    collection_names
        Collections to inspect. Default (with no ``tensor_regex``): ``outputs``.
    min_samples
        Least number of samples (first axis) of a tensor judged. Default 16.
    """

    def __init__(
        self,
        base_trial: Any = None,
        tensor_regex: str | Sequence[str] | None = None,
        threshold_inactivity: float = 1.0,
        threshold_layer: float = 50.0,
        collection_names: str | Sequence[str] | None = None,
        min_samples: int = 16,
    ) -> None:
        super().__init__(base_trial)
        self.threshold_inactivity = check_number("threshold_inactivity", threshold_inactivity, 0, 100)
        self.threshold_layer = check_number("threshold_layer", threshold_layer, 0, 100)
        self.min_samples = check_number("min_samples", min_samples, 1, integer=True)
        self.selection = Selection(collection_names, tensor_regex, ("outputs",))
        self.hook_collections = ("outputs",)
        self.relu_outputs_only = not self.selection.regexes
        self._small = 0  # tensors of the step with fewer than min_samples samples

    def invoke_at_step(self, step: int) -> bool:
        """Judge the ReLU outputs of ``step`` (:meth:`LayerKindRule.invoke_at_step`); say when some had too few
        samples."""
        self._small = 0
        fired = super().invoke_at_step(step)
        if self._small:
            self.need(
                step,
                self.requirement(),
                f"ReLU outputs of at least {self.min_samples} samples (parameter min_samples): a tensor of fewer "
                "is not judged (too few samples to tell a dead unit from one at 0 for them)",
                partial=self._judged > self._small,
            )
        return fired

    def kind_missing(self, shown: str) -> str:
        return (
            f"no ReLU output (values >= 0 with zeros) among {self.selection.describe()} ({shown}): "
            "outputs of layers without ReLU, or pre-activations (a Linear before F.relu in a forward); "
            'capture the ReLU itself (nn.ReLU, Dense(activation="relu"), Activation("relu")) '
            "or name the pre-activations with tensor_regex"
        )

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        y = raw_at(self, self.base_trial, name, step, self.requirement(name), worker)
        if y is None:
            return None
        if self.relu_outputs_only and not (bool(np.all(y >= 0)) and bool(np.any(y == 0))):
            self.not_of_kind(name)
            return None
        self.of_kind()
        if (y.shape[0] if y.ndim >= 2 else 1) < self.min_samples:
            self._small += 1
            return None
        dead, units = inactive_percent(y, lambda r: r > 0, self.threshold_inactivity)
        if units and dead > self.threshold_layer:
            return (
                f"{name}: {dead:.4g}% of its {units} units are dead (active in < "
                f"{self.threshold_inactivity:g}% of samples; threshold_layer {self.threshold_layer:g}%)"
            )
        return None


class SaturatedActivation(LayerKindRule):
    """Fires when more than ``threshold_layer`` percent of a tanh or sigmoid layer's units are saturated.

    Formula: each selected input tensor of a tanh layer (name matches
    ``tanh_regex``) or sigmoid layer (``sigmoid_regex``) is read as
    ``(samples, units)``. A unit's activity is the percentage of samples whose
    input lies strictly inside ``(min, max)`` of ``threshold_tanh`` or
    ``threshold_sigmoid``; the unit is saturated when its activity is below
    ``threshold_inactivity``. Fires when ``100 * saturated / units >
    threshold_layer``. The default bounds are where the derivative of tanh
    (sigmoid) drops below ``1e-7``.

    A step whose selected tensors match neither regex records a missing input
    (:meth:`Rule.need`) instead of passing: layers are named by the model
    (``inputs/1`` for the ``nn.Tanh`` of an ``nn.Sequential``, ``inputs/activation``
    for a Keras ``Activation("tanh")``), so name them with ``tanh_regex`` and
    ``sigmoid_regex``. The input of ``torch.tanh`` in a forward, or of the
    activation inside ``Dense(activation="tanh")``, is no layer's input and is
    not captured: make the activation a layer of its own.

    Needs: collection ``inputs`` (or the selected ones) as raw tensors, for layers
    whose names match ``tanh_regex`` or ``sigmoid_regex``.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    collection_names
        Collections to inspect. Default (with no ``tensor_regex``): ``inputs``.
    tensor_regex
        Regexes of tensor names to inspect, in addition.
    threshold_tanh
        ``(min, max)`` inputs of tanh beyond which it is saturated. Default ``(-9.4999, 9.4999)``.
    threshold_sigmoid
        ``(min, max)`` for sigmoid. Default ``(-23, 16.99999)``.
    threshold_inactivity
        Percentage of samples below which a unit counts as saturated. Default ``1.0``.
    threshold_layer
        Percentage of saturated units above which the rule fires. Default ``50.0``.
    tanh_regex, sigmoid_regex
        Which tensors are inputs of tanh and of sigmoid layers. Defaults ``"tanh"``, ``"sigmoid"``.
    """

    def __init__(
        self,
        base_trial: Any = None,
        collection_names: str | Sequence[str] | None = None,
        tensor_regex: str | Sequence[str] | None = None,
        threshold_tanh: Sequence[float] = (-9.4999, 9.4999),
        threshold_sigmoid: Sequence[float] = (-23.0, 16.99999),
        threshold_inactivity: float = 1.0,
        threshold_layer: float = 50.0,
        tanh_regex: str = "tanh",
        sigmoid_regex: str = "sigmoid",
    ) -> None:
        super().__init__(base_trial)
        self.bounds: dict[str, tuple[float, float]] = {}
        for field_name, b in (("threshold_tanh", threshold_tanh), ("threshold_sigmoid", threshold_sigmoid)):
            if len(b) != 2 or not b[0] < b[1]:
                raise ValueError(f"{field_name}: expected (min, max) with min < max, got {b!r}")
            self.bounds[field_name] = (float(b[0]), float(b[1]))
        self.threshold_inactivity = check_number("threshold_inactivity", threshold_inactivity, 0, 100)
        self.threshold_layer = check_number("threshold_layer", threshold_layer, 0, 100)
        check_regexes("tanh_regex", [tanh_regex, sigmoid_regex])
        self.patterns = {"threshold_tanh": re.compile(tanh_regex), "threshold_sigmoid": re.compile(sigmoid_regex)}
        self.selection = Selection(collection_names, tensor_regex, ("inputs",))
        self.hook_collections = ("inputs",)

    def kind_missing(self, shown: str) -> str:
        tanh, sigmoid = (p.pattern for p in self.patterns.values())
        return (
            f"no tensor of {self.selection.describe()} ({shown}) matches tanh_regex {tanh!r} or "
            f"sigmoid_regex {sigmoid!r}: name the inputs of the tanh and sigmoid layers with them "
            "(nn.Sequential's nn.Tanh at index 1: tanh_regex=^inputs/1$; Keras Activation('tanh'): "
            "^inputs/activation$); torch.tanh in a forward or Dense(activation='tanh') has no captured "
            "input: make the activation a layer of its own"
        )

    def check(self, step: int, name: str, worker: str | None) -> str | None:
        kind = next((k for k, p in self.patterns.items() if p.search(name)), None)
        if kind is None:
            self.not_of_kind(name)
            return None
        self.of_kind()
        x = raw_at(self, self.base_trial, name, step, self.requirement(name), worker)
        if x is None:
            return None
        lo, hi = self.bounds[kind]
        saturated, units = inactive_percent(x, lambda r: (r > lo) & (r < hi), self.threshold_inactivity)
        if units and saturated > self.threshold_layer:
            fn = kind.removeprefix("threshold_")
            return (
                f"{name}: {saturated:.4g}% of its {units} {fn} units are saturated (input outside "
                f"({lo:g}, {hi:g}); threshold_layer {self.threshold_layer:g}%)"
            )
        return None


EMBEDDING = re.compile(r"embed|(^|[./])(wte|wpe)([./]|$)", re.IGNORECASE)
"""Names of embedding tables (``embedding.weight``, Keras's ``.../embeddings``, GPT-2's ``wte``/``wpe``):
lookup tables, drawn with no regard to a fan-in (PyTorch's ``N(0, 1)``), whose gradient is zero but in
the rows of the batch's tokens."""

RECURRENT = re.compile(r"recurrent_kernel|weight_hh", re.IGNORECASE)
"""Names of recurrent weights (Keras's ``recurrent_kernel``, PyTorch's ``weight_hh_l<k>``): their gradient
is small in the first steps by design, the state starting at zero."""


def spread(values: dict[str, float]) -> tuple[float, str, str] | None:
    """``(max / min, name of the max, name of the min)`` of at least two values (inf when only the min is 0)."""
    if len(values) < 2:
        return None
    hi, lo = max(values, key=values.__getitem__), min(values, key=values.__getitem__)
    ratio = values[hi] / values[lo] if values[lo] > 0 else (np.inf if values[hi] > 0 else 1.0)
    return ratio, hi, lo


def fans(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of 2 or more dimensions.

    PyTorch lays weights out ``(out, in, *kernel)``; Keras names its weights
    ``.../kernel`` and lays them out ``(*kernel, in, out)``.
    """
    if name.endswith("kernel"):
        field = int(np.prod(shape[:-2]))
        return shape[-2] * field, shape[-1] * field
    field = int(np.prod(shape[2:]))
    return shape[1] * field, shape[0] * field


class PoorWeightInitialization(Rule):
    """Fires in the first ``steps`` steps when the initialization looks poor.

    Formula, at a global step ``s < steps`` (three checks; any one fires):

    1. Variance: over the tensors matching ``activation_inputs_regex`` saved at
       ``s``, ``var_i`` = variance of tensor ``i``. Fires when at least two are
       saved and ``max(var) / min(var) > threshold`` (infinite when
       ``min(var) == 0 < max(var)``). By default (no ``activation_inputs_regex``)
       the weight matrices and kernels of collection ``weights`` (2 or more
       dimensions; 1-d scales such as a norm layer's, initialised to ones, are
       not compared, nor embedding tables, named ``embed...`` or GPT-2's ``wte``/``wpe``:
       lookup tables, drawn with no regard to a fan-in) are compared as every
       standard initialization sets them:
       ``var_i * fan_i``, with ``fan_i`` the layer's fan-in (LeCun, He, PyTorch's
       default) and, separately, its mean of fan-in and fan-out (Glorot, Keras's
       default); fires when neither brings ``max / min`` within ``threshold``.
       Fan-in is the product of all dimensions but the first (PyTorch's
       ``(out, in, *kernel)``), or but the last for a name ending in ``kernel``
       (Keras's ``(*kernel, in, out)``); it needs the raw weights.
    2. Gradients: for every tensor of collection ``gradients`` of 2 or more
       dimensions (the gradients of weight matrices and kernels: that of a bias
       followed by a batch norm is 0 by design), but those of embedding tables
       (zero but in the rows of the batch's tokens) and of recurrent weights
       (``recurrent_kernel``, ``weight_hh``: small in the first steps, the state
       starting at zero), ``spread = percentile95 -
       percentile5`` of its values. Fires when the smallest spread
       ``< distribution_range``.
    3. Loss: for a tensor of collection ``losses`` saved at ``s`` and at an
       earlier step of the same mode, ``p`` = the latest such step with
       ``p <= s - patience``, counted in mode steps. Fires when
       ``loss(s) >= loss(p)``. A loss is judged on its TRAIN steps, and (a
       series of their own) on its GLOBAL steps (saved without a mode); its
       EVAL and PREDICT steps are not judged (a loss saved in training and
       validation alike, as the PyTorch loss module given to ``capture``: a
       training loss is never compared with a validation loss).

    On a trial of several workers it reads the first worker (in sorted order)
    that saved a tensor: data-parallel training starts every rank from the same
    weights.

    Needs: collection ``weights`` as raw tensors (with ``activation_inputs_regex``:
    reduction ``variance``), ``gradients`` as raw tensors, ``losses``, saved at
    steps below ``steps``. Each of the three the trial lacks is a missing input
    (the rule judges with the others); one that read nothing below ``steps``
    (saved from a later step on, a resumed training's global steps) lacks
    inputs (:meth:`~tensortap.rules.Rule.not_judged`): not a pass.

    Parameters
    ----------
    base_trial
        The trial to inspect.
    activation_inputs_regex
        Regexes of the tensors whose variances are compared as they are; default: the
        weights of collection ``weights``, scaled by their fans (check 1).
    threshold
        Largest allowed ratio of the largest to the smallest variance. Default ``10.0``.
    distribution_range
        Smallest allowed 5th-to-95th percentile spread of a gradient. Default ``0.001``.
    patience
        Steps of the mode the loss is judged in (check 3) after which it must have decreased. Default 5.
    steps
        Number of first steps analysed. Default 10.
    """

    state_attrs = ("judged",)
    state_version = 2  # judged (hunt 48 F1): no state before

    def __init__(
        self,
        base_trial: Any = None,
        activation_inputs_regex: str | Sequence[str] | None = None,
        threshold: float = 10.0,
        distribution_range: float = 0.001,
        patience: int = 5,
        steps: int = 10,
    ) -> None:
        super().__init__(base_trial)
        self.threshold = check_number("threshold", threshold, 1)
        self.distribution_range = check_number("distribution_range", distribution_range, 0)
        self.patience = check_number("patience", patience, 1, integer=True)
        self.steps = check_number("steps", steps, 1, integer=True)
        regexes = regex_list(activation_inputs_regex)
        self.variances = Selection(None if regexes else ("weights",), regexes or None, ())
        self.by_fan = not regexes  # weights: compared as initializations scale them
        self.gradients = Selection(("gradients",), None, ())
        self.losses = Selection(("losses",), None, ())
        self.loss_series = ModeSeries(TRAINING_MODES)
        self.judged = False  # an input was read at a step below `steps`

    def required_captures(self) -> list[Requirement]:
        variances = self.variances.requirements((), True) if self.by_fan else self.variances.requirements(("variance",))
        return [*variances, Requirement("gradients", (), True), Requirement("losses")]

    def invoke_at_step(self, step: int) -> bool:
        if step >= self.steps:
            return False
        for check in (self._variance, self._gradient_spread, self._loss):
            found = check(step)
            if found is not None:
                return self.fire(step, f"{found[0]} at step {step}", found[1])
        return False

    def found_input(self) -> None:
        """Record the read (:meth:`Rule.found_input`) and that the rule judged a step below ``steps``."""
        super().found_input()
        self.judged = True

    def not_judged(self) -> str | None:
        """An input read at a step below ``steps``, once the rule evaluated a later step (or the training ended)
        without one: steps come in order, so none will come."""
        if self.judged or not (self.last_step >= self.steps or self.base_trial.training_ended):
            return None
        return (
            f"weights, gradients or losses saved at a step below steps={self.steps} to judge (parameter steps): "
            "it read none there (it judges the first steps of a training only)"
        )

    def _variance(self, step: int) -> tuple[str, list[str]] | None:
        if self.by_fan:
            return self._scaled_variance(step)
        req = self.required_captures()[0]
        var = {}
        for n in self.variances.names_for(self, step, req, partial=True):
            v = reduction_at(self, self.base_trial, n, step, "variance", req)
            if v is not None and np.isfinite(v):
                var[n] = v
        found = spread(var)
        if found is not None and found[0] > self.threshold:
            ratio, hi, lo = found
            return (
                f"variance ratio {ratio:.3g} between {hi} ({var[hi]:.3g}) and {lo} ({var[lo]:.3g}) "
                f"> threshold {self.threshold:g}",
                [hi, lo],
            )
        return None

    def _scaled_variance(self, step: int) -> tuple[str, list[str]] | None:
        """The default check 1: weight variances times fan-in, and times mean fan, must both spread too far."""
        req = Requirement("weights", (), True)
        scaled: dict[str, dict[str, float]] = {"fan-in": {}, "mean fan": {}}
        for n in self.variances.names_for(self, step, req, partial=True):
            if EMBEDDING.search(n):
                continue
            w = raw_at(self, self.base_trial, n, step, req)
            if w is None or w.ndim < 2 or w.size == 0:
                continue
            var = float(np.var(w.astype(np.float64)))
            if not np.isfinite(var):
                continue
            fan_in, fan_out = fans(n, w.shape)
            scaled["fan-in"][n] = var * fan_in
            scaled["mean fan"][n] = var * (fan_in + fan_out) / 2
        spreads = {kind: spread(values) for kind, values in scaled.items()}
        best = min(spreads.values(), key=lambda f: f[0] if f is not None else 0.0)
        if best is None or best[0] <= self.threshold:
            return None
        parts = [f"{f[0]:.3g} ({f[1]} against {f[2]})" for f in spreads.values() if f is not None]
        return (
            f"weight variances x fan-in spread {parts[0]}, x mean fan {parts[1]}: no standard "
            f"initialization gives layers so different (threshold {self.threshold:g})",
            [best[1], best[2]],
        )

    def _gradient_spread(self, step: int) -> tuple[str, list[str]] | None:
        spreads = {}
        req = Requirement("gradients", (), True)
        for n in self.gradients.names_for(self, step, req, partial=True):
            if EMBEDDING.search(n) or RECURRENT.search(n):
                continue
            g = raw_at(self, self.base_trial, n, step, req)
            if g is not None and g.ndim >= 2 and g.size >= 2:
                p5, p95 = np.percentile(g.astype(np.float64), [5, 95])
                spreads[n] = float(p95 - p5)
        if not spreads:
            return None
        n = min(spreads, key=spreads.__getitem__)
        if spreads[n] < self.distribution_range:
            return (
                f"{n}: 5th-95th percentile spread of the gradient {spreads[n]:.3g} < distribution_range "
                f"{self.distribution_range:g}",
                [n],
            )
        return None

    def _loss(self, step: int) -> tuple[str, list[str]] | None:
        req = Requirement("losses")
        for n in self.losses.names_for(self, step, req, partial=True):
            found = self.loss_series.at(self.base_trial, n, step)
            if found is None:
                continue
            _, now_step, series, _ = found
            # the latest saved step of its mode at least `patience` steps of that mode before
            i = bisect.bisect_right(series, (now_step - self.patience, step)) - 1
            if i < 0:
                continue
            earlier = series[i][1]
            now, before = (
                scalar_at(self, self.base_trial, n, step, req),
                scalar_at(self, self.base_trial, n, earlier, req),
            )
            if now is not None and before is not None and now >= before:
                return (
                    f"{n}: loss {now:.4g} did not decrease from {before:.4g} at step {earlier} "
                    f"(patience {self.patience})",
                    [n],
                )
        return None
