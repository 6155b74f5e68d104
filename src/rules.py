"""Rules (``from tensortap.rules import Rule, invoke_rule, RuleConditionMet``).

They live in :mod:`tensortap.trial.rules`; this module re-exports them.
"""

from __future__ import annotations

from .trial.rules import *  # noqa: F403
from .trial.rules import __all__  # noqa: F401
