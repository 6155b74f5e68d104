"""Rules: judge a trial, offline or live, from any framework; stop a training that goes wrong.

::

    from tensortap.rules import LossNotDecreasing, StopTraining, invoke_rule
    rule = LossNotDecreasing(trial, num_steps=10)
    steps = invoke_rule(rule, actions=[StopTraining()])

Built-in rules are listed in :data:`BUILTIN_RULES` by snake_case name; see ``docs/rules.md``.
"""

from __future__ import annotations

from ...exceptions import RuleInputsMissing
from .actions import Action, StopTraining
from .activation_rules import DeadRelu, PoorWeightInitialization, SaturatedActivation
from .base import Requirement, Rule, RuleConditionMet, RuleFailure, Verdict
from .builtin import BUILTIN_RULES, make_rule, parameters, rule_class
from .classification_rules import ClassImbalance, Confusion
from .inprocess import MemoryTrial
from .loss_rules import LossNotDecreasing, Overfit, Overtraining, StalledTraining
from .runner import RuleRunner, invoke_rule
from .tensor_rules import (
    BIAS_GRADIENT_REGEX,
    INF_ENCODED_REGEX,
    NAN_ENCODED_REGEX,
    AllZero,
    ExplodingTensor,
    SimilarAcrossRuns,
    TensorVariance,
    UnchangedTensor,
    VanishingGradient,
    WeightUpdateRatio,
)
from .tree_rules import FeatureImportanceOverweight, TreeDepth

__all__ = [
    "BIAS_GRADIENT_REGEX",
    "BUILTIN_RULES",
    "INF_ENCODED_REGEX",
    "NAN_ENCODED_REGEX",
    "Action",
    "AllZero",
    "ClassImbalance",
    "Confusion",
    "DeadRelu",
    "ExplodingTensor",
    "FeatureImportanceOverweight",
    "LossNotDecreasing",
    "MemoryTrial",
    "Overfit",
    "Overtraining",
    "PoorWeightInitialization",
    "Requirement",
    "Rule",
    "RuleConditionMet",
    "RuleFailure",
    "RuleInputsMissing",
    "RuleRunner",
    "SaturatedActivation",
    "SimilarAcrossRuns",
    "StalledTraining",
    "StopTraining",
    "TensorVariance",
    "TreeDepth",
    "UnchangedTensor",
    "VanishingGradient",
    "Verdict",
    "WeightUpdateRatio",
    "invoke_rule",
    "make_rule",
    "parameters",
    "rule_class",
]
