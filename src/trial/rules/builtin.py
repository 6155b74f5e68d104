"""The built-in rules by name, their parameters, and building a rule from text (``name:param=value,...``).

Parameter values given as text are converted by the parameter's annotation:
``none``, booleans (``true``/``false``), integers, finite floats, lists of
finite numbers (``-9.5,9.5``) and strings. Nothing is ever eval'd.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

from ...exceptions import UnknownName
from .activation_rules import DeadRelu, PoorWeightInitialization, SaturatedActivation
from .base import Rule
from .classification_rules import ClassImbalance, Confusion
from .loss_rules import LossNotDecreasing, Overfit, Overtraining, StalledTraining
from .tensor_rules import (
    AllZero,
    ExplodingTensor,
    SimilarAcrossRuns,
    TensorVariance,
    UnchangedTensor,
    VanishingGradient,
    WeightUpdateRatio,
)
from .tree_rules import FeatureImportanceOverweight, TreeDepth

_CLASSES: tuple[type[Rule], ...] = (
    VanishingGradient,
    ExplodingTensor,
    PoorWeightInitialization,
    SaturatedActivation,
    DeadRelu,
    WeightUpdateRatio,
    TensorVariance,
    AllZero,
    UnchangedTensor,
    LossNotDecreasing,
    Overfit,
    Overtraining,
    SimilarAcrossRuns,
    ClassImbalance,
    Confusion,
    StalledTraining,
    FeatureImportanceOverweight,
    TreeDepth,
)


def snake_case(name: str) -> str:
    """``"LossNotDecreasing"`` -> ``"loss_not_decreasing"``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


BUILTIN_RULES: dict[str, type[Rule]] = {snake_case(c.__name__): c for c in _CLASSES}


def rule_class(name: str) -> type[Rule]:
    """The built-in rule called ``name`` (snake_case or its class name)."""
    key = name if name in BUILTIN_RULES else snake_case(name)
    if key not in BUILTIN_RULES:
        raise UnknownName("built-in rule", name, BUILTIN_RULES)
    return BUILTIN_RULES[key]


@dataclass(frozen=True)
class Parameter:
    """One parameter of a rule: name, default (``inspect.Parameter.empty`` if required) and annotation."""

    name: str
    default: Any
    annotation: str

    def describe(self) -> str:
        """``name=default (annotation)``."""
        default = "required" if self.default is inspect.Parameter.empty else repr(self.default)
        return f"{self.name}={default} ({self.annotation})"


def parameters(cls: type[Rule]) -> list[Parameter]:
    """The parameters of ``cls`` (``base_trial`` left out)."""
    sig = inspect.signature(cls.__init__)
    return [
        Parameter(p.name, p.default, str(p.annotation))
        for p in sig.parameters.values()
        if p.name not in ("self", "base_trial")
    ]


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _finite(field_name: str, text: str, number: float) -> float:
    """``number``, read from the text ``text`` of parameter ``field_name``, unless it is not finite: ``nan``
    (which no value compares with: the rule would never fire) and the infinities raise a ValueError naming
    the parameter."""
    if not math.isfinite(number):
        raise ValueError(f"{field_name}: expected a finite number, got {text!r}")
    return number


def convert(field_name: str, text: str, annotation: str) -> Any:
    """Convert the text ``text`` of parameter ``field_name`` by its ``annotation`` (never eval'd).

    Raises
    ------
    ValueError
        A value the annotation does not allow, naming the parameter: not a boolean, not a number, a number
        that is not finite (``nan``, ``inf``).
    """
    kinds = set(re.findall(r"\w+(?:\[\w+\])?", annotation))
    value = text.strip()
    if value.lower() == "none" and "None" in kinds:
        return None
    if "bool" in kinds:
        if value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise ValueError(f"{field_name}: expected true or false, got {text!r}")
    for kind, fn in (("int", int), ("float", float)):
        if kind in kinds:
            try:
                number = fn(value)
            except ValueError:
                continue
            return _finite(field_name, text, number)
    if "Sequence[float]" in kinds:
        try:
            numbers = tuple(float(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"{field_name}: expected numbers separated by commas, got {text!r}") from None
        return tuple(_finite(field_name, text, n) for n in numbers)
    if kinds & {"str", "Sequence[str]", "Any"}:
        return value
    raise ValueError(f"{field_name}: expected {annotation}, got {text!r}")


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"name:a=1,b=x,y"`` into ``("name", {"a": "1", "b": "x,y"})``.

    Parameters are separated by commas that start a new ``key=``; a value may
    therefore hold commas (a list of numbers, a regex). A parameter given
    twice raises a ValueError naming it (which value was meant is not known).
    """
    name, _, rest = spec.partition(":")
    params: dict[str, str] = {}
    if rest.strip():
        for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"rule {name!r}: expected param=value, got {item!r}")
            if key.strip() in params:
                raise ValueError(
                    f"rule {name!r}: parameter {key.strip()} given twice ({params[key.strip()]!r}, then {value!r})"
                )
            params[key.strip()] = value
    return name.strip(), params


def make_rule(spec: str, trial: Any) -> Rule:
    """Build a built-in rule on ``trial`` from ``"name:param=value,..."``."""
    name, texts = split_spec(spec)
    cls = rule_class(name)
    params = {p.name: p for p in parameters(cls)}
    for given in texts:
        if given not in params:
            raise UnknownName("parameter", given, params, f" of {cls.__name__}")
    values = {k: convert(k, v, params[k].annotation) for k, v in texts.items()}
    return cls(trial, **values)
